"""make bench-serve: multi-LoRA serving on the embedded base (the demo's), all in one run.

  engine   (bench/serve_engine.py, before any Ray process exists) 8 requests x 64 new tokens:
           the batch on the base alone, the batch mixing 8 different adapters (batched LoRA),
           and the same 8 one at a time switching the adapter -> mixed_vs_base, mixed_vs_switching.
  http     the Serve app (one ModelServer replica) on a local Ray cluster, over 127.0.0.1:
           hot_load_ms: a tenant's upload accepted (PUT /v1/adapters answered) -> the answer of
           a request using it with max_tokens 1 (its first token), for --uploads fresh adapters;
           recipe_ms: POST /v1/recipes (a video upload) with 8 concurrent clients.
The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "platform"), str(REPO)]

from ddft import client, config  # noqa: E402
from ddft.store import Store  # noqa: E402

ADMIN_KEY = "bench-admin-key"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def fresh_adapters(store: Store, base_id: str, out: Path, n: int, rank: int = 8) -> list[Path]:
    """n PEFT LoRA folders with different weights (one random adapter, perturbed per copy)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    from ddft.models.load import load_base, local_base_dir

    model, _ = load_base(local_base_dir(store, base_id))
    torch.manual_seed(0)
    get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=config.LM_TARGETS,
                                     init_lora_weights=False)).save_pretrained(out / "a0")
    tensors = load_file(out / "a0" / "adapter_model.safetensors")
    folders = []
    for i in range(n):
        folder = out / f"a{i}"
        folder.mkdir(exist_ok=True)
        (folder / "adapter_config.json").write_bytes((out / "a0" / "adapter_config.json").read_bytes())
        save_file({k: v + 0.01 * (i + 1) * torch.randn_like(v) for k, v in tensors.items()},
                  str(folder / "adapter_model.safetensors"))
        folders.append(folder)
    return folders


def video_bytes() -> bytes:
    import numpy as np

    from ddft.data.synthetic import encode_mp4

    rng = np.random.default_rng(0)
    return encode_mp4([rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(16)], fps=8)


def http_bench(cfg_path: Path, store: Store, base_id: str, uploads: int, recipes: int, clients: int) -> dict:
    from ray import serve

    from ddft.cluster import ray_session
    from serve.app import run

    with tempfile.TemporaryDirectory(prefix="ddft-bench-serve-") as tmp, \
            ray_session(num_cpus=4, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}}):
        os.environ["DDFT_ADMIN_KEY"] = ADMIN_KEY
        try:
            url = run(cfg_path)
        finally:
            del os.environ["DDFT_ADMIN_KEY"]
        try:
            tenant = f"bench{int(time.time())}"
            key = client.add_tenant(url, tenant, admin_key=ADMIN_KEY)
            folders = fresh_adapters(store, base_id, Path(tmp), uploads)
            client.generate(url, "text", "Warm up?", max_new_tokens=1)
            hot = []
            for i, folder in enumerate(folders):
                client.upload_adapter(url, f"hot{i}", folder, "text", api_key=key)
                t = time.perf_counter()
                out = client.generate(url, "text", "How long do I boil an egg?", api_key=key, adapter=f"hot{i}",
                                      max_new_tokens=1)
                hot.append((time.perf_counter() - t) * 1000)
                assert out["adapter"] == f"tenant-{tenant}/hot{i}/v1", out
            for i in range(uploads):
                client.delete_adapter(url, f"hot{i}", api_key=key)
            video = video_bytes()
            client.post_recipe(url, video)  # warm-up

            def one(_):
                t = time.perf_counter()
                client.post_recipe(url, video)
                return (time.perf_counter() - t) * 1000

            with ThreadPoolExecutor(clients) as pool:
                times = list(pool.map(one, range(recipes)))
        finally:
            serve.shutdown()
    return {"hot_load_p50_ms": round(statistics.median(hot), 1), "hot_load_max_ms": round(max(hot), 1),
            "recipe_p50_ms": round(pct(times, 0.5), 1), "recipe_p99_ms": round(pct(times, 0.99), 1),
            "recipe_requests": len(times), "recipe_clients": clients}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "jobs/configs/demo.yaml"))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--uploads", type=int, default=7)
    ap.add_argument("--recipes", type=int, default=24, help="recipe requests in all, over --clients clients")
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args(argv)
    cfg = config.load(Path(args.config))
    store = Store.from_config(cfg.store)
    from ddft.models.load import ensure_base

    ensure_base(store, cfg.base.id, build=cfg.base.build, source=cfg.base.source)
    from bench.serve_engine import engine_bench

    engine = engine_bench(store, cfg.base.id, adapters=8, batch=8, new_tokens=args.new_tokens)
    print("engine:", json.dumps(engine), flush=True)
    with tempfile.TemporaryDirectory(prefix="ddft-bench-cfg-") as tmp:
        doc = cfg.model_dump(mode="json")
        doc["store"]["uri"] = store.uri
        doc["serve"].update(port=_free_port(), max_new_tokens=max(args.new_tokens, 96), num_replicas=1)
        cfg_path = Path(tmp) / "bench.yaml"
        cfg_path.write_text(json.dumps(doc))
        http = http_bench(cfg_path, store, cfg.base.id, args.uploads, args.recipes, args.clients)
    print(json.dumps({"base": cfg.base.id, **engine, **http}))
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
