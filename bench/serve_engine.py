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
  peft_mixed as one mixed batch through PEFT's own `adapter_names` loop, for comparison;
  constrained as one batch by the bare base, each row under the recipe grammar (grammar-constrained
             decoding, engines/grammar.py) -> constrained_vs_free_tokens_per_s against `base`.
`modes` picks some of them (bench/scale.py runs base and mixed with 64 adapters).
`python -m bench.serve_engine grammar` measures the grammar libraries' per-token cost instead.

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


MODES = ("base", "mixed", "switching", "switching_cold", "peft_mixed", "constrained")


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
    from ddft.engines.grammar import Constraint
    from ddft.engines.hf import HFEngine

    unknown = set(modes) - set(MODES)
    if unknown or not {"base", "mixed"} <= set(modes):
        raise ValueError(f"modes {modes}: base and mixed, and any of {MODES}")
    store = store if isinstance(store, Store) else Store(store)
    manifests = _adapters(store, base_id, adapters, rank)
    engine = HFEngine(store, base_id, cache_size=max(adapters, 1))
    reqs = [GenerateRequest("text", PROMPT, None, manifests[i % adapters], new_tokens) for i in range(batch)]
    bare = [GenerateRequest("text", PROMPT, None, None, new_tokens) for _ in range(batch)]
    recipe = Constraint.recipe()
    constrained = [GenerateRequest("text", PROMPT, None, None, new_tokens, constraint=recipe) for _ in range(batch)]
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
    if "constrained" in modes:
        engine.prepare(recipe)  # compiled once per engine (serve does it at start)
    if cold is not None:  # warm up one cycle, as the timed ones run: it ends with the next adapter evicted
        for r in short:
            cold.generate([r])
    runs = {
        "base": lambda: engine.generate(bare),
        "mixed": lambda: engine.generate(reqs),
        "switching": switching,
        "switching_cold": switching_cold,
        "peft_mixed": peft_mixed,
        "constrained": lambda: engine.generate(constrained),
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
    if "constrained" in rates:
        out["constrained_tokens_per_s"] = round(rates["constrained"], 1)
        out["constrained_vs_free_tokens_per_s"] = round(rates["constrained"] / rates["base"], 3)
    return {
        **out,
        "adapters": adapters,
        "batch": batch,
        "new_tokens": new_tokens,
        "rank": rank,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
    }


def grammar_costs(tokenizer, repeats: int = 20) -> dict:
    """Per generated token, the cost of constrained decoding's library work on CPU: computing the
    allowed-token mask and advancing the matcher (best of `repeats`), for the recipe grammar and for
    the JSON Schema of a recipe, over a real recipe's tokens; and what compiling each costs.
    xgrammar (the one ddft uses) always; llguidance, outlines-core and lm-format-enforcer too when
    installed (`pip install llguidance outlines-core lm-format-enforcer`) with the same input: the
    grammar's regular-expression form where a library takes no grammar, the schema as JSON Schema."""
    from ddft.recipes import Ingredient, Recipe, format_recipe, parse_recipe

    text = format_recipe(
        [Ingredient("flour", 2.0, "cup"), Ingredient("carrot", 4.0), Ingredient("salt", 1.5, "tsp")],
        ["Add the flour to the pot.", "Chop the carrot.", "Stir the pot.", "Serve the carrot cake.", "Enjoy!"],
    )
    schema = Recipe.model_json_schema()
    inputs = {
        "recipe_grammar": tokenizer(" " + text, add_special_tokens=False).input_ids,
        "json_schema": tokenizer(json.dumps(parse_recipe(text)), add_special_tokens=False).input_ids,
    }
    out = {"vocab": len(tokenizer), "tokens": {k: len(v) for k, v in inputs.items()}}
    for name, lib in _LIBRARIES.items():
        try:
            out[name] = lib(tokenizer, schema, inputs, repeats)
        except ImportError:
            out[name] = "not installed"
        except Exception as err:  # a library that can't take this input says so in the results
            out[name] = f"failed: {type(err).__name__}: {str(err)[:120]}"
    return out


def _timed(make, step, ids: list[int], eos: int, repeats: int) -> float:
    """Best-of-`repeats` microseconds per token of step(state, token) over ids then end of sequence."""
    best = float("inf")
    for _ in range(repeats):
        state = make()
        t = time.perf_counter()
        for token in [*ids, eos]:
            step(state, token)
        best = min(best, (time.perf_counter() - t) / (len(ids) + 1))
    return round(best * 1e6, 1)


def _xgrammar(tokenizer, schema, inputs, repeats):
    import xgrammar as xgr

    from ddft.recipes import recipe_grammar

    t = time.perf_counter()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer)))
    out = {"tokenizer_s": round(time.perf_counter() - t, 2)}
    mask = xgr.allocate_token_bitmask(1, len(tokenizer))

    def step(matcher, token):
        matcher.fill_next_token_bitmask(mask)
        assert matcher.accept_token(token)

    for kind, compile_ in (
        ("recipe_grammar", lambda: compiler.compile_grammar(recipe_grammar())),
        ("json_schema", lambda: compiler.compile_json_schema(json.dumps(schema), any_whitespace=True)),
    ):
        t = time.perf_counter()
        compiled = compile_()
        out[f"{kind}_compile_s"] = round(time.perf_counter() - t, 3)
        make = lambda c=compiled: xgr.GrammarMatcher(c)  # noqa: E731
        out[f"{kind}_us_per_token"] = _timed(make, step, inputs[kind], tokenizer.eos_token_id, repeats)
    return out


def _llguidance(tokenizer, schema, inputs, repeats):
    import llguidance
    import llguidance.hf
    import llguidance.torch

    from ddft.recipes import recipe_grammar

    t = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, len(tokenizer))
    out = {"tokenizer_s": round(time.perf_counter() - t, 2)}
    mask = llguidance.torch.allocate_token_bitmask(1, len(tokenizer))

    def step(matcher, token):
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        assert matcher.consume_token(token), matcher.get_error()

    for kind, spec in (
        ("recipe_grammar", llguidance.grammar_from("gbnf", recipe_grammar())),
        ("json_schema", llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))),
    ):
        t = time.perf_counter()
        llguidance.LLMatcher(lltok, spec)
        out[f"{kind}_compile_s"] = round(time.perf_counter() - t, 3)
        make = lambda s=spec: llguidance.LLMatcher(lltok, s)  # noqa: E731
        out[f"{kind}_us_per_token"] = _timed(make, step, inputs[kind], tokenizer.eos_token_id, repeats)
    return out


def _outlines_core(tokenizer, schema, inputs, repeats):
    import outlines_core
    from outlines_core.kernels.torch import allocate_token_bitmask, fill_next_token_bitmask
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    t = time.perf_counter()
    vocab: dict[bytes, list[int]] = {}
    for token, i in tokenizer.get_vocab().items():
        if token not in tokenizer.all_special_tokens and all(c in to_byte for c in token):
            vocab.setdefault(bytes(to_byte[c] for c in token), []).append(i)
    vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id, vocab)
    out = {"tokenizer_s": round(time.perf_counter() - t, 2)}
    mask = allocate_token_bitmask(len(tokenizer))

    def step(guide, token):
        fill_next_token_bitmask(guide, mask)
        if token != tokenizer.eos_token_id:
            guide.advance(token)

    regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(schema))
    t = time.perf_counter()
    index = outlines_core.Index(regex, vocabulary)
    out["json_schema_compile_s"] = round(time.perf_counter() - t, 3)
    try:
        out["json_schema_us_per_token"] = _timed(
            lambda: outlines_core.Guide(index), step, inputs["json_schema"], tokenizer.eos_token_id, repeats
        )
    except ValueError as err:  # a token of the valid text refused
        out["json_schema_us_per_token"] = f"refused a valid text: {str(err)[:80]}"
    return out


def _lm_format_enforcer(tokenizer, schema, inputs, repeats):
    from lmformatenforcer import JsonSchemaParser, TokenEnforcer
    from lmformatenforcer.tokenenforcer import TokenEnforcerTokenizerData

    t = time.perf_counter()  # its transformers integration's builder (whose import fails on transformers 5)
    zero, special, regular = tokenizer.encode("0")[-1], set(tokenizer.all_special_ids), []
    for i in range(len(tokenizer)):
        if i not in special:
            after_zero = tokenizer.decode([zero, i])[1:]
            regular.append((i, after_zero, len(after_zero) > len(tokenizer.decode([i]))))
    data = TokenEnforcerTokenizerData(
        regular, lambda ids: tokenizer.decode(ids).rstrip("\ufffd"), tokenizer.eos_token_id, False, len(tokenizer)
    )
    out = {"tokenizer_s": round(time.perf_counter() - t, 2)}
    ids = inputs["json_schema"]

    def step(state, token):
        enforcer, done = state
        allowed = enforcer.get_allowed_tokens(done).allowed_tokens
        if token not in allowed:
            raise ValueError(f"token {token} refused after {tokenizer.decode(done)!r}")
        done.append(token)

    try:
        out["json_schema_us_per_token"] = _timed(
            lambda: (TokenEnforcer(data, JsonSchemaParser(schema)), []), step, ids, tokenizer.eos_token_id, 1
        )
    except ValueError as err:
        out["json_schema_us_per_token"] = f"refused a valid text: {str(err)[:80]}"
    return out


_LIBRARIES = {
    "xgrammar": _xgrammar,
    "llguidance": _llguidance,
    "outlines_core": _outlines_core,
    "lm_format_enforcer": _lm_format_enforcer,
}


if __name__ == "__main__":
    import sys

    from ddft.models.load import ensure_base, local_base_dir

    torch.set_num_threads(2)
    demo_store = Store("store")
    ensure_base(demo_store, "ddft-embedded-smollm2", build="embedded")
    if sys.argv[1:] == ["grammar"]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(local_base_dir(demo_store, "ddft-embedded-smollm2"))
        print(json.dumps(grammar_costs(tokenizer)))
    else:
        print(json.dumps(engine_bench(demo_store, "ddft-embedded-smollm2")))
