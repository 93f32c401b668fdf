"""Batched LoRA in the hf engine: a mixed batch computes what each adapter computes alone in PEFT;
per-row stops, max tokens and seeds; eviction restacks; counters; unsupported variants refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ddft import prompts
from ddft.adapters.registry import AdapterError
from ddft.engines.base import FIGURES, STATS, GenerateRequest, make_engine
from ddft.engines.batched_lora import BatchedLoraLinear
from tests import test_engine_hf
from tests.test_engine_hf import _media, _reference_logits, make_adapter

served, engine = test_engine_hf.served, test_engine_hf.engine  # the same fixtures (this module's instances)

QV = r".*language_model.*\.(q_proj|v_proj)"  # fewer layers: other adapters' slots are zeros there
VIDEO_TOWER = r".*(language_model|video_tower).*\.(q_proj|v_proj)"  # 8 frame rows per request


@pytest.fixture(scope="module")
def more(served, tmp_path_factory):
    """Adapters of other ranks and targets, next to the served r=8 ones."""
    store, base, _ = served
    tmp = tmp_path_factory.mktemp("more")
    return {
        "r4": make_adapter(store, base, "text", 11, tmp, name="r4", r=4),
        "r16qv": make_adapter(store, base, "text", 12, tmp, name="r16qv", r=16, targets=QV),
        "r2": make_adapter(store, base, "text", 13, tmp, name="r2", r=2),
        "vt": make_adapter(store, base, "video", 14, tmp, name="vt", r=4, targets=VIDEO_TOWER),
    }


def _text(adapter, question="How long do I boil an egg?", tokens=6, **kw):
    return GenerateRequest("text", question, None, adapter, tokens, **kw)


def _check_logits(engine, store, base_id, reqs, tmp_path):
    got = engine.forward_logits(reqs)
    for row, req in zip(got, reqs):
        torch.testing.assert_close(row, _reference_logits(store, base_id, req, tmp_path), atol=1e-4, rtol=1e-4)
    return got


def test_mixed_batch_logits_equal_peft_alone(served, more, engine, tmp_path):
    store, base, m = served
    img0, vid0 = _media(0)
    img1, vid1 = _media(1)
    text = [
        _text(m["text"]),
        _text(None, "Salt?"),
        _text(more["r4"]),
        _text(more["r16qv"], "Pepper, how much?"),
        _text(more["r2"]),
        _text(m["text"], "Salt?"),
    ]
    got = _check_logits(engine, store, base.id, text, tmp_path)
    assert isinstance(next(x for x in engine.model.modules() if hasattr(x, "lora_A")), BatchedLoraLinear)
    engine.batched_lora = False  # PEFT's own adapter_names loop agrees
    try:
        torch.testing.assert_close(engine.forward_logits(text), got, atol=1e-4, rtol=1e-4)
    finally:
        engine.batched_lora = True
    _check_logits(
        engine,
        store,
        base.id,
        [
            GenerateRequest("image", prompts.QUESTIONS["image"], img0, m["image"]),
            GenerateRequest("image", prompts.QUESTIONS["image"], img1, None),
            GenerateRequest("image", "Dish?", img1, m["image"]),
        ],
        tmp_path,
    )
    _check_logits(
        engine,
        store,
        base.id,
        [  # LoRA in the video tower too: 8 frame rows per request
            GenerateRequest("video", prompts.QUESTIONS["video"], vid0, more["vt"]),
            GenerateRequest("video", "Recipe?", vid1, None),
            GenerateRequest("video", prompts.QUESTIONS["video"], vid1, m["video"]),
            GenerateRequest("video", "Recipe?", vid0, more["vt"]),
        ],
        tmp_path,
    )


def test_mixed_generate_equals_each_alone(served, more, engine):
    _, _, m = served
    reqs = [
        _text(m["text"], tokens=8),
        _text(None, "Salt?", 5),
        _text(more["r4"], "Pepper?", 8),
        _text(more["r16qv"], tokens=3),
        _text(more["r2"], "Oil?", 8),
    ]
    together = engine.generate(reqs)
    alone = [engine.generate([r])[0] for r in reqs]
    assert [(r.text, r.finish_reason, r.timings["new_tokens"]) for r in together] == [
        (r.text, r.finish_reason, r.timings["new_tokens"]) for r in alone
    ]
    assert together[0].timings["adapters_in_batch"] == 4
    assert len({r.text for r in together}) > 2  # the adapters really differ


def test_stop_strings_and_row_max_tokens(served, engine):
    _, _, m = served
    full = engine.generate([_text(m["text"], tokens=12)])[0]
    assert full.finish_reason == "length" and full.timings["new_tokens"] == 12 and len(full.text) > 6
    stop = full.text[4:6]
    cut = full.text[: full.text.find(stop)].strip()
    reqs = [
        _text(m["text"], tokens=12, stop=["\x00never", stop]),
        _text(m["text"], tokens=12),
        _text(m["text"], tokens=2),
        _text(None, tokens=5),
    ]
    got = engine.generate(reqs)
    assert got[0].text == cut and got[0].finish_reason == "stop" and got[0].timings["new_tokens"] < 12
    assert got[1].text == full.text and got[1].finish_reason == "length"
    assert [r.timings["new_tokens"] for r in got[1:]] == [12, 2, 5]  # each row stops at its own max
    assert got[2].text == engine.generate([reqs[2]])[0].text
    assert got[3].finish_reason == "length"
    with pytest.raises(ValueError, match="stop"):
        engine.generate([_text(None, stop=[""])])


def test_seeded_sampling_is_reproducible_in_any_batch(served, more, engine):
    _, _, m = served
    a = _text(m["text"], tokens=10, temperature=1.0, seed=7)
    alone = engine.generate([a])[0].text
    assert engine.generate([a])[0].text == alone
    others = [_text(more["r4"], "Oil?", 10, temperature=1.0, seed=1), _text(None, "Salt?", 10, temperature=1.0)]
    batch = engine.generate([others[0], a, others[1], dataclasses.replace(a, seed=8)])
    assert batch[1].text == alone
    assert batch[3].text != alone  # another seed draws other tokens
    assert engine.generate([dataclasses.replace(a, temperature=0.0)])[0].text != alone  # it did sample


def test_eviction_restacks_and_counters(served, more, tmp_path):
    store, base, m = served
    eng = make_engine("hf", store=store, base_model_id=base.id, cache_size=8)
    assert eng.stats() == dict.fromkeys(STATS + FIGURES, 0)  # every engine's counters and gauges
    assert {
        "adapter_loads",
        "adapter_hits",
        "adapter_misses",
        "adapter_evictions",
        "requests",
        "prompt_tokens",
        "new_tokens",
    } <= set(STATS)
    reqs = [
        _text(m["text"]),
        _text(more["r4"]),
        _text(None),
        _text(more["r16qv"]),
        _text(more["r2"]),
        _text(m["text"], "Salt?"),
    ]
    results = eng.generate(reqs)
    stats = eng.stats()
    assert (stats["adapter_loads"], stats["adapter_misses"], stats["adapter_hits"]) == (4, 4, 1)
    assert stats["requests"] == 6 and stats["adapter_evictions"] == 0
    assert stats["new_tokens"] == sum(r.timings["new_tokens"] for r in results)
    assert stats["prompt_tokens"] == sum(r.timings["prompt_tokens"] for r in results)
    before = eng.forward_logits(reqs)

    assert eng.evict_adapter(more["r4"].ref) and not eng.evict_adapter(more["r4"].ref)
    assert more["r4"].ref not in eng.loaded_adapters() and eng.stats()["adapter_evictions"] == 1
    keep = [0, 2, 3, 4, 5]
    torch.testing.assert_close(eng.forward_logits([reqs[i] for i in keep]), before[keep], atol=1e-5, rtol=1e-5)
    _check_logits(eng, store, base.id, [reqs[i] for i in keep[:3]], tmp_path)
    # back again (a miss, a load), in another slot: still the same answer
    torch.testing.assert_close(eng.forward_logits(reqs), before, atol=1e-5, rtol=1e-5)
    assert eng.stats()["adapter_loads"] == 5
    for ref in list(eng.loaded_adapters()):  # none left: the bare base still answers
        eng.evict_adapter(ref)
    assert eng.loaded_adapters() == []
    torch.testing.assert_close(eng.forward_logits([reqs[2]]), before[2:3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eng.forward_logits(reqs[:2]), before[:2], atol=1e-5, rtol=1e-5)  # and reloads


def test_refuses_lora_variants(served, tmp_path):
    store, base, _ = served
    dora = make_adapter(store, base, "text", 21, tmp_path, name="dora", use_dora=True)
    eng = make_engine("hf", store=store, base_model_id=base.id, cache_size=2)
    with pytest.raises(AdapterError, match="dora.*use_dora.*plain LoRA"):
        eng.generate([_text(dora)])
    assert eng.loaded_adapters() == []
