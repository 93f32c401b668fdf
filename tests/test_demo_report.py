"""`make demo` reads like a report: the pieces (sparkline, tables, stage lines), the routing of every
log into a file, and the demo's whole terminal output on a non-terminal (at most 60 lines, no ANSI)
driven through jobs/demo.py's own run() with recorded stage results; then (slow) the real demo on a
tiny config."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from ddft.cli import report
from ddft.cli.report import BLOCKS, Console, logs_to, loss_table, recipe_tables, sparkline, table
from ddft.data.prepare import Prepared
from ddft.recipes import Ingredient
from ddft.train.job import JobResult
from tests.cluster_fixture import fresh_home

REPO = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[|\r")
MAX_LINES = 60

# A decreasing curve like the demo's image job (30 steps, 8.4 -> 0.7).
CURVE = [round(0.7 + 7.7 * math.exp(-i / 4), 4) for i in range(30)]


# --- the pieces ----------------------------------------------------------------------------------


def test_sparkline_draws_a_loss_curve_from_highest_to_lowest_block():
    line = sparkline(CURVE)
    assert len(line) == 30 and line[0] == "█" and line[-1] == "▁" and set(line) <= set(BLOCKS)
    assert list(line) == sorted(line, key=BLOCKS.index, reverse=True)  # never goes up


def test_sparkline_averages_a_long_curve_into_its_width_and_skips_gaps():
    assert len(sparkline(range(1000), width=20)) == 20
    assert sparkline([3.0, None, float("nan"), 1.0]) == "█▁"
    assert sparkline([]) == "" and sparkline([None]) == ""
    assert len(set(sparkline([2.0] * 5))) == 1  # flat: one level
    assert set(sparkline(CURVE, ascii=True)) <= set(report.ASCII_BLOCKS)


def test_table_aligns_underlines_and_clips():
    rows = table([("image", "30", "x" * 100), ("text", "7", "ok")], ("job", "steps", "note"), align="lr", max_width=10)
    assert rows[0].split() == ["job", "steps", "note"] and set(rows[1].replace(" ", "")) == {"─"}
    assert rows[2].startswith("image     30  xxxxxxxxx…")
    assert rows[3].startswith("text       7  ok")
    assert table([("a", "b")], ("h", "i"), ascii=True)[1] == "-  -"


def test_stage_line_on_a_non_terminal_is_one_plain_line_per_stage():
    buf = io.StringIO()
    out = Console(buf)
    assert not out.tty and not out.live
    with out.stage("train (ray job submit)", "running") as st:
        st.done("image, video, text succeeded")
    with pytest.raises(RuntimeError), out.stage("serve + requests") as st:
        st.failure = "failed; the log: /x.log"
        raise RuntimeError("boom")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and not ANSI.search(buf.getvalue())
    assert lines[0].startswith("✓ train (ray job submit)") and lines[0].endswith("s  image, video, text succeeded")
    assert lines[1].startswith("✗ serve + requests") and lines[1].endswith("failed; the log: /x.log")
    assert out.style("x", "bold") == "x"


def test_stage_on_a_terminal_spins_then_leaves_its_line(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    buf = io.StringIO()
    out = Console(buf, tty=True)
    polled = []
    with out.stage("train", "0/3 jobs done", poll=lambda: polled.append(1) or "1/3 jobs done") as st:
        time.sleep(0.35)
        st.done("3 jobs")
    text = buf.getvalue()
    assert "\r" in text and "0/3 jobs done" in text  # the spinner's redraws
    assert text.rstrip().splitlines()[-1].endswith("3 jobs") and "\x1b[32m✓" in text
    assert polled  # asked for the note while it ran


def test_ascii_terminal_gets_ascii_marks():
    buf = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    out = Console(buf)
    assert out.ascii
    with out.stage("cluster") as st:
        st.done("started")
    buf.flush()
    assert buf.buffer.getvalue().decode().startswith("ok cluster")


def _results() -> list[JobResult]:
    return [
        JobResult("image", "image", "succeeded", 0, 60, 30, CURVE, [{"loss": 1.2007}], 47.3, adapter="file:///s/a/1"),
        JobResult("video", "video", "skipped", 0, 0, 30, [1.7511, 0.3142], [{"loss": 0.4015}], 74.0),
        JobResult("text", "text", "failed", 0, 5, error="RuntimeError: out of memory"),
    ]


def test_loss_table_has_one_row_per_job_with_its_curve():
    lines = loss_table(_results(), curves={"video": CURVE[::-1]})
    assert len(lines) == 2 + 3
    image, video, text = lines[2:]
    assert "8.400" in image and sparkline(CURVE) in image and f"{CURVE[-1]:.3f}" in image and "1.201" in image
    assert sparkline(CURVE[::-1]) in video  # the whole curve, where the result keeps two points
    assert "failed" in text and "RuntimeError: out of memory" in text


def test_recipe_tables_put_the_served_recipe_beside_the_expected_one():
    served = {
        "ingredients": [{"name": "milk", "quantity": 1.0, "unit": "cup"}, {"name": "egg", "quantity": 2, "unit": None}],
        "steps": ["Add the milk to the pot.", "Serve."],
    }
    expected = [Ingredient("cheese", 200.0, "g"), Ingredient("oil", 3.0, "tbsp"), Ingredient("tomato", 2.0)]
    lines = recipe_tables(served, expected, ["Add the cheese to the pot.", "Stir.", "Serve."])
    assert lines[0].split() == ["quantity", "unit", "ingredient", "expected"]
    assert lines[2].split() == ["1", "cup", "milk", "200", "g", "cheese"]
    assert lines[3].split() == ["2", "egg", "3", "tbsp", "oil"]
    assert lines[4].split() == ["2", "tomato"]
    assert lines[5].split() == ["#", "step", "expected"]
    assert "Add the milk to the pot." in lines[7] and "Add the cheese to the pot." in lines[7]
    assert lines[9].split() == ["3", "Serve."]
    many = recipe_tables({"ingredients": [{"name": f"i{n}"} for n in range(30)], "steps": []})
    assert len(many) == 2 + report.MAX_ROWS + 2 and many[2 + report.MAX_ROWS - 1] == "… 23 more"


def test_logs_to_sends_everything_but_the_report_to_the_file(tmp_path, capfd):
    log = tmp_path / "logs" / "demo.log"
    with logs_to(log) as terminal:
        print("python print")
        sys.stderr.write("python stderr\n")
        os.write(1, b"fd 1\n")
        os.write(2, b"fd 2\n")
        subprocess.run([sys.executable, "-c", "import sys; print('child'); print('child err', file=sys.stderr)"])
        sys.stderr.write(warnings.formatwarning("a warning", UserWarning, "worker.py", 1))  # as Python prints one
        terminal.write("the report\n")
    print("after")
    out, err = capfd.readouterr()
    assert out == "the report\nafter\n" and err == ""
    logged = log.read_text()
    for text in ("python print", "python stderr", "fd 1", "fd 2", "child", "child err", "UserWarning: a warning"):
        assert text in logged


def test_read_only_arrays_train_and_serve_without_a_torch_warning():
    """Ray hands numpy arrays over read-only (Data batches, object store): pad_batch and
    pixel_inputs must not pass them to torch as they are ("The given NumPy array is not writable")."""
    from ddft.models.build import build_tiny
    from ddft.prompts import pad_batch, pixel_inputs

    _, processor = build_tiny()

    def read_only(a: np.ndarray) -> np.ndarray:
        return np.frombuffer(a.tobytes(), dtype=a.dtype).reshape(a.shape)

    ids = read_only(np.arange(6, dtype=np.int32))
    video = read_only(np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = pad_batch([{"input_ids": ids, "labels": ids}, {"input_ids": [1, 2], "labels": [1, 2]}], 0)
        pixels = pixel_inputs(processor, "video", [video])
    assert not [w for w in caught if "not writable" in str(w.message)]
    assert batch["input_ids"][0].tolist() == list(range(6)) and batch["input_ids"][1].tolist() == [0] * 4 + [1, 2]
    assert pixels["pixel_values_videos"].shape[:2] == (1, 2)
    assert not video.flags.writeable  # the caller's array is left as it was


# --- the demo's terminal output, through its own run() -------------------------------------------


def load_demo():
    spec = importlib.util.spec_from_file_location("ddft_demo_under_test", REPO / "jobs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def _prepared() -> list[Prepared]:
    none = {"total": 0, "by_reason": {}, "examples": []}
    counts = {"image": {"train": 36, "val": 12}, "video": {"train": 10, "val": 2, "test": 4}, "text": {"train": 42}}
    return [
        Prepared(m, f"{m}0123456789ab", f"datasets/prepared/{m}/{m}0123456789ab", c, none, 1.0, False, none, {}, None)
        for m, c in counts.items()
    ]


def _answers() -> dict:
    return {
        "recipe": {
            "ingredients": [{"name": "milk", "quantity": 1.0, "unit": "cup"}, {"name": "egg", "quantity": 2.0}],
            "steps": ["Add the flour to the pot.", "Pour the egg into the pot.", "Serve the pot.", "Enjoy!"],
            "text": "...",
            "adapter": "ddft/video/v2",
            "timings": {"total_s": 4.79},
        },
        "image": {"answer": "orange cake", "adapter": "ddft/image/v2"},
        "text": {"answer": "add", "adapter": "ddft/text/v2"},
        "url": "http://127.0.0.1:8000",
        "engine": "hf",
        "held_out": {
            "id": "cheese_toast_0003",
            "title": "Cheese toast",
            "ingredients": [
                Ingredient("cheese", 200.0, "g"),
                Ingredient("oil", 3.0, "tbsp"),
                Ingredient("tomato", 2.0),
            ],
            "steps": ["Add the cheese to the pot.", "Pour the oil into the pot.", "Stir the pot.", "Enjoy!"],
        },
        "named": {"of": 3, "own": 0, "other": 1, "other_id": "rice_pudding_0001"},
        "image_file": "val_00000.jpg",
        "dish": "tomato soup",
        "question": "What do you do with milk?",
    }


def _noise(what: str, lines: int) -> None:
    """What Ray, its workers and the training job print: progress bars, warnings, subprocess output."""
    for i in range(lines):
        print(f"({what} pid=1) Running Dataset: {i}/{lines} rows [00:01, 3 row/s]")
    os.write(2, f"({what}) [raylet] WARNING: 18 PYTHON worker processes have been started\n".encode())
    sys.stderr.write(f"({what}) UserWarning: The given NumPy array is not writable\n")
    subprocess.run([sys.executable, "-c", f"print('({what}) ray cli output')"])


@pytest.fixture
def demo_run(tmp_path, monkeypatch, capfd):
    """jobs/demo.py's run() with every stage's work replaced by a recording of it (noise included):
    what the terminal shows, what the log file holds, and the calls made."""
    store = tmp_path / "store"
    for name in ("DDFT_STORE", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_COLOR_PREFIX"):
        monkeypatch.setenv(name, str(store) if name == "DDFT_STORE" else "")  # run() sets them: restored after
    cfg_path = tmp_path / "demo.yaml"
    cfg_path.write_text((REPO / "jobs/configs/demo.yaml").read_text())
    demo = load_demo()
    monkeypatch.setattr(demo, "RAY_TEMP", tmp_path / "ray")  # where run() keeps the (never started) cluster's token
    # the environment only (restored after): this process's Ray keeps the session cluster's token
    monkeypatch.setattr(demo, "use_token_here", lambda folder: demo.use_token(os.environ, folder))
    calls = []
    # A skipped job keeps only its first and last loss; the report reads its run for the whole curve.
    results = _results()
    results[1].adapter = f"file://{store}/adapters/ddft/video/v2"
    (store / "adapters/ddft/video/v2").mkdir(parents=True)
    (store / "adapters/ddft/video/v2/manifest.json").write_text(
        json.dumps({"metrics": {"run": f"file://{store}/runs/video-abc"}})
    )
    for step in (20, 30):
        (store / f"runs/video-abc/checkpoint_{step}").mkdir(parents=True)
        (store / f"runs/video-abc/checkpoint_{step}/train_state.json").write_text(
            json.dumps({"step": step, "losses": CURVE[:step]})
        )

    def prepare_all(cfg):
        calls.append("prepare_all")
        logging.getLogger("ddft.data.prepare").info("prepared image: read 48")
        _noise("prepare", 300)
        return _prepared()

    def submit_training(shown, cfg, store_, retrain, env_vars=None):
        calls.append(("submit_training", shown, retrain, env_vars))
        _noise("RayTrainWorker", 3000)
        return results

    def try_it(cfg, store_, config_path, engine):
        calls.append(("try_it", engine))
        _noise("ServeReplica", 200)
        return _answers()

    monkeypatch.setattr(
        demo, "ensure_cluster", lambda n: calls.append(("ensure_cluster", n)) or _noise("ray", 30) or True
    )
    monkeypatch.setattr(demo, "stop_cluster", lambda: calls.append("stop_cluster") or _noise("ray stop", 10))
    monkeypatch.setattr(demo, "ray_session", lambda **kw: contextlib.nullcontext())
    monkeypatch.setattr(demo, "quiet_ray_data", lambda: calls.append("quiet_ray_data"))
    monkeypatch.setattr(demo, "stop_serving", lambda: calls.append("stop_serving"))
    monkeypatch.setattr(demo, "prepare_all", prepare_all)
    monkeypatch.setattr(demo, "submit_training", submit_training)
    monkeypatch.setattr(demo, "try_it", try_it)

    def go(**kw):
        code = demo.run(cfg_path, 4, False, **kw)
        out, err = capfd.readouterr()
        return code, out, err, calls

    go.store, go.demo, go.config = store, demo, cfg_path
    return go


def test_the_demo_on_a_non_terminal_is_a_short_plain_report(demo_run):
    code, out, err, calls = demo_run()
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) <= MAX_LINES, out
    assert not ANSI.search(out)
    # No log line came through: they are all in the file.
    assert "Running Dataset" not in out and "not writable" not in out and "cli output" not in out
    # The stages, in order, one line each.
    stages = [line.split("  ")[0] for line in lines if line[:2] in ("✓ ", "✗ ")]
    assert [s.strip() for s in stages] == [
        "✓ cluster",
        "✓ base + kitchen + prepare",
        "✓ train (ray job submit)",
        "✓ serve + requests",
        "✓ stop the cluster",
    ]
    # The log file, printed once, holds every log line.
    (logline,) = [line for line in lines if line.startswith("logs: ")]
    log = Path(logline.split()[1])
    assert log.parent == demo_run.store / "logs" and re.fullmatch(r"demo-\d{8}-\d{6}\.log", log.name)
    assert out.count(str(log)) == 2  # at the top, and in the summary
    logged = log.read_text()
    for text in ("Running Dataset: 2999/3000", "not writable", "(ServeReplica) ray cli output", "prepared image"):
        assert text in logged
    # Losses (the skipped job's whole curve from its run), the recipe table, the answers, the summary.
    assert sparkline(CURVE) in out and sparkline(CURVE[:30]) in out
    assert re.search(rf"video\s+skipped\s+30\s+8\.400\s+{sparkline(CURVE)}\s+{CURVE[-1]:.3f}", out)
    assert "RuntimeError: out of memory" in out
    assert re.search(r"1\s+cup\s+milk\s+200 g cheese", out)
    assert "held-out video cheese_toast_0003 (Cheese toast)" in out and "ddft/video/v2 in 4.8 s" in out
    # whether the adapter read the video: the same request shown another video
    assert "ingredients named: 0 of 3 from its own video; shown another video (rice_pudding_0001): 1 of 3" in out
    assert "'orange cake'" in out and "'add'" in out
    for row in ("store", "base", "prepared", "adapters", "eval", "serving", "logs", "total"):
        assert re.search(rf"^  {row}\s", out, re.M), row
    assert "none yet: ddft eval --config" in out
    # What ran, with the quiet settings: Ray Data's bars off here and in the training job.
    assert ("ensure_cluster", 4) in calls and "quiet_ray_data" in calls and "stop_serving" in calls
    (submitted,) = [c for c in calls if c[0] == "submit_training"]
    assert submitted[3] == {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_COLOR_PREFIX": "0"}
    assert calls[-1] == "stop_cluster"


def test_the_demo_verbose_prints_the_logs_and_still_the_report(demo_run):
    code, out, err, calls = demo_run(verbose=True)
    assert code == 0
    assert "Running Dataset: 2999/3000" in out and "not writable" in err
    assert "✓ serve + requests" in out and "where things landed" in out and "logs: " not in out
    assert "quiet_ray_data" not in calls
    (submitted,) = [c for c in calls if c[0] == "submit_training"]
    assert submitted[3] is None


def test_a_failed_training_job_shows_its_last_lines_and_the_same_error(demo_run, monkeypatch, capfd):
    demo = demo_run.demo

    def failing(*a, **kw):
        _noise("RayTrainWorker", 100)
        raise demo.TrainingFailed("training job failed (exit 1); see the log above", ["job image failed: boom"])

    monkeypatch.setattr(demo, "submit_training", failing)
    with pytest.raises(SystemExit, match=r"^training job failed \(exit 1\); see the log above$"):
        demo_run()
    out, err = capfd.readouterr()
    lines = out.splitlines()
    assert lines[-3:-1] == ["  | job image failed: boom", lines[-2]] and lines[-2].startswith(
        "✗ train (ray job submit)"
    )
    assert "failed; the log: " in lines[-2] and lines[-1].startswith("✓ stop the cluster")
    assert "Running Dataset" not in out and err == ""


def test_a_data_error_stops_the_demo_with_its_one_line(demo_run, monkeypatch, capfd):
    from ddft.data.prepare import PrepareError

    demo = demo_run.demo

    def bad(cfg):
        _noise("prepare", 50)
        raise PrepareError("video: no usable sample")

    monkeypatch.setattr(demo, "prepare_all", bad)
    monkeypatch.setattr(sys, "argv", ["demo.py", "--config", str(demo_run.config)])
    assert demo.main() == "demo stopped: video: no usable sample"
    out = capfd.readouterr().out
    assert re.search(r"^✗ base \+ kitchen \+ prepare .* failed; the log: \S+\.log$", out, re.M)
    assert "Running Dataset" not in out


# --- the real demo, on a tiny config --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(960)  # the demo's own subprocess timeout (900 s) speaks first
def test_the_real_demo_on_a_tiny_config_is_a_short_report(tmp_path, ray_cluster):
    """...and stops the cluster it started and no other: this process holds the session's cluster
    meanwhile (its driver would exit the process if that cluster's GCS went away, as `ray stop` did)."""
    from ddft.cluster import free_port

    port = free_port()
    cfg = yaml.safe_load((REPO / "jobs/configs/demo.yaml").read_text())
    cfg["store"]["uri"] = str(tmp_path / "store")
    cfg["base"] = {"id": "tiny", "build": "tiny"}
    cfg["data"]["synthetic"] = {
        "seed": 0,
        "dishes": 3,
        "held_out_dishes": 1,
        "images_per_dish": 4,
        "recipes": 6,
        "qa_pairs": 24,
    }
    for job in cfg["jobs"]:
        job["optim"]["max_steps"] = 4
    cfg["serve"]["port"] = port
    path = tmp_path / "demo.yaml"
    path.write_text("# make demo CONFIG=...\n" + yaml.safe_dump(cfg))
    # a new user's home (nothing in ~/.ray) and none of this session's cluster settings
    env = {k: v for k, v in os.environ.items() if k != "DDFT_STORE" and not k.startswith("RAY_")}
    env["HOME"] = str(fresh_home(tmp_path))
    t = time.time()
    proc = subprocess.run(
        [sys.executable, "jobs/demo.py", "--config", str(path), "--retrain"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    took = time.time() - t
    out = proc.stdout
    assert proc.returncode == 0, (out, proc.stderr[-3000:])
    lines = out.splitlines()
    print(f"the tiny demo: {took:.0f} s, {len(lines)} lines\n{out}")
    assert len(lines) <= MAX_LINES and not ANSI.search(out), out
    for stage in ("cluster", "base + kitchen + prepare", "train (ray job submit)", "serve + requests"):
        assert re.search(rf"^✓ {re.escape(stage)}\s", out, re.M), stage
    assert re.search(r"^  image\s+succeeded\s+4\s", out, re.M) and "where things landed" in out
    assert "POST /v1/recipes" in out and len(lines) + len(proc.stderr.splitlines()) <= MAX_LINES, proc.stderr
    assert re.search(
        r"^  ingredients named: \d of \d from its own video; shown another video \(\S+\): \d of \d$", out, re.M
    )
    log = Path(next(line for line in lines if line.startswith("logs: ")).split()[1])
    assert "jobs/train_all.py" in log.read_text()
    assert not (Path(env["HOME"]) / ".ray").exists()  # its cluster's token is its own, not the home's
    assert ray_cluster.is_initialized() and ray_cluster.cluster_resources().get("CPU")  # the other cluster lives
    assert ray_cluster.get(ray_cluster.remote(lambda: 1).remote(), timeout=120) == 1
