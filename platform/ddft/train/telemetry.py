"""Training metrics for Prometheus: rank 0 sets Ray metrics at every report, and Ray exports them
from each node's metrics port (KubeRay's Prometheus scrape) as ray_ddft_train_* with the job (ddft_job:
Prometheus keeps `job` for its own scrape jobs) and run as tags. Grafana: infra/grafana/ddft-dashboard.json."""

from __future__ import annotations

import os

GAUGES = {
    "loss": ("ddft_train_loss", "training loss at the last reported step"),
    "val_loss": ("ddft_train_val_loss", "validation loss at the last epoch end"),
    "step": ("ddft_train_step", "optimizer steps done"),
    "tokens_per_s": ("ddft_train_tokens_per_second", "tokens processed per second of training"),
}


class TrainMetrics:
    def __init__(self):
        from ray.util.metrics import Gauge

        self.tags = {"ddft_job": os.environ.get("DDFT_JOB", "unknown"), "run": os.environ.get("DDFT_RUN", "unknown")}
        self.gauges = {
            key: Gauge(name, description=text, tag_keys=("ddft_job", "run")) for key, (name, text) in GAUGES.items()
        }

    def publish(self, metrics: dict) -> None:
        for key, gauge in self.gauges.items():
            if metrics.get(key) is not None:
                gauge.set(float(metrics[key]), tags=self.tags)
