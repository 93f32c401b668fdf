"""LoRA jobs on Ray Train: the loss falls on a fixed seed, the published adapter is complete,
reloads with PEFT and changes the output; train_all runs three jobs at the same time."""

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ddft.adapters.registry import Manifest, download, read_manifest
from ddft.models.load import load_base, local_base_dir
from ddft.prompts import encode, pad_batch, pixel_inputs

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Trained:
    result: object  # the JobResult
    scraped: list[str]  # the run's ray_ddft_train_* lines from the node's metrics port, scraped while it trained
    scrape_errors: list[str]


@pytest.fixture(scope="module")
def trained_video(prepared) -> Trained:
    """The tiny config's video job, trained once for the module (the tests that read a trained adapter share
    it), its metrics scraped from the node's Prometheus port while it trains, as Prometheus would (every few
    seconds; Ray drops a finished worker's series a while later)."""
    import threading

    import requests

    from ddft.train.job import run_job
    from tests.pipeline_fixture import METRICS_PORT_ENV

    cfg, _, _, _ = prepared
    url = f"http://127.0.0.1:{os.environ[METRICS_PORT_ENV]}/metrics"
    seen: list[str] = []
    done = threading.Event()
    errors: list[str] = []

    def scrape():  # until the series shows or the run is 30 s over
        deadline = None
        while not seen and (deadline is None or time.time() < deadline):
            try:
                text = requests.get(url, timeout=10).text
            except requests.RequestException as err:
                errors.append(repr(err))
                text = ""
            lines = [line for line in text.splitlines() if 'ddft_job="video"' in line]
            if {"ray_ddft_train_loss", "ray_ddft_train_tokens_per_second"} <= {ln.partition("{")[0] for ln in lines}:
                seen.extend(lines)
            if done.is_set() and deadline is None:
                deadline = time.time() + 30
            time.sleep(2)

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        result = run_job(cfg, cfg.job("video"))
    finally:
        done.set()
        scraper.join(timeout=60)
    assert not scraper.is_alive(), "the metrics scraper did not stop"
    return Trained(result, seen, errors)


def test_one_lora_job(prepared, trained_video, tmp_path):
    from peft import PeftModel

    from ddft.train.job import run_job

    cfg, store, base, _ = prepared
    result = trained_video.result
    assert result.status == "succeeded" and result.steps == 8 and len(result.losses) == 8
    assert result.val_losses and result.val_losses[-1]["step"] == 8 and result.resumed_from == []
    # The tiny random base starts at uniform (ln 262 = 5.57 nats); on a fixed seed it learns.
    assert result.losses[0] > 5.4 and result.losses[-1] < result.losses[0] - 0.2, result.losses

    manifest = read_manifest(store, "ddft", "video")
    assert result.adapter == store.url(manifest.key) and manifest.version >= 1
    for f in fields(Manifest):  # every field filled in
        assert getattr(manifest, f.name) not in (None, "", []) or f.name == "modules_to_save", f.name
    assert (manifest.modality, manifest.source, manifest.base_fingerprint) == ("video", "trained", base.fingerprint)
    assert manifest.metrics["steps"] == 8 and manifest.metrics["last_loss"] == result.losses[-1]
    assert manifest.modules_to_save == ["multi_modal_projector"]
    # how its videos were sampled, for serving to sample them the same way
    assert (manifest.frames, manifest.frame_strategy) == (cfg.data.frames, cfg.data.frame_strategy) == (8, "uniform")
    # LoRA sits on the language model only, never on the CLIP towers.
    assert store.read_json(f"{manifest.key}/manifest.json") == asdict(manifest)

    model, processor = load_base(local_base_dir(store, "tiny"))
    frames = [torch.randint(0, 255, (8, 224, 224, 3), dtype=torch.uint8).numpy()]
    batch = pad_batch(
        [encode(processor, "video", "Give me the recipe.", "x", frames=8)], processor.tokenizer.pad_token_id
    )
    batch.update(pixel_inputs(processor, "video", frames))
    with torch.no_grad():
        before = model(**batch).logits
        tuned = PeftModel.from_pretrained(model, download(store, manifest, tmp_path / "a"))
        names = [n for n, _ in tuned.named_modules() if n.endswith("lora_A")]
        assert names and all(".language_model." in n for n in names)
        after = tuned(**batch).logits
    assert (after - before).abs().max() > 1e-3

    again = run_job(cfg, cfg.job("video"))  # the same job resubmitted: already published, not retrained
    assert (again.status, again.adapter, read_manifest(store, "ddft", "video").version) == (
        "skipped",
        result.adapter,
        manifest.version,
    )


def test_an_equal_budget_joint_job_draws_each_modalitys_samples(prepared):
    """Whole passes over each modality's train rows and then part of one more: exactly the samples
    the job gives, every row of a modality seen as often as a directed job would (+/- one pass)."""
    from collections import Counter

    from ddft.train.job import _datasets, dataset_versions

    cfg, store, _, _ = prepared
    joint = cfg.job("text").model_copy(update={"name": "joint", "modality": "joint"})
    versions = dataset_versions(store, joint)
    own = {m: _datasets(store, {m: v}, 0)[1] for m, v in versions.items()}
    samples = {"image": 2 * own["image"] + 1, "video": own["video"] - 1, "text": 3 * own["text"]}
    datasets, rows, _ = _datasets(store, versions, 0, samples)
    assert rows == sum(samples.values())
    drawn = datasets["train"].take_all()
    kinds = Counter({0: "text", 3: "image", 4: "video"}[len(r["pixel_shape"])] for r in drawn)
    assert kinds == samples
    seen = Counter(r["id"] for r in drawn if len(r["pixel_shape"]) == 0)
    assert set(seen.values()) == {3}  # three whole passes over the text rows


def _train_worker_pid(run: str) -> int | None:
    """The Ray Train worker process of one run: the job names it in its workers' environment."""
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and f"DDFT_RUN={run}".encode() in (proc / "environ").read_bytes().split(b"\0")
                and b"RayTrainWorker" in (proc / "cmdline").read_bytes()
            ):
                return int(proc.name)
        except OSError:
            continue
    return None


def _kill_after_first_checkpoint(store, run: str, proc, timeout: float = 600) -> int:
    """SIGKILL the run's worker once Ray Train has registered a checkpoint."""
    from tests.pipeline_fixture import registered_checkpoint

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        pid = _train_worker_pid(run)
        if pid and registered_checkpoint(store, run):
            niceness = os.getpriority(os.PRIO_PROCESS, pid)
            os.kill(pid, signal.SIGKILL)
            # the job's resources.niceness, not Ray's default 15 for workers
            assert niceness == 5, f"the training worker ran at niceness {niceness}"
            return pid
        time.sleep(0.3)
    raise AssertionError(f"no registered checkpoint of run {run} with a live worker appeared")


def test_training_metrics_reach_prometheus(trained_video):
    """While a job trains, its rank-0 worker's ray_ddft_train_* gauges are on the node's metrics port in
    Prometheus format (scraped by the trained_video fixture during its run)."""
    seen = trained_video.scraped
    loss = [line for line in seen if line.startswith("ray_ddft_train_loss{")]
    assert loss, f"no ray_ddft_train_loss series for job video while it trained ({trained_video.scrape_errors[:3]})"
    assert 0 < float(loss[0].split()[-1]) < 10


@pytest.mark.timeout(1200)  # its subprocess waits (600 s for a checkpoint, then 900 s) speak first
def test_train_all_survives_a_killed_worker_and_a_broken_job(prepared, tmp_path):
    """The real entrypoint, as `ray job submit` runs it, against the running cluster: jobs at once;
    one's worker is SIGKILLed after its first checkpoint and the job resumes to the full step
    count while the other goes on unaffected; a third job whose dataset version doesn't exist
    fails at run time without stopping the others. Resubmitting the finished jobs retrains nothing."""
    import ray

    from ddft.data.prepare import latest_version
    from ddft.models.load import base_info
    from ddft.train.job import job_fingerprint, run_job, run_name
    from ddft.train.launcher import read_results

    cfg, store, _, _ = prepared
    # The killed job: dropout on (so the random streams must be restored too), a checkpoint every 2
    # steps. First the same settings run uninterrupted, here, as the reference.
    video = cfg.job("video")
    settings = {
        "lora": video.lora.model_copy(update={"dropout": 0.1}),
        "optim": video.optim.model_copy(update={"checkpoint_every": 2}),
    }
    niced = video.resources.model_copy(update={"niceness": 5})
    killed = video.model_copy(update={"name": "video-killed", "resources": niced, **settings})
    straight = run_job(cfg, video.model_copy(update={"name": "video-straight", **settings}), force=True)
    assert straight.status == "succeeded" and straight.resumed_from == []
    reference = read_manifest(store, "ddft", "video-straight")  # published under the job's name
    broken = cfg.job("text").model_copy(update={"name": "broken", "dataset_version": "no-such-version"})
    jobs = [killed, cfg.job("text"), broken]
    config_path = tmp_path / "cfg.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_copy(update={"jobs": jobs}).model_dump(mode="json")))
    run = run_name(killed, job_fingerprint(killed, {"video": latest_version(store, "video")}, base_info(store, "tiny")))
    before = {
        n: (read_manifest(store, "ddft", n).version if read_manifest(store, "ddft", n) else 0)
        for n in ("video-killed", "text")
    }
    submitted = time.time()
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    train_all = [sys.executable, str(REPO / "jobs/train_all.py"), "--config", str(config_path)]
    proc = subprocess.Popen(train_all, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _kill_after_first_checkpoint(store, run, proc)
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 1, stdout[-3000:] + stderr[-3000:]  # one job failed
    results = read_results(store, ["video-killed", "text", "broken"], since=submitted)  # the store, not stdout
    assert [results[n].status for n in ("video-killed", "text", "broken")] == ["succeeded"] * 2 + ["failed"]
    assert "prepared text version no-such-version not found" in results["broken"].error
    assert "job broken failed: StoreError: prepared text version no-such-version" in stderr
    ok = [results[n] for n in ("video-killed", "text")]
    # Their run times overlap: every job started before any job ended.
    assert max(r.started for r in ok) < min(r.ended for r in ok)
    for r in ok:
        assert r.steps == 8 and len(r.losses) == 8 and r.losses[-1] < r.losses[0]
        assert r.val_losses and r.val_losses[-1]["step"] == 8
        assert read_manifest(store, "ddft", r.name).version == before[r.name] + 1
        assert r.adapter == store.url(read_manifest(store, "ddft", r.name).key)
    # Only the killed job restarted, from a checkpoint (every 2 steps), and it ended with the weights
    # of the uninterrupted run: every tensor of the adapter (LoRA and projector), to 1e-6.
    assert results["text"].resumed_from == []
    (at,) = results["video-killed"].resumed_from
    assert at in (2, 4, 6), at
    assert results["video-killed"].losses == pytest.approx(straight.losses, abs=1e-4)
    resumed = read_manifest(store, "ddft", "video-killed")
    a, b = (
        load_file(download(store, m, tmp_path / m.ref.replace("/", "-")) / "adapter_model.safetensors")
        for m in (reference, resumed)
    )
    assert a.keys() == b.keys() and len(a) > 4
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    assert re.search(r"^broken\s+failed", stdout, re.M) and re.search(
        r"^video-killed\s+succeeded \(resumed", stdout, re.M
    )

    # Resubmitted as it is: the published adapters are up to date, nothing trains.
    resubmitted = time.time()
    again = subprocess.run(
        train_all + ["--only", "video-killed,text"], env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    results = read_results(store, ["video-killed", "text"], since=resubmitted)
    assert {r.status for r in results.values()} == {"skipped"} and len(results) == 2
    assert {n: read_manifest(store, "ddft", n).version for n in before} == {n: v + 1 for n, v in before.items()}


def test_train_all_on_a_store_without_data_says_what_to_run(ray_cluster, tmp_path):
    import ray

    from tests.pipeline_fixture import tiny_config

    config_path = tmp_path / "cfg.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(str(tmp_path / "empty")).model_dump(mode="json")))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs/train_all.py"), "--config", str(config_path), "--only", "text"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1
    assert re.search(r"^text\s+failed\s+0\s", out.stdout, re.M), out.stdout  # the table row
    assert "job text failed: StoreError: base model 'tiny' is not in the store at file://" in out.stderr
    assert "run `ddft base build`" in out.stderr and "Traceback" not in out.stderr


def test_evaluate_scores_base_and_adapters_and_records_them(prepared, trained_video):
    from ddft.eval import evaluate

    cfg, store, _, _ = prepared
    assert trained_video.result.status == "succeeded"
    results = evaluate.evaluate(store, "tiny", modalities=("video",), limit=2, max_new_tokens=8, data=cfg.data)
    video = read_manifest(store, "ddft", "video").ref
    assert [(r["dataset"], r["model"], r["inputs"]) for r in results] == [
        ("held-out", "base:tiny", "matched"),
        ("held-out", video, "matched"),
        ("held-out", video, "mismatched"),
        ("in-distribution", "base:tiny", "matched"),
        ("in-distribution", video, "matched"),
        ("youcook2", "base:tiny", "matched"),
        ("youcook2", video, "matched"),
    ]
    held, swapped = results[1], results[2]
    assert held["samples"] == swapped["samples"] == 2  # the held-out dishes' videos (the test split)
    assert held["example"]["reference"] == swapped["example"]["reference"]  # the reference stays
    assert swapped["gap"]["ingredient_f1"] == pytest.approx(held["ingredient_f1"] - swapped["ingredient_f1"])
    assert swapped["headline_gap"] == swapped["gap"]["content"]
    for r in results[:5]:
        assert 0 <= r["rouge_l"] <= 1 and 0 <= r["ingredient_f1"] <= 1 and 0 <= r["content"] <= 1
        assert r["example"]["reference"].startswith("Ingredients:")
    for r in results[5:]:  # the synthetic kitchen's held-out recipes in YouCook2's layout: steps only
        assert (r["samples"], r["skipped"]) == (2, 0) and "ingredient_f1" not in r
        assert r["example"]["reference"].startswith("Steps:\n1. ")
    assert results.engine == "hf" and {r["engine"] for r in results} == {"hf"}  # the default engine
    report = evaluate.save(store, results)
    assert report.startswith(store.url("eval/")) and report.endswith(".md") and report.notes == []
    text = store.read_text(report.removeprefix(store.uri + "/"))
    assert text.startswith("Answers generated on the hf engine (greedy).")
    assert "| held-out | video | base:tiny | matched | 2 | 0 |" in text and "| held-out | video | ddft/video/v" in text
    evals = read_manifest(store, "ddft", "video").metrics["eval"]
    assert evals["held-out"]["samples"] == 2 and "gap" in evals["held-out (mismatched)"]
    assert evals["held-out"]["engine"] == "hf"


def test_a_jobs_manifest_records_the_video_sampling_of_the_data_it_trained_on(prepared):
    """From the prepared video version (a pinned dataset_version may predate data.frames); the config's
    when that version's manifest doesn't say; nothing for a job without videos."""
    from ddft.data.prepare import latest_version, prepared_key
    from ddft.train.job import video_sampling

    cfg, store, _, _ = prepared
    video, text = latest_version(store, "video"), latest_version(store, "text")
    assert video_sampling(store, cfg, {"text": text}) == {"frames": None, "frame_strategy": None}
    assert video_sampling(store, cfg, {"video": video, "text": text}) == {"frames": 8, "frame_strategy": "uniform"}
    other = cfg.model_copy(update={"data": cfg.data.model_copy(update={"frames": 4, "frame_strategy": "keyframe"})})
    assert video_sampling(store, other, {"video": video}) == {"frames": 8, "frame_strategy": "uniform"}
    key = f"{prepared_key('video', video)}/manifest.json"
    manifest = store.read_json(key)
    try:  # a version prepared before manifests said how
        store.write_json(key, {k: v for k, v in manifest.items() if k not in ("frames", "frame_strategy")})
        assert video_sampling(store, other, {"video": video}) == {"frames": 4, "frame_strategy": "keyframe"}
    finally:
        store.write_json(key, manifest)


def test_drawn_samples_keep_their_column_types(ray_cluster, tmp_path):
    """The joint job's draw (whole passes, then a seeded choice of rows for the rest) keeps the
    prepared columns' Arrow types: a row filter made the chosen rows' lists int64 beside the
    passes' int32, and a batch spanning both failed ("Types mismatch") in bench-quality's joint job."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ddft.train.job import draw

    shape = pa.array([[8, 224, 224, 3]] * 5, pa.list_(pa.int32()))
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(5)], "pixel_shape": shape}), tmp_path / "a.parquet")
    drawn = draw(ray_cluster.data.read_parquet(str(tmp_path / "a.parquet")), 12, seed=0)
    blocks = [ray_cluster.get(ref) for ref in drawn.to_arrow_refs()]
    assert sum(b.num_rows for b in blocks) == 12  # two passes and 2 rows drawn
    assert {str(b.schema.field("pixel_shape").type) for b in blocks} == {"list<element: int32>"}
    assert len(pa.concat_tables(blocks)) == 12
