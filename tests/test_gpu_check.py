"""bench/gpu_check.py (`make gpu-check`) in seconds and without a GPU: the GPU parts skip saying why,
a GPU machine's outputs (faked) become each part's verdict and figures, a part out of time is
killed with its children, and one JSON line ends it. The real run is `make gpu-check`."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

from bench import gpu_check

pytestmark = pytest.mark.timeout(120)


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_without_cuda_the_gpu_parts_skip_saying_why(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(gpu_check, "cuda_device", lambda: None)
    assert gpu_check.main(["--parts", "gpu_tests,train_steps", "--logs", str(tmp_path)]) == 0
    out = last_json(capsys)
    assert out["bench"] == "gpu_check" and out["device"] == "cpu" and out["ok"] is True
    for name in ("gpu_tests", "train_steps"):
        assert out["parts"][name]["status"] == "skipped" and "no CUDA GPU" in out["parts"][name]["reason"]
    for name in ("vllm_equality", "serve_bench"):
        assert out["parts"][name]["status"] == "skipped" and "not selected" in out["parts"][name]["reason"]


def fake_gpu_machine(cmd, timeout, log: Path):
    """What each part's command prints on a GPU machine with CUDA vLLM: the vLLM check fails."""
    args = " ".join(cmd)
    if "7b_job" in args and "not 7b_job" not in args:
        steps = [
            {"job": j, "batch": 2, "ms_per_step": 50.0, "tokens_per_s": 9e4}
            for j in ("image", "video", "text", "joint")
        ]
        text, rc = "".join(f"GPU_STEP {json.dumps(s)}\n" for s in steps) + "4 passed in 30.1s\n", 0
    elif "-m gpu" in args:
        text, rc = "3 passed in 40.2s\n", 0
    elif gpu_check.VLLM_EQUALITY_CUDA in args:
        text, rc = "FAILED tests/test_gpu.py::test_cuda_vllm\n1 failed in 90.0s\n", 1
    else:
        assert cmd[-2:] == ["--engines", "hf"], cmd  # CUDA vLLM: the bench's vLLM half runs on the CPU device
        text, rc = 'engine hf: {}\n{"mixed_vs_base": 0.9, "hf_recipe_p50_vs_single": 1.4, "other": 1}\n', 0
    log.write_text(text)
    return rc


def test_on_a_gpu_each_part_reports_and_a_failure_fails_the_run(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(gpu_check, "cuda_device", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(gpu_check, "vllm_platform", lambda python: "cuda")
    monkeypatch.setattr(gpu_check, "run", fake_gpu_machine)
    assert gpu_check.main(["--logs", str(tmp_path)]) == 1
    out = last_json(capsys)
    parts = out["parts"]
    assert out["device"] == "NVIDIA H100 80GB HBM3" and out["vllm"] == "cuda" and out["ok"] is False
    assert parts["gpu_tests"]["status"] == "passed" and parts["gpu_tests"]["reason"] == "3 passed"
    assert parts["train_steps"]["status"] == "passed"
    assert sorted(parts["train_steps"]["figures"]) == ["image", "joint", "text", "video"]
    assert parts["vllm_equality"]["status"] == "failed" and "1 failed" in parts["vllm_equality"]["reason"]
    assert parts["serve_bench"] == {
        "status": "passed",
        "seconds": parts["serve_bench"]["seconds"],
        "reason": "",
        "figures": {"mixed_vs_base": 0.9, "hf_recipe_p50_vs_single": 1.4},
    }


def test_a_pytest_run_whose_tests_all_skip_is_skipped_with_their_reason(tmp_path):
    """The real pytest on this machine (no CUDA): the 7B-job steps skip, and the part says why."""
    part = gpu_check.pytest_part(["-m", "gpu", "tests/test_gpu.py", "-k", "7b_job"], 100, tmp_path / "log")
    if part.status == "passed":
        pytest.skip("this machine has CUDA: the steps ran")
    assert part.status == "skipped" and "needs a CUDA GPU" in part.reason, part


def test_a_part_out_of_time_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "pid"
    code = (
        "import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    t = time.perf_counter()
    assert gpu_check.run([sys.executable, "-c", code], 2, tmp_path / "log") is None
    assert time.perf_counter() - t < 20
    child = int(pid_file.read_text())
    for _ in range(50):
        if gone(child):
            break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        pytest.fail("the part's child outlived its timeout")


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie waiting for its new parent to reap it."""
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


def test_no_vllm_venv_is_none():
    assert gpu_check.vllm_platform("/nonexistent/bin/python") is None
