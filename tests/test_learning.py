"""A short learning check on the embedded base (SmolLM2-135M with small random CLIP towers, the
demo's base): one small text job on Ray Train over the synthetic kitchen's cooking questions. Its
loss falls; asked questions it trained on, the adapter gives the training answers, which the base
does not; and vLLM (real vLLM in its own venv) gives the hf engine's greedy tokens for the base and
the trained adapter. How well each modality's adapter learns, against the base and the joint
adapter, is evidence that needs more budget: `make bench-quality` (bench/quality.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ddft.config import PipelineConfig, ServeSettings, validate
from ddft.store import Store

# the module fixture builds the embedded base, prepares and trains: the first test carries it
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

BASE = "ddft-embedded-smollm2"
KITCHEN = {"seed": 0, "dishes": 2, "held_out_dishes": 0, "images_per_dish": 2, "recipes": 3, "qa_pairs": 16}
STEPS, BATCH = 24, 4
PROBES = 4  # training questions asked back
ANSWER_TOKENS = 16  # the kitchen's answers are a few words


def learning_config(store_uri: str) -> PipelineConfig:
    return validate(
        PipelineConfig,
        {
            "store": {"uri": store_uri},
            "serve": {"max_lora_rank": 8},
            "base": {"id": BASE, "build": "embedded"},
            "data": {"synthetic": KITCHEN},
            "jobs": [
                {
                    "name": "text",
                    "modality": "text",
                    "resources": {"cpus_per_worker": 2, "torch_threads": 2},
                    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                    "optim": {
                        "lr": 2e-3,
                        "max_steps": STEPS,
                        "batch_size": BATCH,
                        "warmup_ratio": 0.1,
                        "checkpoint_every": 0,
                    },
                }
            ],
        },
    )


@pytest.fixture(scope="module")
def learned(ray_cluster, tmp_path_factory):
    """(store, job result, adapter manifest, [(question, training answer)]): the job trained once."""
    from ddft.adapters.registry import read_manifest
    from ddft.data.prepare import good_rows, latest_version, prepare_all
    from ddft.train.job import run_job

    cfg = learning_config(str(tmp_path_factory.mktemp("learning-store")))
    prepare_all(cfg)
    result = run_job(cfg, cfg.job("text"))
    assert result.status == "succeeded", result.error
    store = Store.from_config(cfg.store)
    rows = good_rows(store, "text", latest_version(store, "text"), ("train",), ("id", "question", "answer"))
    seen, probes = set(), []
    for r in sorted(rows, key=lambda r: r["id"]):
        if r["answer"] not in seen and len(probes) < PROBES:  # distinct answers: not one answer for all
            seen.add(r["answer"])
            probes.append((r["question"], r["answer"]))
    assert len(probes) == PROBES, rows
    return store, result, read_manifest(store, "ddft", "text"), probes


def _requests(adapter, probes) -> list:
    from ddft.engines.base import GenerateRequest

    return [GenerateRequest("text", q, None, a, ANSWER_TOKENS) for a in (None, adapter) for q, _ in probes]


def test_the_loss_falls(learned):
    _, result, _, _ = learned
    losses = result.losses
    assert len(losses) == STEPS
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"loss {first:.3f} -> {last:.3f}: {[round(x, 3) for x in losses]}")
    assert last < 0.5 * first, losses


def test_the_adapter_answers_training_questions_with_the_training_answers(learned):
    from ddft.engines.hf import HFEngine

    store, _, adapter, probes = learned
    results = HFEngine(store, BASE, cache_size=2).generate(_requests(adapter, probes))
    base, tuned = results[:PROBES], results[PROBES:]
    got = [(q, a, t.text.strip()) for (q, a), t in zip(probes, tuned)]
    print("\n".join(f"{q!r}: {t!r} (trained on {a!r}; base {b.text.strip()!r})" for (q, a, t), b in zip(got, base)))
    assert all(t == a for _, a, t in got), got
    assert all(b.text.strip() != a for (_, a), b in zip(probes, base))  # the training taught it


def test_vllm_gives_hf_greedy_tokens_for_the_base_and_the_trained_adapter(learned):
    from ddft.engines.hf import HFEngine
    from ddft.engines.vllm_batch import BatchJob, generate_in

    store, _, adapter, probes = learned
    requests = _requests(adapter, probes)
    engine = {"max_model_len": 512, "cache_size": 2, "max_lora_rank": 8}
    vllm = generate_in(Path(ServeSettings().vllm.python), BatchJob(store.url(""), BASE, requests, engine), timeout=600)
    hf = HFEngine(store, BASE, cache_size=2).generate(requests)
    assert all(not isinstance(v, Exception) for v in vllm.results), vllm.results
    assert [v.token_ids for v in vllm.results] == [h.token_ids for h in hf]
    assert [v.adapter for v in vllm.results[PROBES:]] == [adapter.ref] * PROBES
