"""Serving throughput of the `hf` engine: one batch mixing adapters vs the bare base vs switching.

Publishes `adapters` random LoRA adapters (r `rank` on q/k/v/o of the language model, text) for the
base into the store (owner "bench"; reused when already there), then measures generated tokens/s of
the same `batch` text requests answered:

  base       as one batch by the bare base;
  mixed      as one batch, each row with its own adapter (the batched LoRA path);
  switching  one request at a time, switching adapter between them (all adapters resident);
  switching_cold  one request at a time cycling through the adapters on a second engine whose
             adapter LRU holds fewer than them (half, at least 1): every request loads its adapter
             on demand (downloaded from the store, injected, restacked), as a server with more
             adapters than its cache does; its loads per request are reported (1.0: all cold);
  peft_mixed as one mixed batch through PEFT's own `adapter_names` loop, for comparison.
`modes` picks some of them (bench/scale.py runs base and mixed with 64 adapters).

Tokens are counted honestly (a row ending early at end of sequence counts what it generated).
Each rate is the best of `repeats` rounds (the modes interleaved): on a shared machine the best
round is the one least disturbed by other processes.
`python bench/serve_engine.py` runs it on the demo's embedded base; the last line is one JSON object.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from ddft.store import Store

PROMPT = "Write a long and detailed recipe for a vegetable soup, with every step explained."


def _adapters(store: Store, base_id: str, n: int, rank: int) -> list:
    """n random LoRA adapters for the base (init_lora_weights=False: they change the outputs)."""
    from peft import LoraConfig, get_peft_model

    from ddft.adapters import registry
    from ddft.config import LM_TARGETS
    from ddft.models.load import base_info, load_base, local_base_dir

    base = base_info(store, base_id)
    out, model = [], None
    for i in range(n):
        name = f"bench-r{rank}-{i}"
        m = registry.read_manifest(store, "bench", name)
        if m is None or m.base_fingerprint != base.fingerprint:
            if model is None:  # loaded once: each adapter is injected, saved, then unloaded again
                model, _ = load_base(local_base_dir(store, base_id))
            torch.manual_seed(i)
            cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LM_TARGETS, init_lora_weights=False)
            with tempfile.TemporaryDirectory() as tmp:
                peft_model = get_peft_model(model, cfg)
                peft_model.save_pretrained(tmp)
                model = peft_model.unload()  # the bare base back, for the next adapter
                m = registry.publish(
                    store, Path(tmp), owner="bench", name=name, modality="text", base=base, source="uploaded"
                )
        out.append(m)
    return out


def _rate(run) -> float:
    """Generated tokens per second of one call of run() (which returns GenerateResults)."""
    t0 = time.perf_counter()
    results = run()
    return sum(r.timings["new_tokens"] for r in results) / (time.perf_counter() - t0)


MODES = ("base", "mixed", "switching", "switching_cold", "peft_mixed")


def engine_bench(
    store,
    base_id: str,
    adapters: int = 8,
    batch: int = 8,
    new_tokens: int = 64,
    rank: int = 8,
    repeats: int = 3,
    modes: tuple[str, ...] = MODES,
) -> dict:
    from ddft.engines.base import GenerateRequest
    from ddft.engines.hf import HFEngine

    unknown = set(modes) - set(MODES)
    if unknown or not {"base", "mixed"} <= set(modes):
        raise ValueError(f"modes {modes}: base and mixed, and any of {MODES}")
    store = store if isinstance(store, Store) else Store(store)
    manifests = _adapters(store, base_id, adapters, rank)
    engine = HFEngine(store, base_id, cache_size=max(adapters, 1))
    reqs = [GenerateRequest("text", PROMPT, None, manifests[i % adapters], new_tokens) for i in range(batch)]
    bare = [GenerateRequest("text", PROMPT, None, None, new_tokens) for _ in range(batch)]
    # switching_cold: an LRU smaller than the adapters, and requests cycling through them, so the
    # least recently used one, always the next one asked for, is never resident
    cold_cache = max(1, min(adapters, batch) // 2)
    cold = HFEngine(store, base_id, cache_size=cold_cache) if "switching_cold" in modes else None
    cold_seen = {"requests": 0, "loads": 0}

    def switching():
        results = []
        for r in reqs:
            engine.load_adapter(r.adapter)
            results += engine.generate([r])
        return results

    def switching_cold():
        results, loads = [], cold.adapters.counters["adapter_loads"]
        for r in reqs:
            results += cold.generate([r])  # loads its adapter on demand (the LRU's miss)
        cold_seen["requests"] += len(reqs)
        cold_seen["loads"] += cold.adapters.counters["adapter_loads"] - loads
        return results

    def peft_mixed():
        engine.batched_lora = False
        try:
            return engine.generate(reqs)
        finally:
            engine.batched_lora = True

    for m in manifests:
        engine.load_adapter(m)
    short = [GenerateRequest("text", PROMPT, None, r.adapter, 4) for r in reqs]
    engine.generate(short), engine.generate(short[:1]), engine.generate(bare[:2])  # warm up
    if cold is not None:  # warm up one cycle, as the timed ones run: it ends with the next adapter evicted
        for r in short:
            cold.generate([r])
    runs = {
        "base": lambda: engine.generate(bare),
        "mixed": lambda: engine.generate(reqs),
        "switching": switching,
        "switching_cold": switching_cold,
        "peft_mixed": peft_mixed,
    }
    runs = {mode: run for mode, run in runs.items() if mode in modes}
    rates = dict.fromkeys(runs, 0.0)
    for _ in range(repeats):
        for mode, run in runs.items():
            rates[mode] = max(rates[mode], _rate(run))
    out = {
        "base_tokens_per_s": round(rates["base"], 1),
        "mixed_tokens_per_s": round(rates["mixed"], 1),
        "mixed_vs_base": round(rates["mixed"] / rates["base"], 3),
    }
    if "switching" in rates:
        out["switching_tokens_per_s"] = round(rates["switching"], 1)
        out["mixed_vs_switching"] = round(rates["mixed"] / rates["switching"], 2)
    if "switching_cold" in rates:
        out["switching_cold_tokens_per_s"] = round(rates["switching_cold"], 1)
        out["mixed_vs_switching_cold"] = round(rates["mixed"] / rates["switching_cold"], 2)
        out["switching_cold_cache_size"] = cold_cache
        out["switching_cold_loads_per_request"] = round(cold_seen["loads"] / cold_seen["requests"], 3)
    if "peft_mixed" in rates:
        out["peft_mixed_tokens_per_s"] = round(rates["peft_mixed"], 1)
    return {
        **out,
        "adapters": adapters,
        "batch": batch,
        "new_tokens": new_tokens,
        "rank": rank,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    from ddft.models.load import ensure_base

    torch.set_num_threads(2)
    demo_store = Store("store")
    ensure_base(demo_store, "ddft-embedded-smollm2", build="embedded")
    print(json.dumps(engine_bench(demo_store, "ddft-embedded-smollm2")))
