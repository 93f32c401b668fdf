"""`ddft eval` and the engine that answers: save records each adapter's scores through the registry
(registry.record_metrics), and an adapter deleted meanwhile is a note, not a manifest brought back;
then, on the prepared test store, `ddft eval --engine vllm` answers through vLLM's own environment
with the greedy texts of `--engine hf`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from ddft.adapters import registry
from ddft.config import ServeSettings
from ddft.eval import evaluate
from ddft.store import Store
from tests.test_eval_chart import IMAGE, VIDEO, results
from tests.test_registry_scale import BASE, _adapter_files

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ServeSettings().vllm.python


def test_save_records_scores_through_the_registry_and_notes_a_deleted_adapter(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "store"))
    for name, modality in (("video", "video"), ("joint", "joint"), ("image", "image")):
        registry.publish(store, _adapter_files(), owner="ddft", name=name, modality=modality, base=BASE, source="t")
    registry.publish(store, _adapter_files(), owner="ddft", name="video", modality="video", base=BASE, source="t")
    registry.publish(store, _adapter_files(), owner="ddft", name="image", modality="image", base=BASE, source="t")
    registry.publish(store, _adapter_files(), owner="ddft", name="image", modality="image", base=BASE, source="t")
    registry.delete(store, "ddft", "image", 3)  # IMAGE (ddft/image/v3) went after it was scored
    calls = []
    record = registry.record_metrics

    def spy(store, manifest, updates):
        calls.append((manifest.ref, sorted(updates["eval"])))
        return record(store, manifest, updates)

    monkeypatch.setattr(evaluate, "record_metrics", spy)
    rows = evaluate.Results([{**r, "engine": "vllm"} for r in results()], ["a note"], engine="vllm")
    report = evaluate.save(store, rows)

    assert sorted(calls) == [  # one write per adapter, every set it was scored on
        ("ddft/joint/v1", ["held-out", "held-out (mismatched)"]),
        (VIDEO, ["held-out", "held-out (mismatched)", "in-distribution", "youcook2"]),
    ]
    evals = registry.read_manifest(store, "ddft", "video", 2).metrics["eval"]
    assert evals["held-out"]["content"] == 0.625 and evals["held-out"]["engine"] == "vllm"
    assert evals["held-out (mismatched)"]["gap"]["content"] == pytest.approx(0.375)
    assert evals["youcook2"]["report"] == str(report)
    assert registry.read_manifest(store, "ddft", "video", 1).metrics == {}  # only the version scored
    assert registry.read_manifest(store, "ddft", "image", 3) is None  # not brought back
    assert report.notes == [f"{IMAGE}: deleted since it was evaluated; its scores are in this report only"]
    text = store.read_text(str(report).removeprefix(store.url() + "/"))
    assert text.startswith("Answers generated on the vllm engine (greedy).\n\n| dataset |")
    assert "- a note" in text and f"- {IMAGE}: deleted since" in text
    assert {r["engine"] for r in json.loads(store.read_text(report.json.removeprefix(store.url() + "/")))} == {"vllm"}


@pytest.mark.integration
@pytest.mark.timeout(1200)  # the prepared store (Ray, Ray Data), vLLM's start on 2 cores, then hf
@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"no vLLM environment at {VLLM_PYTHON}: make venv-vllm")
def test_eval_on_vllm_gives_the_greedy_texts_of_hf(prepared, tmp_path, monkeypatch, capsys):
    from ddft import cli
    from ddft.engines import vllm_batch
    from ddft.eval import generate
    from tests.test_engine_hf import make_adapter

    cfg, prepared_store, base, _ = prepared
    root = tmp_path / "store"  # the prepared store's base and data, with adapters of its own
    for part in ("models", "datasets"):
        shutil.copytree(prepared_store.local_path(part), root / part)
    store = Store(str(root))
    adapters = {m: make_adapter(store, base, m, seed, tmp_path) for seed, m in enumerate(("image", "video", "text"))}
    doc = cfg.model_dump(mode="json") | {"store": {"uri": str(root)}}
    doc["serve"]["vllm"] |= {"python": str(VLLM_PYTHON), "max_model_len": 1024}  # the tiny base's positions
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(doc))

    # short answers: the two engines' greedy tokens agree on these adapters (test_engine_vllm), and it stays quick
    monkeypatch.setattr(evaluate, "MAX_NEW_TOKENS", {"image": 8, "text": 12, "video": 12})
    answered, batches = {}, []
    real_generate, real_generate_in = generate.generate, vllm_batch.generate_in

    def recorded(store, base_id, requests, engine, *args):
        answered[engine] = (
            [(r.modality, r.adapter.ref if r.adapter else None, r.question) for r in requests],
            (real_generate(store, base_id, requests, engine, *args)),
        )
        return answered[engine][1]

    def batch(python, job, *args, **kwargs):
        batches.append((python, job.engine))
        return real_generate_in(python, job, *args, **kwargs)

    monkeypatch.setattr(generate, "generate", recorded)
    monkeypatch.setattr(vllm_batch, "generate_in", batch)
    reports = {}
    for engine in ("vllm", "hf"):
        code = cli.main(["eval", "--config", str(config), "--engine", engine, "--limit", "1", "--quiet"])
        out, err = capsys.readouterr()
        assert code == 0, err[-3000:]
        assert out.startswith(f"Answers generated on the {engine} engine (greedy).")
        md = out.split("written to ")[1].split()[0]  # read now: a run in the same second would write over it
        reports[engine] = store.read_json(md[len(store.url()) + 1 :].removesuffix(".md") + ".json")

    ((python, options),) = batches  # vLLM ran once, for every set, with serving's engine keywords
    assert python == str(VLLM_PYTHON) and options["max_model_len"] == 1024 and options["max_lora_rank"] == 16
    (vllm_asked, vllm_texts), (hf_asked, hf_texts) = answered["vllm"], answered["hf"]
    assert vllm_asked == hf_asked and {a for _, a, _ in vllm_asked} == {None} | {m.ref for m in adapters.values()}
    # image held-out 3 (base, adapter, adapter mismatched); video held-out 3, in-distribution 2, youcook2 2; text 3 + 2
    assert len(vllm_asked) == 15
    assert vllm_texts == hf_texts and any(vllm_texts)
    drop = ("engine", "example")
    assert [{k: v for k, v in r.items() if k not in drop} for r in reports["vllm"]] == [
        {k: v for k, v in r.items() if k not in drop} for r in reports["hf"]
    ]
    assert {r["engine"] for r in reports["vllm"]} == {"vllm"} and {r["engine"] for r in reports["hf"]} == {"hf"}
    evals = registry.read_manifest(store, "ddft", "video").metrics["eval"]
    assert evals["held-out"]["engine"] == "hf"  # the later run's scores
