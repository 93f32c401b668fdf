"""The `ddft` command: help and exit codes in-process and as a real subprocess; training submitted to
a (fake) Ray job server; `ddft serve` wiring; then the HTTP commands against the running app on
127.0.0.1 (tenants, adapter uploads, recipes)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from ddft import cli
from ddft.cli import common, pipeline, remote
from ddft.cluster import free_port

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-never-print-me"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def commands(ap: argparse.ArgumentParser, prefix=()):
    """Every command path of the parser, groups included: ("adapters",), ("adapters", "upload"), ..."""
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from commands(sub, (*prefix, name))


def good_config(tmp_path: Path) -> str:
    path = tmp_path / "good.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "store": {"uri": str(tmp_path / "store")},
                "base": {"id": "tiny"},
                "jobs": [{"name": "video", "modality": "video"}],
            }
        )
    )
    return str(path)


# -- help ------------------------------------------------------------------------------------------


def test_every_command_has_help_with_an_example(capsys):
    paths = list(commands(cli.parser()))
    assert {
        ("train",),
        ("serve",),
        ("recipe",),
        ("adapters", "upload"),
        ("adapters", "delete"),
        ("tenants", "add"),
        ("tenants", "list"),
        ("tenants", "remove"),
        ("data", "prepare"),
    } <= set(paths)
    for path in paths:
        with pytest.raises(SystemExit) as done:
            cli.main([*path, "--help"])
        out = capsys.readouterr().out
        assert done.value.code == 0, path
        assert "example:" in out and "ddft " + path[0] in out.split("example:")[1], path
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert all(f"  {code}  " in out for code in range(5)) and "exit codes" in out


def test_real_subprocess_help_and_unreachable_server():
    ddft = REPO / ".venv" / "bin" / "ddft"
    base = [str(ddft)] if ddft.exists() else [sys.executable, "-m", "ddft.cli"]
    for argv in (base, [sys.executable, "-m", "ddft.cli"]):
        done = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "exit codes" in done.stdout
    done = subprocess.run(
        [*base, "tenants", "list", "--url", closed_url(), "--admin-key", SECRET],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 4, done.stderr
    assert "cannot reach the server" in done.stderr and "Traceback" not in done.stderr
    assert SECRET not in done.stdout + done.stderr
    done = subprocess.run([*base, "recipe"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1  # one line


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["adapters", "upload", "x", "y", "--modality", "audio"])
    assert done.value.code == 2 and "audio" in capsys.readouterr().err
    code, _, err = run(capsys, "recipe", "--url", "http://127.0.0.1:9")
    assert code == 2 and "VIDEO" in err
    code, _, err = run(capsys, "recipe", "no-such-clip.mp4", "--url", "http://127.0.0.1:9")
    assert code == 2 and "no-such-clip.mp4" in err
    code, _, err = run(capsys, "recipe", "--uri", "x.mp4", "--url", "ftp://127.0.0.1:9")
    assert code == 2 and "--url" in err


def test_missing_keys_exit_2_and_name_the_variable(capsys, monkeypatch):
    for var in (common.KEY_ENV, common.ADMIN_ENV):
        monkeypatch.delenv(var, raising=False)
    code, _, err = run(capsys, "tenants", "list", "--url", "http://127.0.0.1:9")
    assert code == 2 and "DDFT_ADMIN_KEY" in err and "--admin-key" in err
    code, _, err = run(capsys, "adapters", "delete", "mine", "--url", "http://127.0.0.1:9")
    assert code == 2 and "DDFT_API_KEY" in err


def test_bad_config_exits_2_naming_the_keys(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: {id: tiny}\njobs: []\nserve: {port: 0, engine: tgi}\n")
    for argv in (
        ["eval"],
        ["train"],
        ["train", "--address", closed_url()],
        ["base", "build"],
        ["serve"],
        ["adapters", "list"],
        ["data", "prepare"],
    ):
        code, _, err = run(capsys, *argv, "--config", str(bad))
        assert code == 2, argv
        assert "serve.port" in err and "serve.engine" in err and "jobs" in err, argv
        assert err.count("\n") == 1 and "Traceback" not in err, argv
    code, _, err = run(capsys, "eval", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml" in err


def test_eval_on_vllm_without_its_environment_says_how_to_get_it(capsys, tmp_path):
    """--engine vllm (or serve.engine vllm) checks serve.vllm.python before any set is read."""
    doc = yaml.safe_load(Path(good_config(tmp_path)).read_text())
    for engine, argv in (("vllm", []), ("hf", ["--engine", "vllm"])):
        doc["serve"] = {"engine": engine, "vllm": {"python": str(tmp_path / "no-venv/bin/python")}}
        (tmp_path / "eval.yaml").write_text(yaml.safe_dump(doc))
        code, out, err = run(capsys, "eval", "--config", str(tmp_path / "eval.yaml"), *argv)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert "no vLLM environment at" in err and "make venv-vllm" in err and "--engine hf" in err
    with pytest.raises(SystemExit):
        cli.main(["eval", "--config", "x.yaml", "--engine", "tgi"])
    assert "invalid choice: 'tgi'" in capsys.readouterr().err


def test_data_errors_print_as_what_they_are_with_the_fix(capsys, tmp_path, monkeypatch):
    """A dataset that can't be read is an expected error: its kind and fix, never "unexpected"."""
    import contextlib

    import ddft.cluster

    monkeypatch.setattr(ddft.cluster, "ray_session", contextlib.nullcontext)  # fails before Ray is needed
    (tmp_path / "store/datasets/raw/tasty/downloads").mkdir(parents=True)
    (tmp_path / "store/datasets/raw/tasty/downloads/tasty.tar").write_text("x")
    config = tmp_path / "c.yaml"
    config.write_text(
        f"store: {{uri: {tmp_path / 'store'}}}\nbase: {{id: tiny, build: tiny}}\n"
        "jobs: [{name: video, modality: video}]\n"
    )
    code, _, err = run(capsys, "data", "prepare", "--config", str(config))
    line = err.strip().splitlines()[-1]  # after the base build's progress bar
    assert code == common.REFUSED, err
    assert line.startswith("ddft data prepare: bad_data: Tasty: no recipe folders under ") and "unexpected" not in err
    assert "point data.tasty at the release's root" in line


def test_unreachable_server_and_cluster_exit_4(capsys, tmp_path, monkeypatch):
    url = closed_url()
    monkeypatch.setenv(common.URL_ENV, url)  # the URL from the environment
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\0" * 1000)
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    for argv in (
        ["recipe", str(clip)],
        ["recipe", "--uri", "x.mp4"],
        ["adapters", "list", "--key", SECRET],
        ["adapters", "upload", "n", str(folder), "--modality", "text", "--key", SECRET],
        ["adapters", "delete", "n", "--key", SECRET],
        ["tenants", "add", "n", "--admin-key", SECRET],
        ["tenants", "remove", "n", "--admin-key", SECRET],
    ):
        code, out, err = run(capsys, *argv)
        assert code == 4, (argv, err)
        assert url in err and SECRET not in out + err
    code, _, err = run(capsys, "train", "--config", good_config(tmp_path), "--address", url)
    assert code == 4 and "cannot reach the Ray cluster" in err


def test_upload_refuses_what_is_no_adapter_locally(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    for path in ("empty", "notes.txt", "missing"):
        code, _, err = run(
            capsys,
            "adapters",
            "upload",
            "n",
            str(tmp_path / path),
            "--modality",
            "text",
            "--key",
            SECRET,
            "--url",
            "http://127.0.0.1:9",
        )
        assert code == 2 and path in err, err


# -- training as a Ray job (a fake job server: the real one needs a cluster with a dashboard) ------


class FakeJobs:
    submitted: list = []
    final = "SUCCEEDED"

    def __init__(self, address):
        self.address = address

    def submit_job(self, entrypoint, runtime_env):
        FakeJobs.submitted.append((entrypoint, runtime_env))
        return "raysubmit_test"

    async def tail_job_logs(self, job_id):
        for chunk in ("training video\n", "job video succeeded\n"):
            yield chunk

    def get_job_status(self, job_id):
        from ray.job_submission import JobStatus

        return JobStatus(self.final)

    def get_job_info(self, job_id):
        return argparse.Namespace(message="Job entrypoint command failed with exit code 1")


def test_train_address_submits_streams_and_exits_with_the_job(capsys, tmp_path, monkeypatch):
    import ray.job_submission

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeJobs)
    config = good_config(tmp_path)
    code, out, err = run(
        capsys, "train", "--config", config, "--address", "http://127.0.0.1:8265", "--only", "video,text", "--force"
    )
    assert code == 0 and "training video" in out and "job video succeeded" in out and "raysubmit_test" in err
    entrypoint, env = FakeJobs.submitted[-1]
    assert entrypoint.startswith("python jobs/train_all.py --config ")
    assert entrypoint.endswith("--only video,text --force")
    assert env["working_dir"] == str(REPO)
    assert env["env_vars"]["DDFT_STORE"] == f"file://{tmp_path / 'store'}"  # absolute: the job runs in a copy
    inside = REPO / "jobs" / "configs" / "demo.yaml"
    assert (
        pipeline.job_spec(
            argparse.Namespace(config=str(inside), only=None, force=False), common.load_config(str(inside))
        )[0]
        == "python jobs/train_all.py --config jobs/configs/demo.yaml"
    )

    monkeypatch.setattr(FakeJobs, "final", "FAILED")
    code, out, err = run(capsys, "train", "--config", config, "--address", "http://127.0.0.1:8265")
    assert code == 1 and "raysubmit_test failed" in err and "exit code 1" in err
    code, out, err = run(capsys, "train", "--config", config, "--address", "http://127.0.0.1:8265", "--no-wait")
    assert code == 0 and out.strip() == "raysubmit_test"
    code, _, err = run(capsys, "train", "--config", config, "--no-wait")
    assert code == 2 and "--address" in err


def test_serve_checks_the_base_then_serves_blocking(capsys, tmp_path, monkeypatch):
    import contextlib
    import importlib.util

    import ddft.cluster

    calls = []

    @contextlib.contextmanager
    def fake_session(address=None, runtime_env=None, **kw):
        calls.append(("ray", address, runtime_env))
        yield None

    monkeypatch.setattr(ddft.cluster, "ray_session", fake_session)
    monkeypatch.setattr(pipeline, "serve_blocking", lambda config, engine: calls.append(("serve", config, engine)))
    config = good_config(tmp_path)
    code, _, err = run(capsys, "serve", "--config", config)
    assert code == 1 and "tiny" in err and "base" in err and not calls  # no base yet: nothing started

    from ddft.models.load import ensure_base
    from ddft.store import Store

    ensure_base(Store(str(tmp_path / "store")), "tiny", build="tiny")
    code, _, err = run(capsys, "serve", "--config", config)
    assert code == 0 and "127.0.0.1:8000" in err
    # No PYTHONPATH for Ray's workers: the serve package is installed beside ddft (pyproject.toml).
    assert calls[0] == ("ray", None, None)
    assert importlib.util.find_spec("serve").origin == str(REPO / "serve" / "__init__.py")
    assert calls[1] == ("serve", config, None)
    code, _, _ = run(capsys, "serve", "--config", config, "--engine", "vllm")
    assert code == 0 and calls[-1] == ("serve", config, "vllm")


def test_render_recipe():
    text = remote.render_recipe(
        {
            "ingredients": [
                {"name": "flour", "quantity": 1.5, "unit": "cup"},
                {"name": "salt", "quantity": None, "unit": None},
            ],
            "steps": ["Mix.", "Bake."],
            "text": "...",
            "adapter": "ddft/video/v1",
            "base": "tiny",
            "timings": {"decode_s": 0.1, "generate_s": 1.25, "total_s": 1.4, "new_tokens": 6},
        },
        "clip.mp4",
    )
    assert "adapter ddft/video/v1 on base tiny" in text
    assert "1 1/2  cup   flour" in text and "   1. Mix." in text and "   2. Bake." in text
    assert "generate 1.25 s" in text and "6 new tokens" in text
    empty = remote.render_recipe({"ingredients": [], "steps": [], "text": "hmm", "adapter": None}, "x")
    assert "  hmm" in empty and "(none: the base)" in empty


# -- against the running app -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    from tests.serve_fixture import running_app

    with running_app(tmp_path_factory.mktemp("cli")) as app:
        yield app


@pytest.mark.integration
def test_tenants_add_list_remove(app, capsys, monkeypatch):
    from tests.serve_fixture import ADMIN_KEY

    code, out, err = run(capsys, "tenants", "add", "gamma", "--url", app.url, "--admin-key", ADMIN_KEY)
    assert code == 0 and "shown this once" in err and ADMIN_KEY not in out + err
    key = out.strip()
    assert len(out.splitlines()) == 1 and key
    monkeypatch.setenv(common.ADMIN_ENV, ADMIN_KEY)  # the admin key from the environment
    monkeypatch.setenv(common.URL_ENV, app.url)
    code, out, _ = run(capsys, "tenants", "list")
    assert code == 0 and {"acme", "beta", "gamma"} <= set(out.split())
    code, out, err = run(capsys, "adapters", "list", "--key", key)  # the new key works
    assert code == 0 and out == "" and "no adapters yet" in err
    code, _, err = run(capsys, "tenants", "add", "gamma")
    assert code == 3 and "tenant_exists" in err and "409" in err
    code, _, err = run(capsys, "tenants", "add", "delta", "--admin-key", "wrong")
    assert code == 3 and "not_admin" in err and "wrong" not in err
    code, out, _ = run(capsys, "tenants", "remove", "gamma")
    assert code == 0 and "gamma" in out
    code, _, err = run(capsys, "adapters", "list", "--key", key)
    assert code == 3 and "bad_key" in err and key not in err


@pytest.mark.integration
def test_adapters_upload_list_delete(app, capsys, tmp_path, monkeypatch):
    from tests.test_serve import adapter_folder

    key = app.keys["beta"]
    monkeypatch.setenv(common.KEY_ENV, key)
    monkeypatch.setattr("ddft.cli.progress.enabled", lambda quiet: not quiet)  # the bar, as on a terminal
    folder = adapter_folder(app.store, tmp_path / "lora", seed=3)
    archive = tmp_path / "lora.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            tf.add(folder / name, arcname=f"lora/{name}")
    code, out, err = run(capsys, "adapters", "upload", "mine", str(folder), "--modality", "text", "--url", app.url)
    assert code == 0 and "tenant-beta/mine/v1" in out and "uploading" in err, err
    code, out, _ = run(
        capsys, "adapters", "upload", "packed", str(archive), "--modality", "image", "-q", "--url", app.url
    )
    assert code == 0 and "tenant-beta/packed/v1" in out
    code, out, _ = run(capsys, "adapters", "list", "--url", app.url)
    assert code == 0 and "tenant-beta/mine/v1" in out and "tenant-beta/packed/v1" in out and key not in out

    bad = tmp_path / "pickled"
    shutil.copytree(folder, bad)
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle: refused unopened
    code, _, err = run(capsys, "adapters", "upload", "evil", str(bad), "--modality", "text", "--url", app.url)
    assert code == 3 and "pickle_refused" in err and "HTTP 415" in err and "Traceback" not in err
    wide = adapter_folder(app.store, tmp_path / "wide", seed=4, rank=128)  # over serve.max_lora_rank
    code, _, err = run(capsys, "adapters", "upload", "wide", str(wide), "--modality", "text", "--url", app.url)
    assert code == 3 and "rank_too_high" in err

    for name in ("mine", "packed/v1"):
        code, out, _ = run(capsys, "adapters", "delete", name, "--url", app.url)
        assert code == 0 and "deleted tenant-beta/" in out
    code, out, _ = run(capsys, "adapters", "list", "--url", app.url)
    assert code == 0 and "mine" not in out and "packed" not in out
    code, _, err = run(capsys, "adapters", "delete", "mine", "--url", app.url)
    assert code == 3 and "unknown_adapter" in err


@pytest.mark.integration
def test_recipe_of_a_video(app, capsys, tmp_path, monkeypatch):
    from tests.serve_fixture import make_mp4

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(make_mp4())
    monkeypatch.setattr("ddft.cli.progress.enabled", lambda quiet: not quiet)
    code, out, err = run(capsys, "recipe", str(clip), "--url", app.url)
    assert code == 0 and "adapter ddft/video/v1 on base tiny" in out and "Timings:" in out
    assert "uploading clip.mp4" in err
    code, out, _ = run(
        capsys, "recipe", "--uri", "datasets/raw/clips/one.mp4", "--url", app.url, "--json", "--key", app.keys["acme"]
    )
    recipe = json.loads(out)
    assert recipe["adapter"] == "ddft/video/v1" and set(recipe) >= {"ingredients", "steps", "text", "timings"}
    code, _, err = run(capsys, "recipe", str(clip), "--url", app.url, "--adapter", "nope")
    assert code == 3 and "unknown_adapter" in err and "404" in err
