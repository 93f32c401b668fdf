"""Connect to (or start) a Ray cluster that stays on 127.0.0.1, and always shut down after."""

from __future__ import annotations

import contextlib
import os

LOCAL_IP = "127.0.0.1"


@contextlib.contextmanager
def ray_session(
    address: str | None = None,
    num_cpus: int | None = None,
    runtime_env: dict | None = None,
    metrics_export_port: int | None = None,
):
    """ray.init for the duration of a block: the given/RAY_ADDRESS cluster, else a local one."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env)
    else:  # a private cluster for this process; left alone Ray picks the external address
        # address="local": never attach to another cluster this machine happens to run
        # metrics_export_port: where Prometheus scrapes Ray's and ddft's Ray metrics on this node
        ray.init(
            address="local",
            _node_ip_address=LOCAL_IP,
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env=runtime_env,
            _metrics_export_port=metrics_export_port,
        )
    try:
        yield ray
    finally:
        ray.shutdown()
