"""Every YAML under jobs/configs/ is a test case; bad configs are refused with every problem."""

from pathlib import Path

import pytest
import yaml

from ddft import config

REPO = Path(__file__).resolve().parents[1]
JOB_CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))


def test_there_are_job_configs():
    assert {p.name for p in JOB_CONFIGS} >= {"demo.yaml", "video-llava-7b.yaml"}


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_job_config_validates_and_opens_with_its_command(path):
    cfg = config.load(path)
    assert {j.modality for j in cfg.jobs} - {"joint"} == {"image", "video", "text"}
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and ("make demo" in first or "ray job submit" in first)


def test_production_config_carries_video_llava_lora_recipe():
    cfg = config.load(REPO / "jobs/configs/video-llava-7b.yaml")
    assert cfg.base.source == "LanguageBind/Video-LLaVA-7B-hf" and cfg.data.frames == 8
    for job in cfg.jobs:
        assert (job.lora.r, job.lora.alpha, job.optim.lr, job.optim.projector_lr) == (128, 256, 2e-4, 2e-5)
        assert (job.optim.epochs, job.optim.warmup_ratio, job.precision) == (1, 0.03, "bf16")
        assert job.resources.gpus_per_worker > 0


def test_bad_config_lists_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "base": {"id": "x", "buld": "tiny"},
                "jobs": [
                    {"name": "Img", "modality": "audio", "optim": {"lr": -1}},
                    {"name": "t", "modality": "text", "precision": "bf16"},
                ],
            }
        )
    )
    with pytest.raises(config.ConfigError) as err:
        config.load(bad)
    msg = str(err.value)
    assert len(err.value.problems) == 5, msg
    for needle in (
        "base.buld: unknown key",
        "the keys here are ['build', 'id', 'source']",
        "jobs.0.name: got 'Img'",
        "(lowercase letters, digits, '.', - and _ (64 at most)",
        "jobs.0.modality: got 'audio'",
        "jobs.0.optim.lr: got -1",
        "precision bf16 needs resources.gpus_per_worker",
    ):
        assert needle in msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(config.ConfigError, match="file not found"):
        config.load(tmp_path / "nope.yaml")
    (tmp_path / "x.yaml").write_text("jobs: [unclosed")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(tmp_path / "x.yaml")


def test_duplicate_job_names_refused():
    with pytest.raises(config.ConfigError, match=r"repeated: \['a'\]"):
        config.validate(
            config.PipelineConfig,
            {"base": {"id": "b"}, "jobs": [{"name": "a", "modality": "text"}, {"name": "a", "modality": "image"}]},
        )


def test_store_env_overrides_the_config(monkeypatch):
    monkeypatch.setenv("DDFT_STORE", "s3://bucket/prefix")
    assert config.load(REPO / "jobs/configs/demo.yaml").store.uri == "s3://bucket/prefix"


def test_entrypoint_refuses_a_bad_config_without_a_traceback(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("base: {id: x}\njobs: [{name: a, modality: smell}]\n")
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs/train_all.py"), "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2  # a usage or config error (ddft --help lists the exit codes)
    assert "jobs.0.modality: got 'smell'" in out.stderr and "Traceback" not in out.stderr


def _pipeline(jobs: list[dict], **data) -> dict:
    return {"base": {"id": "tiny", "build": "tiny"}, "data": data, "jobs": jobs}


def _job(name, modality=None, batch=2, steps=None, **extra):
    return {"name": name, "modality": modality or name, "optim": {"batch_size": batch, "max_steps": steps}, **extra}


def test_an_equal_budget_joint_job_gets_each_directed_jobs_samples_and_their_total_steps():
    cfg = config.validate(
        config.PipelineConfig,
        _pipeline(
            [
                _job("image", batch=4, steps=45),
                _job("video", batch=2, steps=20),
                _job("text", batch=4, steps=30),
                _job("joint", batch=4, samples="directed"),
            ]
        ),
    )
    joint = cfg.job("joint")
    assert joint.samples == {"image": 180, "video": 40, "text": 120} and joint.optim.max_steps == 85
    # Written back out and read again (train_all's config file), it is the same job.
    again = config.validate(config.PipelineConfig, cfg.model_dump(mode="json"))
    assert again.job("joint") == joint
    explicit = config.validate(
        config.PipelineConfig, _pipeline([_job("joint", batch=3, samples={"image": 5, "text": 2})])
    )
    assert explicit.job("joint").optim.max_steps == 3  # ceil(7 / 3)


@pytest.mark.parametrize(
    "jobs, message",
    [
        (
            [_job("image", steps=4), _job("joint", samples="directed")],
            "needs exactly one video job with optim.max_steps",
        ),
        (
            [_job("image"), _job("video", steps=1), _job("text", steps=1), _job("joint", samples="directed")],
            "needs exactly one image job with optim.max_steps set",
        ),
        ([_job("joint", steps=5, samples={"image": 4})], "remove optim.max_steps"),
        ([_job("image", samples={"image": 4})], "samples is for joint jobs"),
        ([_job("joint", samples={"image": 0})], "at least 1"),
    ],
)
def test_bad_joint_budgets_are_refused_with_what_to_change(jobs, message):
    with pytest.raises(config.ConfigError, match=message):
        config.validate(config.PipelineConfig, _pipeline(jobs))


def test_the_kitchen_menu_is_checked():
    from ddft.data.synthetic import DISHES

    assert config.KITCHEN_DISHES == len(DISHES)
    with pytest.raises(config.ConfigError, match="more than the kitchen's 8 dishes"):
        config.validate(config.PipelineConfig, _pipeline([_job("text")], synthetic={"dishes": 7, "held_out_dishes": 2}))


def test_serving_and_training_each_read_their_part_of_one_file(tmp_path):
    """ServeConfig needs no training jobs; TrainConfig no serve settings; a file may hold both (then
    every section is checked whichever part reads it), and a key of no part is refused."""
    serve_only = tmp_path / "serve.yaml"
    serve_only.write_text("base: {id: b}\nserve: {port: 9000}\n")
    assert config.load(serve_only, config.ServeConfig).serve.port == 9000
    with pytest.raises(config.ConfigError, match="jobs"):
        config.load(serve_only, config.TrainConfig)
    whole = config.load(REPO / "jobs/configs/demo.yaml")
    serving = config.load(REPO / "jobs/configs/demo.yaml", config.ServeConfig)
    training = config.load(REPO / "jobs/configs/demo.yaml", config.TrainConfig)
    assert serving.serve == whole.serve and training.jobs == whole.jobs and "jobs" not in type(serving).model_fields
    typo = tmp_path / "typo.yaml"
    typo.write_text("base: {id: b}\njobs: [{name: t, modality: text}]\nserv: {port: 9000}\n")
    for part in (config.ServeConfig, config.TrainConfig, config.PipelineConfig):
        with pytest.raises(config.ConfigError, match="serv: unknown key"):
            config.load(typo, part)
    broken_serve = tmp_path / "broken.yaml"
    broken_serve.write_text("base: {id: b}\njobs: [{name: t, modality: text}]\nserve: {port: 0}\n")
    with pytest.raises(config.ConfigError, match="serve.port"):
        config.load(broken_serve, config.TrainConfig)
