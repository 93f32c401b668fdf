"""Serving throughput of the `hf` engine: one batch mixing adapters vs the bare base vs switching.

Publishes `adapters` random LoRA adapters (r `rank` on q/k/v/o of the language model, text) for the
base into the store (owner "bench"; reused when already there), then measures generated tokens/s of
the same `batch` text requests answered:

  base       as one batch by the bare base;
  mixed      as one batch, each row with its own adapter (the batched LoRA path);
  switching  one request at a time, switching adapter between them (all adapters resident);
  peft_mixed as one mixed batch through PEFT's own `adapter_names` loop, for comparison.

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
    out = []
    for i in range(n):
        name = f"bench-r{rank}-{i}"
        m = registry.read_manifest(store, "bench", name)
        if m is None or m.base_fingerprint != base.fingerprint:
            model, _ = load_base(local_base_dir(store, base_id))
            torch.manual_seed(i)
            cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LM_TARGETS, init_lora_weights=False)
            with tempfile.TemporaryDirectory() as tmp:
                get_peft_model(model, cfg).save_pretrained(tmp)
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


def engine_bench(
    store, base_id: str, adapters: int = 8, batch: int = 8, new_tokens: int = 64, rank: int = 8, repeats: int = 3
) -> dict:
    from ddft.engines.base import GenerateRequest
    from ddft.engines.hf import HFEngine

    store = store if isinstance(store, Store) else Store(store)
    manifests = _adapters(store, base_id, adapters, rank)
    engine = HFEngine(store, base_id, cache_size=max(adapters, 1))
    reqs = [GenerateRequest("text", PROMPT, None, manifests[i % adapters], new_tokens) for i in range(batch)]
    bare = [GenerateRequest("text", PROMPT, None, None, new_tokens) for _ in range(batch)]

    def switching():
        results = []
        for r in reqs:
            engine.load_adapter(r.adapter)
            results += engine.generate([r])
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
    runs = {
        "base": lambda: engine.generate(bare),
        "mixed": lambda: engine.generate(reqs),
        "switching": switching,
        "peft_mixed": peft_mixed,
    }
    rates = dict.fromkeys(runs, 0.0)
    for _ in range(repeats):
        for mode, run in runs.items():
            rates[mode] = max(rates[mode], _rate(run))
    return {
        "base_tokens_per_s": round(rates["base"], 1),
        "mixed_tokens_per_s": round(rates["mixed"], 1),
        "switching_tokens_per_s": round(rates["switching"], 1),
        "mixed_vs_base": round(rates["mixed"] / rates["base"], 3),
        "mixed_vs_switching": round(rates["mixed"] / rates["switching"], 2),
        "peft_mixed_tokens_per_s": round(rates["peft_mixed"], 1),
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
