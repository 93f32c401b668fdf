"""The hf engine: mixed-adapter batches answer like each adapter alone; LRU; base fingerprints."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from ddft import prompts
from ddft.adapters import registry
from ddft.adapters.registry import AdapterError
from ddft.config import LM_TARGETS
from ddft.engines.base import Engine, GenerateRequest, make_engine
from ddft.errors import Invalid
from ddft.models.load import BaseInfo, ensure_base, load_base, local_base_dir
from ddft.store import Store


def lora_folder(store, out: Path, seed: int = 0, base_id: str = "tiny", **lora) -> Path:
    """A random PEFT LoRA (init_lora_weights=False, so it changes outputs) on the base's language
    model, saved by save_pretrained as a tenant would upload it; `lora` overrides LoraConfig."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_base(local_base_dir(store, base_id))
    torch.manual_seed(seed)
    cfg = {"r": 8, "lora_alpha": 16, "target_modules": LM_TARGETS, "init_lora_weights": False, **lora}
    get_peft_model(model, LoraConfig(**cfg)).save_pretrained(out)
    return out


def make_adapter(
    store, base, modality, seed, tmp_path, name=None, owner="ddft", r=8, targets=LM_TARGETS, **lora_kwargs
):
    """A random LoRA (init_lora_weights=False, so it changes outputs), projector copy perturbed."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_base(local_base_dir(store, base.id))
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=targets,
        init_lora_weights=False,
        modules_to_save=None if modality == "text" else ["multi_modal_projector"],
        **lora_kwargs,
    )
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.5)
    out = tmp_path / f"adapter-{owner}-{name or modality}-{seed}"
    peft_model.save_pretrained(out)
    return registry.publish(
        store, out, owner=owner, name=name or modality, modality=modality, base=base, source="trained"
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    store = Store(str(tmp / "store"))
    base = ensure_base(store, "tiny", build="tiny")
    manifests = {m: make_adapter(store, base, m, seed, tmp) for seed, m in enumerate(("image", "video", "text"))}
    return store, base, manifests


@pytest.fixture(scope="module")
def engine(served):
    store, base, _ = served
    return make_engine("hf", store=store, base_model_id=base.id, cache_size=8)


def _media(seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), rng.integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)


def _requests(manifests, tokens=4):
    img0, vid0 = _media(0)
    img1, vid1 = _media(1)
    return [
        GenerateRequest("text", "How long do I boil an egg?", None, manifests["text"], tokens),
        GenerateRequest("text", "Salt?", None, None, tokens),  # shorter: left padding in the batch
        GenerateRequest("image", prompts.QUESTIONS["image"], img0, manifests["image"], tokens),
        GenerateRequest("image", prompts.QUESTIONS["image"], img1, None, tokens),
        GenerateRequest("video", prompts.QUESTIONS["video"], vid0, manifests["video"], tokens),
        GenerateRequest("video", "What is cooked here?", vid1, None, tokens),
        GenerateRequest("video", "Recipe?", vid1, manifests["video"], tokens),
    ]


def _reference_logits(store, base_id, req, tmp):
    """Next-token logits of one request on a fresh model: plain PEFT (no adapter_names), no padding."""
    from peft import PeftModel

    model, processor = load_base(local_base_dir(store, base_id))
    if req.adapter is not None:
        path = registry.download(store, req.adapter, tmp / req.adapter.ref.replace("/", "_"))
        model = PeftModel.from_pretrained(model, str(path))
    model.eval()
    row = prompts.encode(processor, req.modality, req.question, frames=8 if req.modality == "video" else 1)
    inputs = {"input_ids": torch.tensor([row["input_ids"]])}
    if req.modality != "text":
        inputs.update(prompts.pixel_inputs(processor, req.modality, [req.pixels]))
    with torch.inference_mode():
        return model(**inputs).logits[0, -1]


def test_engine_protocol_and_factory(engine):
    assert isinstance(engine, Engine)
    with pytest.raises(ValueError, match="unknown engine"):
        make_engine("nope")


def test_mixed_batch_matches_each_adapter_alone(served, engine, tmp_path):
    store, base, manifests = served
    reqs = _requests(manifests)
    # logits: one mixed batch per modality vs a fresh plain-PEFT model per request
    for modality in ("text", "image", "video"):
        group = [r for r in reqs if r.modality == modality]
        mixed = engine.forward_logits(group)
        for row, req in zip(mixed, group):
            torch.testing.assert_close(row, _reference_logits(store, base.id, req, tmp_path), atol=1e-4, rtol=1e-4)
        assert (mixed[0] - mixed[1]).abs().max() > 1e-2  # the adapters really change the answer
    # texts: all modalities and adapters in one call vs each request alone
    together = engine.generate(reqs)
    alone = [engine.generate([r])[0] for r in reqs]
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.adapter for r in together] == [
        "ddft/text/v1",
        None,
        "ddft/image/v1",
        None,
        "ddft/video/v1",
        None,
        "ddft/video/v1",
    ]
    assert all(r.base == "tiny" and r.timings["new_tokens"] <= 4 for r in together)
    # after prefill every row is tokens: all seven, of three modalities and adapters, share decode steps
    assert together[4].timings["batch_size"] == 7 and together[4].timings["adapters_in_batch"] == 3
    assert set(engine.loaded_adapters()) == {"ddft/text/v1", "ddft/image/v1", "ddft/video/v1"}


def test_lru_eviction_at_cache_size_one(served, engine, tmp_path):
    store, base, manifests = served
    small = make_engine("hf", store=store, base_model_id=base.id, cache_size=1)
    img, _ = _media(2)
    reqs = [
        GenerateRequest("text", "Boil?", None, manifests["text"], 3),
        GenerateRequest("image", prompts.QUESTIONS["image"], img, manifests["image"], 3),
        GenerateRequest("image", prompts.QUESTIONS["image"], img, None, 3),
    ]
    small.generate(reqs[:1])
    assert small.loaded_adapters() == ["ddft/text/v1"]
    small.generate(reqs[1:2])
    assert small.loaded_adapters() == ["ddft/image/v1"]  # text evicted
    # a second image adapter in the same batch: split into chunks that fit the cache
    other = make_adapter(store, base, "image", 7, tmp_path, name="image2")
    mixed = reqs[1:] + [dataclasses.replace(reqs[1], adapter=other)]
    got = small.generate(mixed)
    assert small.loaded_adapters() == ["ddft/image2/v1"]
    assert [r.text for r in got] == [r.text for r in engine.generate(mixed)]
    assert [r.timings["batch_size"] for r in got] == [2, 2, 1]


def test_a_projector_adapter_loads_after_every_peft_adapter_was_evicted(served, engine):
    """The video adapter (PEFT's: it trains the projector) evicted by a hot-loaded text one left PEFT's
    model naming it active; the next PEFT load (the image adapter) failed with KeyError on its name,
    a 409 for every image and video request on that replica (found by test_serve's LRU test)."""
    store, base, manifests = served
    small = make_engine("hf", store=store, base_model_id=base.id, cache_size=1)
    img, vid = _media(3)
    reqs = [
        GenerateRequest("video", prompts.QUESTIONS["video"], vid, manifests["video"], 3),
        GenerateRequest("text", "Boil?", None, manifests["text"], 3),
        GenerateRequest("image", prompts.QUESTIONS["image"], img, manifests["image"], 3),
        GenerateRequest("video", prompts.QUESTIONS["video"], vid, manifests["video"], 3),
    ]
    got = [small.generate([r])[0] for r in reqs]
    assert small.loaded_adapters() == ["ddft/video/v1"]
    assert [r.text for r in got] == [r.text for r in engine.generate(reqs)]


def test_refuses_adapter_of_another_base(served, engine, tmp_path):
    store, base, _ = served
    other = BaseInfo(id="tiny", fingerprint="0" * 64, uri=base.uri)
    manifest = make_adapter(store, other, "text", 3, tmp_path, name="stranger")
    with pytest.raises(AdapterError, match="fingerprint"):
        engine.generate([GenerateRequest("text", "Hi?", None, manifest, 2)])
    assert "ddft/stranger/v1" not in engine.loaded_adapters()


def test_rejects_malformed_requests(engine, served):
    _, _, manifests = served
    with pytest.raises(ValueError, match="pixels"):
        engine.generate([GenerateRequest("image", "Dish?", None, None, 2)])
    with pytest.raises(ValueError, match="modality"):
        engine.generate([GenerateRequest("audio", "Dish?", None, None, 2)])
    with pytest.raises(Invalid, match="is for video") as err:
        engine.generate([GenerateRequest("text", "Dish?", None, manifests["video"], 2)])
    assert err.value.code == "adapter_modality"


def test_a_raw_prompt_is_the_whole_prompt(engine, served):
    """/v1/completions' raw text: the rendered chat prompt sent raw answers as the question does,
    in one mixed batch with templated requests; raw media requests are refused."""
    from ddft import prompts

    _, _, manifests = served
    question = "How long do I boil an egg?"
    rendered = prompts.prompt_text(engine.processor.tokenizer, "text", question)
    asked, raw, other = engine.generate(
        [
            GenerateRequest("text", question, None, manifests["text"], 8),
            GenerateRequest("text", rendered, None, manifests["text"], 8, raw=True),
            GenerateRequest("text", "Once upon a time", None, None, 8, raw=True),
        ]
    )
    assert raw.token_ids == asked.token_ids and raw.adapter == "ddft/text/v1"
    assert other.token_ids  # a plain continuation
    with pytest.raises(ValueError, match="text only"):
        engine.generate([GenerateRequest("image", "Dish?", _media(0)[0], None, 2, raw=True)])


# -- streaming ---------------------------------------------------------------------------------------
async def _collect(stream, stop_after: int | None = None):
    """Every chunk of a stream (or the first `stop_after`, then the consumer goes away)."""
    chunks = []
    async for chunk in stream:
        chunks.append(chunk)
        if stop_after is not None and len(chunks) >= stop_after:
            await stream.aclose()
            break
    return chunks


def _joined(chunks) -> str:
    *head, last = chunks
    assert all(c.result is None and c.finish_reason is None for c in head)
    assert last.result is not None and last.finish_reason == last.result.finish_reason
    text = "".join(c.text for c in chunks)
    assert text == last.result.text  # exactly: the first delta is lstripped, a trailing blank never sent
    return text


def test_stream_text_is_the_generate_text(served, engine):
    """Byte-level tiny tokens make many incomplete UTF-8 characters: held back until they settle,
    the deltas add up to the answer exactly."""
    _, _, manifests = served
    for req in _requests(manifests, tokens=24)[::2]:
        chunks = asyncio.run(_collect(engine.stream(req)))
        assert _joined(chunks) == engine.generate([req])[0].text
        assert len(chunks) > 2 and all(c.token_ids for c in chunks[:-1])
        assert chunks[-1].result.adapter == (req.adapter.ref if req.adapter else None)


def test_concurrent_streams_share_one_batch(served, engine, tmp_path):
    store, base, manifests = served
    other = make_adapter(store, base, "text", 9, tmp_path, name="text2")
    reqs = [
        GenerateRequest("text", q, None, a, 12)
        for q, a in (("Boil an egg?", manifests["text"]), ("Salt?", None), ("Pasta water?", other))
    ]

    async def together():
        return await asyncio.gather(*(_collect(engine.stream(r)) for r in reqs))

    streams = asyncio.run(together())
    results = [chunks[-1].result for chunks in streams]
    assert [r.timings["batch_size"] for r in results] == [3, 3, 3]
    assert results[0].timings["adapters_in_batch"] == 2 and all("queue_s" in r.timings for r in results)
    assert [_joined(chunks) for chunks in streams] == [r.text for r in engine.generate(reqs)]


def test_stop_strings_are_never_streamed(engine):
    free = engine.generate([GenerateRequest("text", "Salt?", None, None, 32)])[0].text
    # two characters the answer makes late (the tiny base's answer is mostly broken UTF-8 bytes)
    stop = next(free[i : i + 2] for i in range(len(free) - 2, 1, -1) if "\ufffd" not in free[i : i + 2])
    req = GenerateRequest("text", "Salt?", None, None, 32, stop=[stop, "never-made"])
    chunks = asyncio.run(_collect(engine.stream(req)))
    text = _joined(chunks)
    assert stop not in text and not any(stop in c.text for c in chunks)
    assert text == engine.generate([req])[0].text and free.startswith(text)
    assert chunks[-1].finish_reason == "stop"


def test_a_consumer_that_goes_away_or_a_bad_request_fails_only_itself(served, engine, tmp_path):
    store, base, manifests = served
    stranger = make_adapter(
        store, BaseInfo(id="tiny", fingerprint="0" * 64, uri=base.uri), "text", 4, tmp_path, name="stranger2"
    )
    good = [
        GenerateRequest("text", "Boil an egg?", None, manifests["text"], 16),
        GenerateRequest("text", "Salt?", None, None, 16),
    ]
    leaver = GenerateRequest("text", "Leaving soon?", None, None, 16)
    bad = GenerateRequest("text", "Hi?", None, stranger, 16)

    async def main():
        return await asyncio.gather(
            *(_collect(engine.stream(r)) for r in good),
            _collect(engine.stream(leaver), 1),
            _collect(engine.stream(bad)),
            return_exceptions=True,
        )

    *kept, left, failed = asyncio.run(main())
    assert isinstance(failed, AdapterError) and "fingerprint" in str(failed)
    assert len(left) == 1 and left[0].result is None
    assert [_joined(c) for c in kept] == [r.text for r in engine.generate(good)]
    with pytest.raises(ValueError, match="question is empty"):
        asyncio.run(_collect(engine.stream(GenerateRequest("text", " ", None, None, 4))))


def test_settled_text_holds_back_what_may_still_change():
    from ddft.engines.detok import settled

    assert settled("  Boil it for 5 min", ["\n\n", "min."]) == "Boil it for 5"  # "min." may be coming
    assert settled("Boil it.\n", ["\n\n"]) == "Boil it."  # a blank, or the start of the stop string
    assert settled("Boil it.\n\nNext", ["\n\n"]) == "Boil it."
    assert settled("Caf\ufffd", []) == "Caf" and settled("Caf\ufffd!", []) == "Caf\ufffd!"


# -- logprobs and chat history -------------------------------------------------------------------------
def _raw_logprobs(engine, req) -> torch.Tensor:
    """log_softmax of the engine's own next-token logits for the prompt: step 0's raw distribution."""
    return engine.forward_logits([req])[0].log_softmax(-1)


def test_logprobs_are_the_raw_distribution_sorted_k_and_streamed_as_returned(served, engine):
    """Each token's logprob is log_softmax of the raw logits (step 0: forward_logits'), with exactly
    k alternatives, most likely first; greedy takes the first; a sampled row (temperature, top_p)
    and a constrained row report the raw distribution too, not the one they drew from; a stream's
    chunks carry their own tokens' logprobs, which add up to the result's."""
    from ddft.engines.grammar import Constraint

    _, _, m = served
    img, _ = _media(4)
    yes_no = Constraint.schema({"enum": ["yes", "no"]})
    reqs = [
        GenerateRequest("text", "How long do I boil an egg?", None, m["text"], 6, logprobs=5),
        GenerateRequest("image", prompts.QUESTIONS["image"], img, m["image"], 6, logprobs=20),
        GenerateRequest("text", "Salt?", None, None, 6, temperature=2.0, top_p=0.5, seed=3, logprobs=4),
        GenerateRequest("text", "Is it done?", None, m["text"], 6, constraint=yes_no, logprobs=3),
        GenerateRequest("text", "Salt?", None, None, 6, logprobs=0),
        GenerateRequest("text", "Salt?", None, None, 6),
    ]
    results = engine.generate(reqs)
    tok = engine.processor.tokenizer
    for req, res in zip(reqs[:-1], results):
        assert len(res.logprobs) == len(res.token_ids) and [lp.token_id for lp in res.logprobs] == res.token_ids
        raw = _raw_logprobs(engine, req)
        first = res.logprobs[0]
        assert abs(first.logprob - raw[first.token_id].item()) < 1e-4
        assert [t.token_id for t in first.top] == raw.topk(req.logprobs).indices.tolist()
        for lp in res.logprobs:
            assert len(lp.top) == req.logprobs and all(t.top == [] for t in lp.top)
            assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
            assert lp.token == tok.decode([lp.token_id]) and all(t.token == tok.decode([t.token_id]) for t in lp.top)
            if req.temperature == 0 and req.constraint is None and lp.top:
                assert lp.top[0].token_id == lp.token_id and lp.top[0].logprob == lp.logprob
    # the grammar's first token ('"') is not the model's likeliest: raw, not renormalized over the grammar
    assert (
        results[3].text in ('"yes"', '"no"') and results[3].logprobs[0].logprob < results[3].logprobs[0].top[0].logprob
    )
    assert results[-1].logprobs is None
    for req in reqs[:3]:
        chunks = asyncio.run(_collect(engine.stream(req)))
        assert all([lp.token_id for lp in c.logprobs] == c.token_ids for c in chunks)
        assert (
            [lp for c in chunks for lp in c.logprobs]
            == chunks[-1].result.logprobs
            == engine.generate([req])[0].logprobs
        )


def test_history_is_rendered_turn_by_turn_with_the_medium_where_it_was_given(served, engine):
    """A chat's earlier turns (system, user, assistant) come before the question, the image's
    placeholders in the turn that carried it; the answer follows the whole conversation."""
    from ddft.prompts import Turn

    _, _, m = served
    img, _ = _media(6)
    history = [
        Turn("system", "You are a cook."),
        Turn("user", "Look at this.", media=True),
        Turn("assistant", "A pie."),
    ]
    chat = GenerateRequest("image", "How do I bake it?", img, m["image"], 8, history=history)
    ids = engine._encode(chat)["input_ids"]
    text = engine.processor.tokenizer.decode(ids)
    image = engine.processor.image_token
    assert text.startswith("You are a cook. USER: " + image) and text.endswith(
        "\nLook at this. ASSISTANT: A pie. USER: How do I bake it? ASSISTANT:"
    )
    assert ids == prompts.encode(engine.processor, "image", "How do I bake it?", history=history)["input_ids"]
    alone = dataclasses.replace(chat, history=[])
    assert engine._encode(alone)["input_ids"] != ids
    with_history, _ = engine.generate([chat, alone])  # in one batch with another prompt length
    assert with_history.token_ids == engine.generate([chat])[0].token_ids
    assert (engine.forward_logits([chat])[0] - engine.forward_logits([alone])[0]).abs().max() > 1e-3  # it is read
