"""The whole DDFT loop on one machine: what `make demo` runs.

    python jobs/demo.py --config jobs/configs/demo.yaml [--keep-serving]

Local Ray cluster on 127.0.0.1 -> embedded base in the store -> synthetic kitchen -> Ray Data
preparation -> `ray job submit ... jobs/train_all.py` (three Ray Train jobs at once) -> the Serve
app with the three adapters -> a held-out video through POST /v1/recipes -> summary.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from ddft import client, config
from ddft.cluster import LOCAL_IP, ray_session
from ddft.data import formats
from ddft.data.prepare import PrepareError, prepare_all
from ddft.recipes import format_quantity
from ddft.store import Store, StoreError
from ddft.train.launcher import read_results

REPO = Path(__file__).resolve().parents[1]

GCS_PORT, DASHBOARD_PORT = 6380, 8265
ADDRESS, DASHBOARD = f"{LOCAL_IP}:{GCS_PORT}", f"http://{LOCAL_IP}:{DASHBOARD_PORT}"
# Serve replicas import serve.app from the repo and read the same store as this process.
RUNTIME_ENV = {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}
# `ray start` turns on token auth (token in ~/.ray/auth_token); clients must say so to send it.
RAY_AUTH = {"RAY_AUTH_MODE": "token"}
MARKER = REPO / ".demo" / "cluster-started"  # the demo stops only a cluster it started


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _env() -> dict:
    # Ray job entrypoints run `python` from the cluster's PATH: make it this venv's.
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        **RAY_AUTH,
    }


def _aws_env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def ensure_cluster(num_cpus: int) -> bool:
    """Reuse a running local cluster, else start one with the dashboard (for `ray job submit`)."""
    with socket.socket() as probe:  # `ray status` on a dead address retries for a long time
        listening = probe.connect_ex((LOCAL_IP, GCS_PORT)) == 0
    if listening:
        print(f"reusing the Ray cluster at {ADDRESS}")
        return False
    subprocess.run(
        [
            _ray_bin(),
            "start",
            "--head",
            f"--node-ip-address={LOCAL_IP}",
            f"--port={GCS_PORT}",
            "--include-dashboard=true",
            f"--dashboard-host={LOCAL_IP}",
            f"--dashboard-port={DASHBOARD_PORT}",
            f"--num-cpus={num_cpus}",
            "--disable-usage-stats",
        ],
        env=_env(),
        check=True,
    )
    MARKER.parent.mkdir(exist_ok=True)
    MARKER.write_text(ADDRESS)
    return True


def stop_cluster() -> None:
    if MARKER.exists():
        subprocess.run([_ray_bin(), "stop"], env=_env(), check=False)
        MARKER.unlink()


def submit_training(config_path: str, cfg: config.PipelineConfig, store: Store, retrain: bool = False) -> list:
    """The documented command, with the store made absolute (the job's working dir is a copy); the
    jobs' outcomes come from the store (runs/_results), where the job wrote them."""
    env_vars = {"DDFT_STORE": store.uri, **_aws_env()}
    cmd = [
        _ray_bin(),
        "job",
        "submit",
        "--address",
        DASHBOARD,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps({"env_vars": env_vars}),
        "--",
        "python",
        "jobs/train_all.py",
        "--config",
        config_path,
    ] + (["--force"] if retrain else [])
    print(
        "$ ray job submit --working-dir . -- python jobs/train_all.py --config",
        config_path,
        "--force" if retrain else "",
    )
    submitted = time.time()
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "Reporting training result" not in line:  # one line per step per job is too much here
            sys.stdout.write(line)
    names = [j.name for j in cfg.jobs]
    results = read_results(store, names, since=submitted)
    if proc.wait() != 0 or len(results) != len(names):
        raise SystemExit(f"training job failed (exit {proc.returncode}); see the log above")
    return [results[n] for n in names]


def try_it(cfg: config.PipelineConfig, store: Store, config_path: Path, engine: str | None = None) -> dict:
    """Start the Serve app and ask it one recipe, one dish and one cooking question over HTTP."""
    from serve.app import run

    url = run(config_path, engine=engine)
    print(f"\nserving on engine {engine or cfg.serve.engine} at {url}")
    raw = cfg.data.raw_prefix
    held_out = [
        r
        for r in formats.read_tasty(
            store, f"{raw}/{cfg.data.tasty}", split_set=cfg.data.tasty_split, unlisted=cfg.data.tasty_unlisted
        )
        if r.split == "test"
    ][0]
    recipe = client.post_recipe(url, store.read_bytes(held_out.video_key))
    print(f"\n=== POST /v1/recipes  (held-out video {held_out.id}, answered by {recipe['adapter']}) ===")
    for ing in recipe["ingredients"]:
        amount = " ".join(x for x in (format_quantity(ing["quantity"]) if ing["quantity"] else "", ing["unit"]) if x)
        print(f"  - {amount} {ing['name']}".replace("  ", " "))
    for i, step in enumerate(recipe["steps"], 1):
        print(f"  {i}. {step}")
    print(f"  (expected:\n    {held_out.text.replace(chr(10), chr(10) + '    ')})")
    foodx = formats.read_foodx(store, f"{raw}/{cfg.data.foodx}")
    key, _, dish = foodx.splits["val"][0]
    image = client.generate(url, "image", image_bytes=store.read_bytes(key))
    print(
        f"\n=== POST /v1/generate image ({key.rsplit('/', 1)[-1]}, a {dish.replace('_', ' ')}) ===\n"
        f"  {image['answer']!r}  <- {image['adapter']}"
    )
    question = formats.read_qa(store, f"{raw}/{cfg.data.qa}")[0][0]
    text = client.generate(url, "text", question=question)
    print(f"\n=== POST /v1/generate text ({question!r}) ===\n  {text['answer']!r}  <- {text['adapter']}")
    return {"recipe": recipe, "image": image, "text": text}


def main() -> int | str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="jobs/configs/demo.yaml")
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local cluster")
    ap.add_argument("--keep-serving", action="store_true", help="leave the cluster and the app running")
    ap.add_argument(
        "--retrain",
        action="store_true",
        help="train again even when the adapters were published from the same settings and data",
    )
    ap.add_argument(
        "--engine",
        choices=("hf", "vllm"),
        help="serve with this engine (default: the config's serve.engine); vllm runs in its own venv (make venv-vllm)",
    )
    args = ap.parse_args()
    try:
        return run(Path(args.config).resolve(), args.num_cpus, args.keep_serving, args.retrain, args.engine)
    except (config.ConfigError, StoreError, PrepareError, client.ClientError) as err:
        return f"demo stopped: {err}"  # a clear message, not a traceback from deep inside Ray


def run(config_path: Path, num_cpus: int, keep_serving: bool, retrain: bool = False, engine: str | None = None) -> int:
    cfg = config.load(config_path)
    store = Store.from_config(cfg.store)
    os.environ.update(RAY_AUTH)
    os.environ["DDFT_STORE"] = store.uri  # every process (jobs, replicas) sees the same store
    RUNTIME_ENV["env_vars"].update({"DDFT_STORE": store.uri, **_aws_env()})
    store.exists(f"models/{cfg.base.id}")  # an unreachable store or missing bucket fails here, first
    times, t = {}, time.time()
    started = ensure_cluster(num_cpus)
    times["cluster"] = time.time() - t
    try:
        with ray_session(address=ADDRESS, runtime_env=RUNTIME_ENV):
            t = time.time()
            prepared = prepare_all(cfg)  # base, kitchen, Ray Data preparation
            times["base + kitchen + prepare"] = time.time() - t
        t = time.time()
        results = submit_training(
            str(config_path.relative_to(REPO) if config_path.is_relative_to(REPO) else config_path), cfg, store, retrain
        )
        times["train (ray job submit)"] = time.time() - t
        with ray_session(address=ADDRESS, runtime_env=RUNTIME_ENV):
            t = time.time()
            answers = try_it(cfg, store, config_path, engine)
            times["serve + requests"] = time.time() - t
            if not keep_serving:
                from ray import serve

                serve.shutdown()
    finally:
        if started and not keep_serving:
            stop_cluster()
    print("\n=== summary ===")
    for stage, s in times.items():
        print(f"  {stage:28} {s:7.1f} s")
    for p in prepared:
        print(f"  prepared {p.summary()}\n    at {store.url(p.key)}")
    for r in results:
        print(
            f"  job {r.name:6} {r.status:9} steps {r.steps:3}  loss {r.losses[0]:.3f} -> "
            f"{r.losses[-1]:.3f}  {r.tokens_per_s:.0f} tokens/s  adapter {r.adapter}"
        )
    print(
        f"  recipe answered by {answers['recipe']['adapter']} on engine {engine or cfg.serve.engine}; "
        f"base {store.url('models/' + cfg.base.id)}"
    )
    if keep_serving:
        print(f"  serving at http://{cfg.serve.host}:{cfg.serve.port} (stop it: make cluster-down)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
