"""Hot loads in the hf engine: a plain LoRA written from its safetensors straight into the stacked
slots (no PEFT module) answers exactly as PEFT's load of the same adapter, alone and mixed with
PEFT-loaded ones; slots are freed and reused; ranks above and below the rest; what needs PEFT
still goes through it; PEFT's own loop still works (the adapter gets PEFT modules then)."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from ddft import prompts
from ddft.adapters import registry
from ddft.engines.base import GenerateRequest, make_engine
from ddft.engines.lru import adapter_key
from tests import test_engine_hf
from tests.test_engine_hf import _media, _reference_logits, lora_folder, make_adapter

served = test_engine_hf.served  # the same fixture (this module's instance)

QV = r".*language_model.*\.(q_proj|v_proj)"
TOWER = r".*(language_model|video_tower).*\.(q_proj|v_proj)"  # 8 frame rows per request in the tower
Q0 = "model.language_model.layers.0.self_attn.q_proj"
K0 = "model.language_model.layers.0.self_attn.k_proj"
EXACT = dict(atol=1e-5, rtol=1e-5)


def _publish(store, base, folder, name, modality="text"):
    return registry.publish(store, folder, owner="ddft", name=name, modality=modality, base=base, source="trained")


@pytest.fixture(scope="module")
def more(served, tmp_path_factory):
    """Plain LoRA adapters (hot-loadable) of several ranks, targets and patterns."""
    store, base, _ = served
    tmp = tmp_path_factory.mktemp("hot")
    out = {
        "r4": make_adapter(store, base, "text", 31, tmp, name="hot-r4", r=4),
        "r2": make_adapter(store, base, "text", 32, tmp, name="hot-r2", r=2),
        "r16qv": make_adapter(store, base, "text", 33, tmp, name="hot-r16qv", r=16, targets=QV),
        "r8": make_adapter(store, base, "text", 34, tmp, name="hot-r8"),
        # per-module ranks and alphas, rsLoRA scaling: PEFT's pattern rules, applied the same way
        "pattern": make_adapter(
            store,
            base,
            "text",
            35,
            tmp,
            name="hot-pattern",
            r=4,
            rank_pattern={"q_proj": 6, "layers.1.self_attn.o_proj": 2},
            alpha_pattern={"v_proj": 3},
            use_rslora=True,
        ),
        # video adapters without a projector copy: LoRA on the language model (hot), and in the
        # video tower too (outside the language model: PEFT's)
        "video_lm": _publish(store, base, lora_folder(store, tmp / "video-lm", 36, r=4), "hot-video", "video"),
        "tower": _publish(
            store, base, lora_folder(store, tmp / "tower", 37, r=4, target_modules=TOWER), "hot-tower", "video"
        ),
    }
    # a saved adapter lacking one targeted module's weights: PEFT would give that module a random
    # LoRA (init_lora_weights=False), so only PEFT can load it; with B starting at zero (True) the
    # module adds nothing, and the hot load does the same
    for init in (False, True):
        folder = lora_folder(store, tmp / f"partial-{init}", 38, r=4)
        weights = safetensors.torch.load_file(folder / "adapter_model.safetensors")
        weights = {k: v for k, v in weights.items() if f".{Q0}." not in k}
        safetensors.torch.save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": init}))
        out[f"partial-{init}"] = _publish(store, base, folder, f"hot-partial-{str(init).lower()}")
    return out


def _engines(served, cache_size=8, **kw):
    """An engine that hot-loads and one that loads every adapter through PEFT (the reference)."""
    store, base, _ = served
    hot = make_engine("hf", store=store, base_model_id=base.id, cache_size=cache_size, **kw)
    peft = make_engine("hf", store=store, base_model_id=base.id, cache_size=cache_size, **kw)
    peft.hot_load = False
    return hot, peft


def _text(adapter, question="How long do I boil an egg?", tokens=6):
    return GenerateRequest("text", question, None, adapter, tokens)


def _video(adapter, seed, question=prompts.QUESTIONS["video"], tokens=4):
    return GenerateRequest("video", question, _media(seed)[1], adapter, tokens)


def _hot(engine, manifest) -> bool:
    """Resident as a hot load: in the stacks, no PEFT module anywhere."""
    name = adapter_key(manifest)
    in_peft = engine._peft is not None and name in engine._peft.peft_config
    modules = [layer for layer in engine._bank.layers.values() if name in layer.lora_A]
    return name in engine._hot and name in engine._bank.slots and not in_peft and not modules


def _same(hot, peft, reqs):
    """Logits and greedy tokens of one mixed batch are those of the PEFT-loading engine."""
    got = hot.forward_logits(reqs)
    torch.testing.assert_close(got, peft.forward_logits(reqs), **EXACT)
    assert [r.token_ids for r in hot.generate(reqs)] == [r.token_ids for r in peft.generate(reqs)]
    return got


def test_first_hot_load_equals_peft_load(served, more, tmp_path):
    store, base, m = served
    hot, peft = _engines(served)
    reqs = [_text(m["text"]), _text(None, "Salt?"), _text(m["text"], "Salt?")]
    got = _same(hot, peft, reqs)
    assert _hot(hot, m["text"]) and hot._peft is None  # the first adapter: LoRA layers made, no PEFT model
    assert not _hot(peft, m["text"]) and adapter_key(m["text"]) in peft._peft.peft_config
    for row, req in zip(got, reqs):  # and PEFT's own forward of a fresh model with the adapter
        torch.testing.assert_close(row, _reference_logits(store, base.id, req, tmp_path), **EXACT)
    assert (got[0] - got[1]).abs().max() > 1e-2  # the adapter really changes the answer


def test_mixed_batch_of_hot_and_peft_loaded_adapters(served, more, tmp_path):
    store, base, m = served
    hot, peft = _engines(served)
    hot.hot_load = False  # one text adapter through PEFT in the hot engine too
    hot.load_adapter(more["r8"])
    hot.hot_load = True
    text = [
        _text(m["text"]),
        _text(more["r8"], "Pepper?"),
        _text(None, "Salt?"),
        _text(more["r4"]),
        _text(more["pattern"], "Oil?"),
        _text(more["r16qv"]),
    ]
    _same(hot, peft, text)
    video = [  # the trained video adapter (projector copy: PEFT) with hot-loaded ones in one batch
        _video(m["video"], 0),
        _video(more["video_lm"], 1, "Recipe?"),
        _video(None, 1),
        _video(more["tower"], 0),
        _video(m["video"], 1, "Recipe?"),
    ]
    got = _same(hot, peft, video)
    for row, req in zip(got, video[:4]):
        torch.testing.assert_close(row, _reference_logits(store, base.id, req, tmp_path), atol=1e-4, rtol=1e-4)
    for a in (m["text"], more["r4"], more["pattern"], more["r16qv"], more["video_lm"]):
        assert _hot(hot, a), a.ref
    # PEFT's: a text adapter loaded with hot loads off, a projector copy, LoRA outside the language model
    peft_loaded = {adapter_key(a) for a in (more["r8"], m["video"], more["tower"])}
    assert set(hot._peft.peft_config) == peft_loaded and not hot._hot & peft_loaded


def test_evict_then_reload_reuses_the_slot(served, more):
    hot, peft = _engines(served)
    a, b, c, d = (more[k] for k in ("r4", "r8", "pattern", "r2"))
    for x in (a, b, c):
        hot.load_adapter(x)  # outside inference mode; later loads happen inside it (forward_logits)
    reqs = [_text(a), _text(b, "Salt?"), _text(c), _text(d, "Oil?"), _text(None)]
    slot_b = hot._bank.slots[adapter_key(b)]
    assert hot.evict_adapter(b.ref) and adapter_key(b) not in hot._bank.slots
    assert all(slot_b not in layer._present for layer in hot._bank.layers.values())
    keep = [reqs[0], reqs[2], reqs[3], reqs[4]]
    _same(hot, peft, keep)  # d loads now, into b's slot
    assert hot._bank.slots[adapter_key(d)] == slot_b and _hot(hot, d)
    _same(hot, peft, reqs)  # b comes back in a new slot
    assert hot._bank.slots[adapter_key(b)] not in (0, slot_b) and hot._bank.size == 5
    for ref in list(hot.loaded_adapters()):
        assert hot.evict_adapter(ref)
    assert not hot._bank.slots and all(layer._stack is None for layer in hot._bank.layers.values())
    _same(hot, peft, [reqs[4]])  # the bare base through the (empty) LoRA layers
    _same(hot, peft, reqs[:2])  # and loads again
    assert hot.stats()["adapter_evictions"] == 5


def test_higher_and_lower_ranks(served, more):
    hot, peft = _engines(served)
    low = [_text(more["r4"]), _text(more["r2"], "Salt?"), _text(None, "Oil?")]
    before = _same(hot, peft, low)
    q0, k0 = hot._bank.layers[Q0], hot._bank.layers[K0]
    assert q0._stack[0].shape[1] == k0._stack[0].shape[1] == 4  # r 2 zero-padded to 4
    high = [*low, _text(more["r16qv"], "Pepper?"), _text(more["pattern"])]
    _same(hot, peft, high)  # r 16 on q/v: those stacks grow, k's don't
    assert q0._stack[0].shape[1] == 16 and k0._stack[0].shape[1] == 4
    assert hot.evict_adapter(more["r16qv"].ref)
    assert q0._stack[0].shape[1] == 6 and k0._stack[0].shape[1] == 4  # narrowed to the widest left
    torch.testing.assert_close(hot.forward_logits(low), before, atol=1e-6, rtol=1e-6)


def test_what_needs_peft_is_loaded_by_peft(served, more):
    _, _, m = served
    hot, peft = _engines(served)
    reqs = [_text(m["text"], "Oil?"), _text(more["partial-True"], "Salt?"), _text(more["partial-False"])]
    hot.forward_logits(reqs)  # hot loads first: PEFT's model comes after our LoRA layers
    # a targeted module without weights, random-initialized by PEFT: PEFT's load
    assert not _hot(hot, more["partial-False"]) and adapter_key(more["partial-False"]) in hot._peft.peft_config
    assert _hot(hot, more["partial-True"]) and _hot(hot, m["text"])
    # without its q_proj weights the hot load equals PEFT's load (a zero B there)
    torch.testing.assert_close(hot.forward_logits(reqs[:2]), peft.forward_logits(reqs[:2]), **EXACT)
    img = GenerateRequest("image", prompts.QUESTIONS["image"], _media(0)[0], m["image"], 3)
    hot.forward_logits([img])  # a projector copy: PEFT (loaded in inference mode)
    assert not _hot(hot, m["image"]) and adapter_key(m["image"]) in hot._peft.peft_config
    vid = _video(m["video"], 0)
    hot.generate([vid])  # and another outside it, next to the copy made in inference mode
    assert not _hot(hot, m["video"])
    torch.testing.assert_close(hot.forward_logits([vid]), peft.forward_logits([vid]), **EXACT)


def test_peft_loads_after_hot_ones_in_and_outside_inference_mode(served, more):
    """PEFT's model made after our LoRA layers: PEFT then keeps the base's trainability instead of
    freezing it, so the engine freezes it; else a projector copy made in inference mode (a batch's
    load) wants requires_grad at the next PEFT load outside it, which torch refuses."""
    _, _, m = served
    hot, peft = _engines(served)
    img = GenerateRequest("image", prompts.QUESTIONS["image"], _media(0)[0], m["image"], 3)
    vid = _video(m["video"], 1)
    for reqs in ([_text(m["text"])], [img], [vid]):
        hot.forward_logits(reqs)  # hot load, then PEFT's model and a second copy, in inference mode
    hot.generate([_text(more["partial-False"], tokens=2)])  # PEFT, outside inference mode
    hot.load_adapter(more["r8"])
    assert _hot(hot, m["text"]) and _hot(hot, more["r8"]) and not _hot(hot, more["partial-False"])
    _same(hot, peft, [_text(m["text"]), _text(more["r8"], "Salt?")])
    _same(hot, peft, [img])
    _same(hot, peft, [vid, _video(None, 0)])
    # the active PEFT adapter goes: PEFT makes the next one active (trainable), and the next PEFT
    # load outside inference mode puts back what it found
    assert hot._peft.active_adapter == adapter_key(m["image"]) and hot.evict_adapter(m["image"].ref)
    hot.evict_adapter(more["partial-False"].ref)
    hot.generate([img])
    _same(hot, peft, [img, GenerateRequest("image", "Dish?", _media(1)[0], None, 3)])


def test_peft_own_loop_gives_hot_adapters_peft_modules(served, more):
    hot, peft = _engines(served)
    reqs = [_text(more["r4"]), _text(more["pattern"], "Salt?"), _text(None), _text(more["r16qv"], "Oil?")]
    batched = _same(hot, peft, reqs)
    assert hot._peft is None
    hot.batched_lora = False  # PEFT's adapter_names loop needs PEFT modules: the hot adapters get them
    try:
        torch.testing.assert_close(hot.forward_logits(reqs), batched, **EXACT)
        assert not hot._hot and set(hot._peft.peft_config) == {adapter_key(r.adapter) for r in reqs if r.adapter}
        assert hot._bank.layers[Q0].lora_A[adapter_key(more["r4"])].weight.shape == (4, 64)
        hot.load_adapter(more["r2"])  # loads through PEFT while its loop is on
        assert not _hot(hot, more["r2"])
    finally:
        hot.batched_lora = True
    torch.testing.assert_close(hot.forward_logits(reqs), batched, **EXACT)
    assert hot.evict_adapter(more["r4"].ref)  # PEFT's delete, and the slot
    torch.testing.assert_close(hot.forward_logits(reqs[1:]), batched[1:], **EXACT)


def test_half_precision_base_stacks_what_peft_loads(served, more):
    """PEFT upcasts a bf16 base's LoRA to fp32: the hot load's stacks are fp32 too, the same numbers."""
    hot, peft = _engines(served, dtype=torch.bfloat16)
    reqs = [_text(more["r4"]), _text(more["pattern"], "Salt?"), _text(None)]
    got = hot.forward_logits(reqs)
    torch.testing.assert_close(got, peft.forward_logits(reqs), atol=0, rtol=0)
    assert _hot(hot, more["r4"]) and hot._bank.layers[Q0]._stack[0].dtype == torch.float32
    assert hot._bank.layers[Q0].base_layer.weight.dtype == torch.bfloat16
    for a, b in zip(hot._bank.layers[Q0]._stack, peft._bank.layers[Q0]._stack):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_hot_load_on_gpu_in_bf16(served, more):
    hot, peft = _engines(served, device="cuda", dtype=torch.bfloat16)
    reqs = [_text(more["r4"]), _text(more["r16qv"], "Salt?"), _text(None), _text(more["pattern"], "Oil?")]
    torch.testing.assert_close(hot.forward_logits(reqs), peft.forward_logits(reqs), atol=0, rtol=0)
    assert _hot(hot, more["r4"]) and hot._bank.layers[Q0]._stack[0].device.type == "cuda"
    assert [r.token_ids for r in hot.generate(reqs)] == [r.token_ids for r in peft.generate(reqs)]


def test_a_peft_adapter_loads_again_after_hot_ones_pushed_every_peft_adapter_out(served, more):
    """PEFT's model can be left with no adapter at all now (hot ones don't count in it): loading a
    projector adapter into it again failed with PEFT's 'Please specify at least one adapter to set'
    (a 409 in test_serve's LRU test), reproduced here first."""
    store, _, manifests = served
    img, _ = _media(0)
    engine = make_engine("hf", store=store, base_model_id="tiny", cache_size=1)
    image = GenerateRequest("image", "What dish?", img, manifests["image"], 3)
    first = engine.forward_logits([image])  # through PEFT: the projector is trained in full
    engine.forward_logits([GenerateRequest("text", "Salt?", None, more["r4"], 3)])  # hot; image evicted
    assert engine.loaded_adapters() == [more["r4"].ref]
    torch.testing.assert_close(engine.forward_logits([image]), first, **EXACT)
    engine.forward_logits([GenerateRequest("text", "Salt?", None, more["r8"], 3)])
    torch.testing.assert_close(engine.forward_logits([image]), first, **EXACT)
