"""Session fixtures for the loop's integration tests: a local Ray cluster on 127.0.0.1 and a file
store holding the tiny base and a small synthetic kitchen, prepared once."""

import os

import pytest

from ddft.config import PipelineConfig, validate
from ddft.store import Store

KITCHEN = {"seed": 0, "dishes": 3, "images_per_dish": 4, "recipes": 6, "qa_pairs": 24}


def tiny_config(store_uri: str, steps: int = 8, **store_extra) -> PipelineConfig:
    def job(m: str) -> dict:
        return {
            "name": m,
            "modality": m,
            "resources": {"cpus_per_worker": 0.5},
            "lora": {"dropout": 0.0},
            "optim": {"lr": 1e-2, "projector_lr": 1e-2, "max_steps": steps, "batch_size": 2, "warmup_ratio": 0.0},
        }

    return validate(
        PipelineConfig,
        {
            "store": {"uri": store_uri, **store_extra},
            "base": {"id": "tiny", "build": "tiny"},
            "data": {"synthetic": KITCHEN},
            "jobs": [job(m) for m in ("image", "video", "text")],
        },
    )


def registered_checkpoint(store: Store, run: str) -> bool:
    """Ray Train has registered a checkpoint of the run (its snapshot names one: a checkpoint folder
    alone may still be on its way to the controller)."""
    snapshot = f"runs/{run}/checkpoint_manager_snapshot.json"
    try:
        return bool(store.exists(snapshot) and store.read_json(snapshot).get("latest_checkpoint_result"))
    except ValueError:  # caught mid-write
        return False


METRICS_PORT_ENV = "DDFT_TEST_RAY_METRICS_PORT"


@pytest.fixture(scope="session")
def ray_cluster():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    from ddft.cluster import ray_session

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Logical CPUs > cores on purpose: three small jobs, a Data map and a Serve replica at once.
    from ddft.cluster import free_port

    os.environ[METRICS_PORT_ENV] = str(free_port())  # where Ray's Prometheus exporter listens (test_train scrapes it)
    with ray_session(
        num_cpus=6,
        runtime_env={"env_vars": {"PYTHONPATH": repo}},
        metrics_export_port=int(os.environ[METRICS_PORT_ENV]),
    ) as ray:
        yield ray


@pytest.fixture(scope="session")
def prepared(ray_cluster, tmp_path_factory):
    """(config, store, base, {modality: Prepared}) for a file store with everything prepared."""
    from ddft.data.prepare import prepare_all
    from ddft.models.load import base_info

    cfg = tiny_config(str(tmp_path_factory.mktemp("store")))
    done = {p.modality: p for p in prepare_all(cfg)}
    store = Store.from_config(cfg.store)
    return cfg, store, base_info(store, "tiny"), done
