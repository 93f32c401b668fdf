"""make bench-serve: multi-LoRA serving on the embedded base (the demo's), both engines, one run.

  engine   (before any Ray process exists) 8 requests x 64 new tokens, 8 different r-8 adapters:
           hf (bench/serve_engine.py): the batch on the base alone, mixing the 8 adapters (batched
           LoRA), and one at a time switching adapter -> mixed_vs_base, mixed_vs_switching;
           vllm (in its own venv): the base alone and mixed -> vllm_mixed_vs_base, and the base
           requests straight into vLLM's engine (the floor for vllm_served_vs_raw).
  http     the Serve app (one ModelServer replica) on a local Ray cluster over 127.0.0.1, once per
           engine: ttft: time to the first streamed token of 8 concurrent chat streams;
           served: generated tokens/s of 8 concurrent chat completions on the base (vllm: against
           the engine-direct floor); recipe: POST /v1/recipes alone, then with 8 concurrent
           clients (p50 / alone); hot_load: a tenant's upload accepted -> the first token of a
           request using it, for --uploads fresh adapters; schema_valid_rate: of the --recipes
           answers, the share that validates against the RecipeAnswer schema docs/openapi.json
           publishes (the recipe grammar guarantees 1.0); short_ttft: time to the first streamed
           token of a short question (8 new tokens) alone, then while --clients - 1 recipe clients
           loop POST /v1/recipes (p50 of 5 each, the loaded ones a lone recipe's time apart) ->
           short_ttft_under_load_vs_alone: how long a chat waits behind recipes in flight.
  served_vs_raw  (per engine) served tokens/s over the engine's own for the same 8 x --new-tokens
           base requests: hf against engine base_tokens_per_s, vllm against the engine-direct floor.
  constrained  (engine, both engines) the base batch again, each row under the recipe grammar:
           constrained_vs_free_tokens_per_s (hf) and vllm_constrained_vs_free_tokens_per_s.
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
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from bench.serve_engine import PROMPT
from ddft import client, config
from ddft.cluster import free_port
from ddft.store import Store

REPO = Path(__file__).resolve().parents[1]

SHORT_QUESTION = "How long do I boil an egg?"

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
    get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=config.LM_TARGETS, init_lora_weights=False)
    ).save_pretrained(out / "a0")
    tensors = load_file(out / "a0" / "adapter_model.safetensors")
    folders = []
    for i in range(n):
        folder = out / f"a{i}"
        folder.mkdir(exist_ok=True)
        (folder / "adapter_config.json").write_bytes((out / "a0" / "adapter_config.json").read_bytes())
        save_file(
            {k: v + 0.01 * (i + 1) * torch.randn_like(v) for k, v in tensors.items()},
            str(folder / "adapter_model.safetensors"),
        )
        folders.append(folder)
    return folders


def recipe_validator():
    """The RecipeAnswer schema as docs/openapi.json publishes it (its $refs resolved there)."""
    import jsonschema

    doc = json.loads((REPO / "docs" / "openapi.json").read_text())
    return jsonschema.Draft202012Validator(
        {**doc["components"]["schemas"]["RecipeAnswer"], "components": doc["components"]}
    )


def video_bytes() -> bytes:
    import numpy as np

    from ddft.data.synthetic import encode_mp4

    rng = np.random.default_rng(0)
    return encode_mp4([rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(16)], fps=8)


def _stream_ttft_ms(url: str, max_tokens: int, prompt: str = PROMPT) -> float:
    """Milliseconds to the first content delta of a streamed chat completion on the base."""
    import requests

    t = time.perf_counter()
    body = {
        "model": _base_id(url),
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=600) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines(decode_unicode=True):
            if line.startswith("data: {") and '"content"' in line:
                return (time.perf_counter() - t) * 1000
    raise RuntimeError("the stream sent no content")


def _chat_tokens(url: str, max_tokens: int) -> int:
    import requests

    body = {
        "model": _base_id(url),
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    resp = requests.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    resp.raise_for_status()
    return resp.json()["usage"]["completion_tokens"]


def _base_id(url: str) -> str:
    import requests

    return requests.get(f"{url}/v1/models", timeout=60).json()["data"][0]["id"]


def short_ttft_ms(url: str, video: bytes, load_clients: int, spacing_s: float, repeats: int = 5) -> dict:
    """TTFT p50 of a short streamed question alone, then while load_clients recipe clients loop,
    each question spacing_s after the previous one (the recipes admitted and generating)."""
    import threading

    alone = pct([_stream_ttft_ms(url, 8, SHORT_QUESTION) for _ in range(repeats)], 0.5)
    stop = threading.Event()

    def recipes(_):
        while not stop.is_set():
            client.post_recipe(url, video)

    with ThreadPoolExecutor(load_clients) as pool:
        busy = [pool.submit(recipes, i) for i in range(load_clients)]
        loaded = []
        try:
            for _ in range(repeats):
                stop.wait(spacing_s)
                loaded.append(_stream_ttft_ms(url, 8, SHORT_QUESTION))
        finally:
            stop.set()
        for f in busy:
            f.result()  # a recipe client's error fails the bench
    under_load = pct(loaded, 0.5)
    return {
        "short_ttft_alone_ms": round(alone, 1),
        "short_ttft_under_load_ms": round(under_load, 1),
        "short_ttft_under_load_vs_alone": round(under_load / alone, 2),
    }


def start_app(cfg_path) -> str:
    """The app of a config on the running Ray cluster, tenant management on (ADMIN_KEY); its URL."""
    from serve.app import run

    os.environ["DDFT_ADMIN_KEY"] = ADMIN_KEY  # build_app reads it in this process
    try:
        return run(cfg_path)
    finally:
        del os.environ["DDFT_ADMIN_KEY"]


def http_bench(
    cfg_path: Path, store: Store, base_id: str, uploads: int, recipes: int, clients: int, new_tokens: int
) -> dict:
    from ray import serve

    from ddft.cluster import ray_session

    with (
        tempfile.TemporaryDirectory(prefix="ddft-bench-serve-") as tmp,
        ray_session(num_cpus=4),
    ):
        url = start_app(cfg_path)
        try:
            client.generate(url, "text", "Warm up?", max_new_tokens=1)
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(lambda _: _stream_ttft_ms(url, 4), range(clients)))  # warm up
                ttft = list(pool.map(lambda _: _stream_ttft_ms(url, new_tokens), range(clients)))
                t = time.perf_counter()
                served = sum(pool.map(lambda _: _chat_tokens(url, new_tokens), range(clients)))
                served_tokens_per_s = served / (time.perf_counter() - t)
            tenant = f"bench{int(time.time())}"
            key = client.add_tenant(url, tenant, admin_key=ADMIN_KEY)
            folders = fresh_adapters(store, base_id, Path(tmp), uploads)
            hot = []
            for i, folder in enumerate(folders):
                client.upload_adapter(url, f"hot{i}", folder, "text", api_key=key)
                t = time.perf_counter()
                out = client.generate(url, "text", SHORT_QUESTION, api_key=key, adapter=f"hot{i}", max_new_tokens=1)
                hot.append((time.perf_counter() - t) * 1000)
                assert out["adapter"] == f"tenant-{tenant}/hot{i}/v1", out
            for i in range(uploads):
                client.delete_adapter(url, f"hot{i}", api_key=key)
            video = video_bytes()
            client.post_recipe(url, video)  # warm-up
            answers = []

            def one(_):
                t = time.perf_counter()
                answers.append(client.post_recipe(url, video))
                return (time.perf_counter() - t) * 1000

            single = statistics.median(one(i) for i in range(3))
            answers.clear()
            with ThreadPoolExecutor(clients) as pool:
                times = list(pool.map(one, range(recipes)))
            short = short_ttft_ms(url, video, clients - 1, single / 1000)
        finally:
            serve.shutdown()
    validator = recipe_validator()
    valid = [validator.is_valid(a) for a in answers]
    p50 = pct(times, 0.5)
    return {
        "ttft_p50_ms": round(statistics.median(ttft), 1),
        "served_tokens_per_s": round(served_tokens_per_s, 1),
        "hot_load_p50_ms": round(statistics.median(hot), 1),
        "hot_load_max_ms": round(max(hot), 1),
        "recipe_single_ms": round(single, 1),
        "recipe_p50_ms": round(p50, 1),
        "recipe_p99_ms": round(pct(times, 0.99), 1),
        "recipe_p50_vs_single": round(p50 / single, 2),
        "recipe_requests": len(times),
        "recipe_clients": clients,
        "schema_valid_rate": round(sum(valid) / len(valid), 3),
        "recipes_finished": sum(a["finish_reason"] == "stop" for a in answers),  # the rest cut by max_new_tokens
        **short,
    }


def vllm_engine_bench(
    store: Store, base_id: str, python: str, adapters: int, batch: int, new_tokens: int, engine: dict, repeats: int = 3
) -> dict:
    """vLLM's side of the engine bench, in its own interpreter: base, mixed, and engine-direct."""
    from bench.serve_engine import PROMPT, _adapters
    from ddft.engines.base import GenerateRequest
    from ddft.engines.grammar import Constraint
    from ddft.engines.vllm_batch import BatchJob, generate_in

    manifests = _adapters(store, base_id, adapters, 8)
    mixed = [GenerateRequest("text", PROMPT, None, manifests[i % adapters], new_tokens) for i in range(batch)]
    bare = [GenerateRequest("text", PROMPT, None, None, new_tokens) for _ in range(batch)]
    recipe = Constraint.recipe()
    constrained = [GenerateRequest("text", PROMPT, None, None, new_tokens, constraint=recipe) for _ in range(batch)]
    rounds = {"base": bare, "mixed": mixed, "constrained": constrained}  # the first round compiles the grammar
    out = generate_in(python, BatchJob(store.url(""), base_id, bare, engine, raw=True, rounds=rounds, repeats=repeats))
    raw_tokens = sum(len(ids) for ids in out.raw_token_ids)
    rates = out.tokens_per_s
    return {
        "vllm_base_tokens_per_s": round(rates["base"], 1),
        "vllm_mixed_tokens_per_s": round(rates["mixed"], 1),
        "vllm_mixed_vs_base": round(rates["mixed"] / rates["base"], 3),
        "vllm_constrained_tokens_per_s": round(rates["constrained"], 1),
        "vllm_constrained_vs_free_tokens_per_s": round(rates["constrained"] / rates["base"], 3),
        "vllm_raw_tokens_per_s": round(raw_tokens / out.raw_generate_s, 1),
        "vllm_start_s": round(out.load_s, 1),
    }


# the http figures also reported as {engine}_{key}, both engines' side by side
PER_ENGINE = ("ttft_p50_ms", "recipe_p50_vs_single", "schema_valid_rate", "short_ttft_under_load_vs_alone")
# served tokens/s over the engine's own for the same base batch: (served key, engine key) per engine
SERVED_VS_RAW = {
    "hf": ("served_tokens_per_s", "base_tokens_per_s"),
    "vllm": ("vllm_served_tokens_per_s", "vllm_raw_tokens_per_s"),
}


def base_only(store: Store, folder: Path) -> Store:
    """A store in `folder` with the config store's bases (linked, not copied) and nothing else, so
    what the bench asks reaches the bare base whatever the demo trained: requests are routed to the
    platform's adapter for their modality, and a trained text adapter answers in a few tokens
    (served_vs_raw measured 0.356 / 0.122 from a clone that had run `make demo`). A store that is not
    a local folder (S3) is used as it is."""
    if store.uri.startswith("s3://"):
        return store
    models = Path(urllib.parse.unquote(store.uri.removeprefix("file://"))) / "models"
    (folder / "models").symlink_to(models, target_is_directory=True)
    return Store(str(folder))


# --short: every figure at a size that fits `make gpu-check`'s budget (a smoke run of the whole bench,
# not a measurement to set beside a full run's); flags given explicitly still win
SHORT = {"new_tokens": 16, "uploads": 2, "recipes": 4, "clients": 4, "recipe_tokens": 32}
# and the engine rounds once, without the switching modes (the slowest, and not served traffic)
SHORT_ENGINE = {"repeats": 1, "modes": ("base", "mixed", "constrained")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "jobs/configs/demo.yaml"))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--uploads", type=int, default=7)
    ap.add_argument("--recipes", type=int, default=50, help="recipe requests in all, over --clients clients")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--engines", default="hf,vllm", help="which engines' HTTP runs (both by default)")
    ap.add_argument("--recipe-tokens", type=int, default=96, help="a recipe's token limit (serve.max_new_tokens)")
    ap.add_argument("--short", action="store_true", help=f"smaller defaults: {SHORT}")
    args = ap.parse_args(argv)
    if args.short:
        ap.set_defaults(**SHORT)
        args = ap.parse_args(argv)
    cfg = config.load(Path(args.config))
    from ddft.engines.base import serve_options
    from ddft.models.load import ensure_base

    ensure_base(Store.from_config(cfg.store), cfg.base.id, build=cfg.base.build, source=cfg.base.source)
    bare_store = tempfile.TemporaryDirectory(prefix="ddft-bench-store-")
    store = base_only(Store.from_config(cfg.store), Path(bare_store.name))
    from bench.serve_engine import engine_bench

    engines = args.engines.split(",")
    result = {
        "base": cfg.base.id,
        **({"short": True} if args.short else {}),
        **engine_bench(
            store, cfg.base.id, adapters=8, batch=8, new_tokens=args.new_tokens, **(SHORT_ENGINE if args.short else {})
        ),
    }
    print("engine hf:", json.dumps(result), flush=True)
    if "vllm" in engines:
        result.update(
            vllm_engine_bench(
                store,
                cfg.base.id,
                cfg.serve.vllm.python,
                8,
                8,
                args.new_tokens,
                serve_options(cfg, "vllm"),
                repeats=1 if args.short else 3,
            )
        )
        print("engine vllm:", json.dumps(result), flush=True)
    for engine in engines:
        with tempfile.TemporaryDirectory(prefix="ddft-bench-cfg-") as tmp:
            doc = cfg.model_dump(mode="json")
            doc["store"]["uri"] = store.uri
            doc["serve"].update(
                port=free_port(), max_new_tokens=max(args.new_tokens, args.recipe_tokens), num_replicas=1, engine=engine
            )
            cfg_path = Path(tmp) / "bench.yaml"
            cfg_path.write_text(json.dumps(doc))
            http = http_bench(cfg_path, store, cfg.base.id, args.uploads, args.recipes, args.clients, args.new_tokens)
        prefix = "" if engine == "hf" else "vllm_"
        result.update({f"{prefix}{k}": v for k, v in http.items()})
        for key in PER_ENGINE:
            result[f"{engine}_{key}"] = http[key]
        print(f"http {engine}:", json.dumps(http), flush=True)
        served, raw = SERVED_VS_RAW[engine]
        result[f"{engine}_served_vs_raw"] = round(result[served] / result[raw], 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
