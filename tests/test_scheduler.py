"""The hf engine's continuous batching (engines/scheduler.py): rows join a running batch mid-way
and leave at their own end, and every greedy answer is the one its request gets alone."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from ddft import prompts
from ddft.engines.base import EngineBusy, GenerateRequest, make_engine
from ddft.engines.grammar import Constraint
from tests import test_engine_hf
from tests.test_engine_hf import _media
from tests.test_grammar import answer, published

served, engine = test_engine_hf.served, test_engine_hf.engine  # the same fixtures (this module's instances)


async def _staggered(engine, reqs: list[GenerateRequest], after: int = 3) -> list:
    """Start the first request; start each next one once the one before has streamed `after`
    tokens, so it arrives while the others are mid-generation. The results, in order."""
    results, going = [None] * len(reqs), [asyncio.Event() for _ in reqs]

    async def run(i):
        n = 0
        async for chunk in engine.stream(reqs[i]):
            n += len(chunk.token_ids)
            if n >= after:
                going[i].set()
            if chunk.result is not None:
                results[i] = chunk.result
        going[i].set()

    tasks = []
    for i in range(len(reqs)):
        tasks.append(asyncio.create_task(run(i)))
        await going[i].wait()
    await asyncio.gather(*tasks)
    return results


def _late_stop(text: str) -> str:
    """Two characters the answer makes late (the tiny base's answers are mostly broken UTF-8 bytes)."""
    return next(text[i : i + 2] for i in range(len(text) - 2, 1, -1) if "\ufffd" not in text[i : i + 2])


def test_rows_joining_mid_way_answer_as_alone(served, engine):
    """Six requests arrive one after another while the earlier ones generate: other adapters, other
    modalities, a grammar row, a stop-string row and a seeded sampled row. Each one's tokens are its
    solo tokens, and they did share steps."""
    _, _, m = served
    img, vid = _media(5)
    free = engine.generate([GenerateRequest("text", "Salt?", None, None, 32)])[0].text
    reqs = [
        GenerateRequest("text", "How long do I boil an egg?", None, m["text"], 40),
        GenerateRequest("image", prompts.QUESTIONS["image"], img, m["image"], 24),
        GenerateRequest("video", "Recipe?", vid, m["video"], 40, constraint=Constraint.recipe()),
        GenerateRequest("text", "Salt?", None, None, 32, stop=[_late_stop(free), "never-made"]),
        GenerateRequest("video", prompts.QUESTIONS["video"], vid, None, 16),
        GenerateRequest("text", "Pasta?", None, m["text"], 16, temperature=0.8, seed=11),
    ]
    alone = [engine.generate([r])[0] for r in reqs]
    together = asyncio.run(_staggered(engine, reqs))
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.text for r in together] == [r.text for r in alone]
    assert together[3].finish_reason == "stop" and _late_stop(free) not in together[3].text
    published("RecipeAnswer").validate(answer(together[2].text, together[2].finish_reason))
    # each joined a batch already running, and the first one shared steps with the later ones
    assert all(r.timings["batch_size"] > 1 for r in together)
    assert together[0].timings["batch_size"] >= 3 and together[0].timings["adapters_in_batch"] >= 2


def test_a_short_request_is_not_held_behind_a_long_one(served, engine):
    """A short question that arrives while a long answer runs gets its answer first, its first token
    at the next step rather than after the long one."""
    _, _, m = served
    long = GenerateRequest("text", "How long do I boil an egg?", None, m["text"], 160)
    short = GenerateRequest("text", "Salt?", None, None, 4)
    finished = []

    async def main():
        going = asyncio.Event()

        async def run(req, tag):
            result = None
            async for chunk in engine.stream(req):
                result = chunk.result or result
                going.set()  # the long one has streamed: it is running
            finished.append(tag)
            return result

        first = asyncio.create_task(run(long, "long"))
        await going.wait()
        return await asyncio.gather(first, run(short, "short"))

    got_long, got_short = asyncio.run(main())
    assert finished == ["short", "long"]
    assert got_long.finish_reason == "length" and got_long.timings["new_tokens"] == 160
    assert got_short.token_ids == engine.generate([short])[0].token_ids
    assert got_long.token_ids == engine.generate([long])[0].token_ids


def test_bounds_rows_cache_and_waiting(served):
    """At most max_batch_size rows run at once (the others wait and answer the same); a request that
    can't fit the cache even alone is refused with the setting to change; a full waiting queue
    refuses more (503 at the gateway)."""
    store, base, m = served
    small = make_engine("hf", store=store, base_model_id=base.id, max_batch_size=2, max_cached_tokens=2048)
    reqs = [GenerateRequest("text", q, None, m["text"], 8) for q in ("Boil?", "Salt?", "Fry?")]
    got = small.generate(reqs)
    assert max(r.timings["batch_size"] for r in got) == 2
    assert got[2].timings["queue_s"] > 0
    assert [r.token_ids for r in got] == [small.generate([r])[0].token_ids for r in reqs]
    with pytest.raises(ValueError, match="serve.max_cached_tokens"):
        small.generate([GenerateRequest("text", "Recipe?", None, None, 2100)])  # its answer alone: > 2048
    assert small.figures()["running_rows"] == 0 and small.figures()["waiting_rows"] == 0

    busy = make_engine("hf", store=store, base_model_id=base.id, max_waiting=1)
    with busy._lock:  # the scheduler can't take anyone while this holds the engine
        (first,) = busy._scheduler.submit([busy._row(reqs[0])])
        with pytest.raises(EngineBusy, match="already waiting"):
            busy._scheduler.submit([busy._row(reqs[1])])
    assert first.done.result(60).token_ids == got[0].token_ids


def test_a_closed_stream_frees_its_row_at_the_next_step(served, engine):
    _, _, m = served
    keep = GenerateRequest("text", "Boil an egg?", None, m["text"], 400)
    leave = dataclasses.replace(keep, question="Salt?", adapter=None)
    running = []

    async def main():
        async def leaver():
            stream = engine.stream(leave)
            async for _ in stream:
                break
            await stream.aclose()
            for _ in range(500):  # the next step retires it: from two rows to one
                await asyncio.sleep(0.01)
                if engine.figures()["running_rows"] != 2:
                    break
            running.append(engine.figures()["running_rows"])

        async def keeper():
            result = None
            async for chunk in engine.stream(keep):
                result = chunk.result or result
            return result

        return await asyncio.gather(keeper(), leaver())

    kept, _ = asyncio.run(main())
    assert running == [1]  # only the kept row still runs
    assert kept.token_ids == engine.generate([keep])[0].token_ids


def test_top_p_samples_from_the_nucleus_only():
    """The smallest set of likeliest tokens whose mass reaches top_p: here probabilities .5 .3 .15 .05
    and top_p .75 keep the first two, drawn in their own proportions (5:3); top_p 1 keeps all."""
    import torch

    from ddft.engines.scheduler import sample

    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, 1.0, 0.75, gen) for _ in range(4000)])
    assert set(draws.tolist()) == {0, 1} and abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    draws = torch.stack([sample(logits, 1.0, 1.0, gen) for _ in range(4000)])
    assert set(draws.tolist()) == {0, 1, 2, 3}
    assert sample(logits, 5.0, 1e-9, gen) == 0  # only the likeliest: greedy whatever the temperature


def test_top_p_rows_tiny_is_greedy_and_a_seeded_one_answers_as_alone(served, engine):
    """A sampled row with top_p tiny answers as greedy does; a seeded row with top_p < 1 gets the
    same tokens alone and joining a running batch of other adapters, modalities and sampling, and
    its own tokens differ from top_p 1's (the nucleus acts)."""
    _, _, m = served
    img, _ = _media(7)
    greedy = GenerateRequest("text", "How long do I boil an egg?", None, m["text"], 24)
    tiny = dataclasses.replace(greedy, temperature=1.5, top_p=1e-9, seed=5)
    nucleus = GenerateRequest("text", "Pasta?", None, None, 24, temperature=1.0, top_p=0.3, seed=11)
    others = [
        GenerateRequest("image", prompts.QUESTIONS["image"], img, m["image"], 24, temperature=0.9, seed=2),
        GenerateRequest("text", "Salt?", None, m["text"], 24, top_p=0.1),  # greedy: top_p means nothing
    ]
    assert engine.generate([tiny])[0].token_ids == engine.generate([greedy])[0].token_ids
    alone = engine.generate([nucleus])[0].token_ids
    together = asyncio.run(_staggered(engine, [*others, nucleus, tiny]))
    assert together[2].token_ids == alone and together[2].timings["batch_size"] > 1
    assert together[3].token_ids == engine.generate([greedy])[0].token_ids
    assert alone != engine.generate([dataclasses.replace(nucleus, top_p=1.0)])[0].token_ids
