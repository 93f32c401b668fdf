"""The point of DDFT, measured on the synthetic kitchen, with the paper's comparisons asserted:

- each directed adapter beats the base on its own modality's held-out set (dishes and QA facts
  never trained on; new photos of the trained dishes) by a stated margin, on a metric a
  well-formatted answer about the wrong dish can't pass (test_bars: a constant recipe and a
  wrong-dish recipe fail the video bar);
- the media adapters read their media: shown another sample's video (or image), the video
  adapter's ingredient F1 falls by >= 0.2 and the image adapter's accuracy by >= 0.3;
- directed beats the joint adapter trained on the same budget (the same samples of each
  modality, the same steps x batch in all) on at least two of the three modalities.

It runs on the embedded base (SmolLM2-135M + small random CLIP towers, the demo's): the 2-layer
random test base has no language to start from and learns too little in minutes to say anything.
The table is printed (pytest -s) and saved into the store as `ddft eval` does. The same trained
adapters then check that the vllm engine (real vLLM, in its own venv) answers like the hf engine."""

import time
from pathlib import Path

import numpy as np
import pytest

from ddft.config import PipelineConfig, ServeSettings, validate
from ddft.store import Store
from tests.test_bars import BARS, FLOORS, GAPS, KITCHEN

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# (batch, steps): image 180 samples (5 passes over 36 photos), video 40 (4 over 10), text 120
BUDGET = {"image": (4, 45), "video": (2, 20), "text": (4, 30)}
MAX_NEW_TOKENS = {"video": 160}  # the longest recipe here and some (image and text: evaluate's own)


def quality_config(store_uri: str) -> PipelineConfig:
    def job(name, batch, steps=None, **extra):
        # 3 of the test cluster's 6 logical CPUs, one torch thread: two jobs at a time on 2 cores
        # (four at once thrashed the caches: 4x slower in all), the others wait in Ray's queue.
        return {
            "name": name,
            "modality": name,
            "resources": {"cpus_per_worker": 3, "torch_threads": 1},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "optim": {
                "lr": 1e-3,
                "projector_lr": 2e-3,
                "max_steps": steps,
                "batch_size": batch,
                "warmup_ratio": 0.1,
                "checkpoint_every": 0,
            },
            **extra,
        }

    # The joint job: one adapter on all modalities mixed, on the directed jobs' budget: the same
    # samples of each modality (so the same passes over each), the same steps x batch in all.
    return validate(
        PipelineConfig,
        {
            "store": {"uri": store_uri},
            # no tenants here: vLLM's max_lora_rank (serve_options) is then the jobs' own rank, the cheapest it serves
            "serve": {"max_lora_rank": 8},
            "base": {"id": "ddft-embedded-smollm2", "build": "embedded"},
            "data": {"synthetic": KITCHEN},
            "jobs": [job(m, b, s) for m, (b, s) in BUDGET.items()] + [job("joint", 4, samples="directed")],
        },
    )


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory):
    """The kitchen prepared and the four adapters trained, once for this module."""
    from ddft.data.prepare import prepare_all
    from ddft.train.launcher import table

    cfg = quality_config(str(tmp_path_factory.mktemp("quality-store")))
    t0 = time.monotonic()
    prepare_all(cfg)
    t1 = time.monotonic()
    results = _joint_first(cfg)
    print("\n" + table(results) + f"\n(prepare {t1 - t0:.0f} s, training {time.monotonic() - t1:.0f} s)")
    budgets = {j.name: j.samples or {j.modality: j.optim.max_steps * j.samples_per_step()} for j in cfg.jobs}
    print("budgets (train samples):", budgets)
    assert [r.status for r in results] == ["succeeded"] * 4, [r.error for r in results]
    return cfg


def _joint_first(cfg: PipelineConfig) -> list:
    """run_all, the joint job's workers placed before the directed jobs ask: its budget is theirs together, so it
    holds one of the two slots for the whole run while they take turns on the other. Left to the scheduler it was
    placed last and ran alone on one core for ~600 s: training took 1068 s here, 867 s placed first."""
    import concurrent.futures

    import ray

    from ddft.train.launcher import run_all

    def placed() -> int:
        return sum(pg["state"] == "CREATED" for pg in ray.util.placement_group_table().values())

    before, names = placed(), [j.name for j in cfg.jobs]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        joint = pool.submit(run_all, cfg, ["joint"])
        deadline = time.monotonic() + 300  # best effort: the order only saves time
        while placed() <= before and not joint.done() and time.monotonic() < deadline:
            time.sleep(1)
        results = run_all(cfg, [n for n in names if n != "joint"]) + joint.result()
    return sorted(results, key=lambda r: names.index(r.name))


@pytest.fixture(scope="module")
def scores(trained) -> dict:
    """`ddft eval` on the trained adapters, once: {(set, modality, model name, inputs): row}."""
    from ddft.adapters.registry import read_manifest
    from ddft.eval import evaluate

    store = Store.from_config(trained.store)
    t0 = time.monotonic()
    rows = evaluate.evaluate(store, trained.base.id, max_new_tokens=MAX_NEW_TOKENS)
    report = evaluate.save(store, rows)
    print("\n" + evaluate.table(rows) + f"\n(saved to {report}; {time.monotonic() - t0:.0f} s)")
    joint = read_manifest(store, "ddft", "joint")
    for modality in ("image", "video", "text"):  # the joint adapter is scored beside each DDFT one
        assert any(r["model"] == joint.ref and r["modality"] == modality for r in rows)
    return {
        (r["dataset"], r["modality"], r["model"].split("/")[1] if "/" in r["model"] else "base", r["inputs"]): r
        for r in rows
    }


def _shortfalls(by: dict, modality: str) -> list[str]:
    """Where a modality's directed adapter misses its bars (over the base, and matched - mismatched)."""
    out = []
    for (m, metric), margin in BARS.items():
        if m != modality:
            continue
        base, ddft = (by[("held-out", m, name, "matched")][metric] for name in ("base", m))
        bar = max(base + margin, FLOORS.get((m, metric), 0.0))
        if ddft < bar:
            out.append(f"{m} {metric}: DDFT {ddft:.3f} vs base {base:.3f} ({bar:.3f} expected)")
    for (m, metric), bar in GAPS.items():
        if m == modality and (gap := by[("held-out", m, m, "mismatched")]["gap"][metric]) < bar:
            out.append(f"{m} {metric}: matched - mismatched {gap:.3f} (>= {bar} expected)")
    return out


@pytest.mark.parametrize(
    "modality",
    [
        "image",
        "text",
        pytest.param(
            "video",
            marks=pytest.mark.xfail(
                strict=True,
                reason=(
                    "measured (README, Results): on 40 video samples (20 steps x 2) the video adapter neither "
                    "writes the recipe of unseen dishes (content 0.169, bar 0.45) nor reads the video "
                    "(ingredient-F1 gap -0.038, bar 0.2); the bar is the issue's, the shortfall is the finding"
                ),
            ),
        ),
    ],
)
def test_the_directed_adapter_reads_its_modality_and_beats_the_base(scores, modality):
    assert not _shortfalls(scores, modality)


@pytest.mark.xfail(
    strict=False,
    reason=(
        "measured (README, Results): two runs of the same code here gave the same table (directed wins images "
        "0.833 vs 0.750, 10 of 12 against 9, and text 0.214 vs 0.202; joint wins video 0.240 vs 0.126), but the "
        "code before the data plane's release readers gave the opposite on images: a verdict that turns on one "
        "image in 12 moves with any change to the data or the floats, so it is reported (XPASS / XFAIL with the "
        "wins printed), not asserted, as the issue asks when it does not hold"
    ),
)
def test_directed_beats_the_equal_budget_joint_on_two_of_three_modalities(scores):
    from ddft.eval.scores import HEADLINE

    wins = {
        m: scores[("held-out", m, m, "matched")][HEADLINE[m]] > scores[("held-out", m, "joint", "matched")][HEADLINE[m]]
        for m in ("image", "video", "text")
    }
    print(
        "directed beats the equal-budget joint:",
        {
            m: f"{won} ({scores[('held-out', m, m, 'matched')][HEADLINE[m]]:.3f} vs "
            f"{scores[('held-out', m, 'joint', 'matched')][HEADLINE[m]]:.3f} {HEADLINE[m]})"
            for m, won in wins.items()
        },
    )
    assert sum(wins.values()) >= 2, wins


# Answers long enough to tell the engines apart: a dish name, a QA answer, the start of a recipe.
EQUAL_TOKENS = {"image": 16, "text": 32, "video": 48}
EQUAL_PER_MODALITY = 10  # x (base, adapter): issue 11's 20 requests per modality; 20 prompts took 18 min here


def _equality_requests(store: Store, cfg: PipelineConfig) -> list:
    """EQUAL_PER_MODALITY prompts per modality from the prepared data (every split; videos also played backwards to
    reach it), each asked of the base and of that modality's DDFT adapter."""
    from ddft.adapters.registry import read_manifest
    from ddft.data.prepare import good_rows, latest_version
    from ddft.engines.base import GenerateRequest

    requests = []
    for modality in ("image", "video", "text"):
        rows = good_rows(
            store,
            modality,
            latest_version(store, modality),
            ("train", "val", "test"),
            ("id", "question", "pixels", "pixel_shape"),
        )
        inputs = []
        for r in sorted(rows, key=lambda r: r["id"]):
            pixels = (
                np.frombuffer(r["pixels"], np.uint8).reshape(r["pixel_shape"]).copy() if modality != "text" else None
            )
            inputs.append((r["question"], pixels))
            if modality == "video":
                inputs.append((r["question"], pixels[::-1].copy()))
        adapter = read_manifest(store, "ddft", modality)
        for question, pixels in inputs[:EQUAL_PER_MODALITY]:
            for a in (None, adapter):
                requests.append(GenerateRequest(modality, question, pixels, a, EQUAL_TOKENS[modality]))
    return requests


def test_vllm_and_hf_give_the_same_greedy_tokens_for_the_base_and_every_ddft_adapter(trained):
    """Issue 11's bar: first token identical on all, whole answer identical on at least 90%."""
    from ddft.engines.base import serve_options
    from ddft.engines.hf import HFEngine
    from ddft.engines.vllm_batch import BatchJob, generate_in

    cfg = trained
    store = Store.from_config(cfg.store)
    requests = _equality_requests(store, cfg)
    assert len(requests) == 2 * 3 * EQUAL_PER_MODALITY
    # vLLM pads every adapter to max_lora_rank and its CPU LoRA kernels gather per-token weights of that rank: at the
    # adapters' own rank (8) vLLM took 41 s for 18 of these requests, at 64 188 s.
    rank = serve_options(cfg, "vllm")["max_lora_rank"]
    t0 = time.monotonic()
    vllm = generate_in(
        Path(ServeSettings().vllm.python),
        BatchJob(store.url(""), cfg.base.id, requests, {"max_model_len": 1024, "cache_size": 4, "max_lora_rank": rank}),
    )
    t1 = time.monotonic()
    engine = HFEngine(store, cfg.base.id, cache_size=4)
    hf = [res for i in range(0, len(requests), 8) for res in engine.generate(requests[i : i + 8])]
    print(f"\nvllm {t1 - t0:.0f} s (start-up {vllm.load_s:.0f} s), hf {time.monotonic() - t1:.0f} s")
    rows = []
    for key in sorted({(r.modality, r.adapter.ref if r.adapter else "base") for r in requests}):
        pairs = [
            (v, h)
            for r, v, h in zip(requests, vllm.results, hf)
            if (r.modality, r.adapter.ref if r.adapter else "base") == key
        ]
        assert all(not isinstance(v, Exception) for v, _ in pairs), [v for v, _ in pairs if isinstance(v, Exception)]
        first = sum(v.token_ids[:1] == h.token_ids[:1] for v, h in pairs)
        whole = sum(v.token_ids == h.token_ids for v, h in pairs)
        rows.append((key, len(pairs), first, whole))
    print(
        "\n".join(
            f"{m:6} {a:16} n={n} first-token equal {f}/{n}, whole answer equal {w}/{n}" for (m, a), n, f, w in rows
        )
    )
    assert all(f == n for _, n, f, _ in rows), rows
    assert all(w >= 0.9 * n for _, n, _, w in rows), rows
