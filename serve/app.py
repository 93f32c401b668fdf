"""The ddft Ray Serve application: an HTTP gateway (serve/gateway.py) in front of model replicas
(serve/model_server.py), one base each, adapters multiplexed over them.

    serve run serve/config.yaml          # or: serve run serve.app:build_app config=jobs/configs/demo.yaml

The pipeline config's `serve:` section sizes the replicas, batching and limits; the serve YAML
can override any deployment option (autoscaling_config for ModelServer, for one).
"""

import os
from pathlib import Path

from ray import serve

from ddft import config as ddft_config
from ddft.models.load import base_info
from ddft.store import Store
from serve.auth import sha256
from serve.gateway import Gateway
from serve.model_server import ModelServer


def model_deployment(cfg: ddft_config.PipelineConfig):
    """ModelServer with Serve multiplexing sized to the adapter cache and a bounded queue.

    The subclass is made here (not importable by name), so Ray ships it by value with the
    configured `max_num_models_per_replica`.
    """
    s = cfg.serve
    cls = type("ConfiguredModelServer", (ModelServer,), {
        "load_adapter": serve.multiplexed(max_num_models_per_replica=s.adapter_cache_size)(ModelServer.load_adapter)})
    return serve.deployment(
        cls, name="ModelServer", num_replicas=s.num_replicas,
        # a replica takes two batches' worth at once (one running, one forming); the rest wait in
        # the bounded queue, and beyond it the gateway answers 503 + Retry-After
        max_ongoing_requests=2 * s.max_batch_size, max_queued_requests=s.max_queued_requests,
        health_check_period_s=5, health_check_timeout_s=60, graceful_shutdown_timeout_s=5,
        ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica})


def build_app(args: dict):
    """Ray Serve application builder: args = {"config": "<PipelineConfig YAML>"}.

    The config is validated first (ConfigError lists every problem) and the base must be in the
    store, before any Serve work starts.
    """
    args = dict(args or {})
    path = args.pop("config", None)
    problems = [f"{k}: unknown argument (value {v!r}); the only argument is config" for k, v in args.items()]
    if not path:
        problems.append("config: required; e.g. serve run serve.app:build_app config=jobs/configs/demo.yaml")
    if problems:
        raise ddft_config.ConfigError("serve arguments", problems)
    cfg = ddft_config.load(Path(path))
    store = Store.from_config(cfg.store)
    base_info(store, cfg.base.id)  # StoreError naming the fix when the base is missing
    s = cfg.serve
    admin_key = os.environ.get(s.admin_key_env)
    model = model_deployment(cfg).bind(
        store, cfg.base.id, engine=s.engine, cache_size=s.adapter_cache_size,
        device="cuda" if s.gpus_per_replica > 0 else "cpu", max_batch_size=s.max_batch_size,
        batch_wait_timeout_s=s.batch_wait_timeout_s)
    return Gateway.bind(model, cfg, store, sha256(admin_key) if admin_key else None)


def run(config_path: str | Path, blocking: bool = False) -> str:
    """Start Serve on the config's host/port, deploy the app, return its base URL (the demo's path)."""
    cfg = ddft_config.load(Path(config_path))
    app = build_app({"config": str(config_path)})
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name="ddft", route_prefix="/", blocking=blocking)
    return f"http://{cfg.serve.host}:{cfg.serve.port}"
