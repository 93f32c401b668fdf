"""The loop against a real S3 endpoint on 127.0.0.1: the base, raw data, Ray Data preparation,
Ray Train checkpoints and the published adapter all live in the bucket."""

import pytest

from ddft.adapters.registry import read_manifest
from ddft.data.prepare import prepare_all
from ddft.train.job import run_job
from tests.pipeline_fixture import tiny_config

pytestmark = pytest.mark.integration


def test_prepare_and_train_on_s3(ray_cluster, s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("DDFT_CACHE", str(tmp_path / "cache"))
    bucket = s3_endpoint.create_bucket("ddft-loop")
    cfg = tiny_config(f"s3://{bucket}/store", steps=4, **s3_endpoint.creds())
    cfg = cfg.model_copy(update={"jobs": [cfg.job("text")]})
    (prepared,) = prepare_all(cfg)
    assert prepared.modality == "text" and sum(prepared.counts.values()) == 24

    result = run_job(cfg, cfg.job("text"))
    assert result.status == "succeeded" and result.steps == 4 and result.adapter.startswith(f"s3://{bucket}/")

    keys = {o["Key"] for o in s3_endpoint.client().list_objects_v2(Bucket=bucket, MaxKeys=1000)["Contents"]}
    assert "store/models/tiny/model.safetensors" in keys
    assert any(
        k.startswith(f"store/datasets/prepared/text/{prepared.version}/") and k.endswith(".parquet") for k in keys
    )
    assert any(k.startswith("store/runs/text-") and "/checkpoint_" in k for k in keys)  # Ray Train on S3
    from ddft.store import Store

    manifest = read_manifest(Store.from_config(cfg.store), "ddft", "text")
    assert f"store/{manifest.key}/adapter_model.safetensors" in keys and manifest.metrics["steps"] == 4
