"""LoRA jobs on Ray Train: the loss falls on a fixed seed, the published adapter is complete,
reloads with PEFT and changes the output; train_all runs three jobs at the same time."""
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
import yaml

from ddft.adapters.registry import Manifest, download, read_manifest
from ddft.models.load import load_base, local_base_dir
from ddft.prompts import encode, pad_batch, pixel_inputs

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def test_one_lora_job(prepared, tmp_path):
    from peft import PeftModel

    from ddft.train.job import run_job

    cfg, store, base, _ = prepared
    result = run_job(cfg, cfg.job("video"))
    assert result.status == "succeeded" and result.steps == 8 and len(result.losses) == 8
    # The tiny random base starts at uniform (ln 262 = 5.57 nats); on a fixed seed it learns.
    assert result.losses[0] > 5.4 and result.losses[-1] < result.losses[0] - 0.2, result.losses

    manifest = read_manifest(store, "ddft", "video")
    assert result.adapter == store.url(manifest.key) and manifest.version >= 1
    for f in fields(Manifest):  # every field filled in
        assert getattr(manifest, f.name) not in (None, "", []) or f.name == "modules_to_save", f.name
    assert (manifest.modality, manifest.source, manifest.base_fingerprint) == ("video", "trained", base.fingerprint)
    assert manifest.metrics["steps"] == 8 and manifest.metrics["last_loss"] == result.losses[-1]
    assert manifest.modules_to_save == ["multi_modal_projector"]
    # LoRA sits on the language model only, never on the CLIP towers.
    assert store.read_json(f"{manifest.key}/manifest.json") == asdict(manifest)

    model, processor = load_base(local_base_dir(store, "tiny"))
    frames = [torch.randint(0, 255, (8, 224, 224, 3), dtype=torch.uint8).numpy()]
    batch = pad_batch([encode(processor, "video", "Give me the recipe.", "x", frames=8)],
                      processor.tokenizer.pad_token_id)
    batch.update(pixel_inputs(processor, "video", frames))
    with torch.no_grad():
        before = model(**batch).logits
        tuned = PeftModel.from_pretrained(model, download(store, manifest, tmp_path / "a"))
        names = [n for n, _ in tuned.named_modules() if n.endswith("lora_A")]
        assert names and all(".language_model." in n for n in names)
        after = tuned(**batch).logits
    assert (after - before).abs().max() > 1e-3


def test_train_all_runs_three_jobs_at_once(prepared, tmp_path):
    """The real entrypoint, as `ray job submit` runs it, against the running cluster; a fourth job
    whose dataset version doesn't exist fails at run time without stopping the others."""
    import ray

    cfg, store, _, _ = prepared
    broken = cfg.job("text").model_copy(update={"name": "broken", "dataset_version": "no-such-version"})
    config_path = tmp_path / "cfg.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_copy(update={"jobs": [*cfg.jobs, broken]})
                                          .model_dump(mode="json")))
    before = {m: (read_manifest(store, "ddft", m).version if read_manifest(store, "ddft", m) else 0)
              for m in ("image", "video", "text")}
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, str(REPO / "jobs/train_all.py"), "--config", str(config_path)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]  # one job failed
    line = next(l for l in out.stdout.splitlines() if l.startswith("DDFT_RESULTS "))
    results = {r["name"]: r for r in json.loads(line.removeprefix("DDFT_RESULTS "))}
    assert [results[n]["status"] for n in ("image", "video", "text", "broken")] == ["succeeded"] * 3 + ["failed"]
    assert "prepared text version no-such-version not found" in results["broken"]["error"]
    assert "job broken failed: StoreError: prepared text version no-such-version" in out.stderr
    ok = [results[n] for n in ("image", "video", "text")]
    # Their run times overlap: every job started before any job ended.
    assert max(r["started"] for r in ok) < min(r["ended"] for r in ok)
    for r in ok:
        assert r["steps"] == 8 and r["losses"][-1] < r["losses"][0]
        assert read_manifest(store, "ddft", r["modality"]).version == before[r["modality"]] + 1
    assert re.search(r"^broken\s+failed", out.stdout, re.M) and "adapter" in out.stdout  # the table


def test_train_all_on_a_store_without_data_says_what_to_run(ray_cluster, tmp_path):
    import ray

    from tests.pipeline_fixture import tiny_config

    config_path = tmp_path / "cfg.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(str(tmp_path / "empty")).model_dump(mode="json")))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out = subprocess.run([sys.executable, str(REPO / "jobs/train_all.py"), "--config", str(config_path),
                          "--only", "text"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert re.search(r"^text\s+failed\s+0\s", out.stdout, re.M), out.stdout  # the table row
    assert "job text failed: StoreError: base model 'tiny' is not in the store at file://" in out.stderr
    assert "run `ddft base build`" in out.stderr and "Traceback" not in out.stderr


def test_evaluate_scores_base_and_adapters_and_records_them(prepared):
    from ddft.train import evaluate

    cfg, store, _, _ = prepared
    if not read_manifest(store, "ddft", "video"):
        pytest.skip("needs the video adapter trained by test_one_lora_job")
    results = evaluate.evaluate(store, "tiny", modalities=("video",), limit=2, max_new_tokens=8)
    assert [r["model"] for r in results] == ["base:tiny", read_manifest(store, "ddft", "video").ref]
    for r in results:
        assert r["samples"] == 2 and 0 <= r["rouge_l"] <= 1 and 0 <= r["ingredient_f1"] <= 1
        assert r["example"]["reference"].startswith("Ingredients:")
    report = evaluate.save(store, results)
    assert report.startswith(store.url("eval/")) and report.endswith(".md")
    text = store.read_text(report.removeprefix(store.uri + "/"))
    assert "| video | base:tiny | 2 |" in text and "| video | ddft/video/v" in text
    assert read_manifest(store, "ddft", "video").metrics["eval"]["samples"] == 2
