"""MLflow's system metrics (CPU, memory, disk, network, GPU) through our own outage-proof queue.

MLflow's `SystemMetricsMonitor` sends on its own and stops for good at the first failed
request, so a server blip would end system metrics for the rest of a week-long run. Here its
monitor classes only measure; the samples go into the same `Outbox` as the training metrics,
with no step (the sender steps them by seconds since the run started, which stays monotonic
across resumes because a resumed run keeps its start time).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from pipeline.tracking.mlflow_outbox import MetricBatch, Outbox

logger = logging.getLogger("pipeline.tracking")

PREFIX = "system/"
DEFAULT_INTERVAL_S = 10.0


def _monitors() -> list[Any]:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitors.append(GPUMonitor())
    except Exception as exc:  # no GPU or no nvidia-ml-py: CPU metrics only
        logger.info("no GPU system metrics: %s", exc)
    return monitors


class SystemMetricsSampler(threading.Thread):
    """Samples every `interval_s` (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, default 10 s)."""

    def __init__(self, outbox: Outbox, interval_s: float | None = None) -> None:
        super().__init__(name="mlflow-system-metrics", daemon=True)
        env = os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
        self.interval_s = interval_s or (float(env) if env else DEFAULT_INTERVAL_S)
        self.outbox = outbox
        self.monitors = _monitors()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        values: dict[str, float] = {}
        for monitor in self.monitors:
            try:
                monitor.collect_metrics()
                values.update(monitor.aggregate_metrics())
            except Exception as exc:  # one failing probe must not end the others
                logger.debug("system metrics: %s failed: %s", type(monitor).__name__, exc)
            finally:
                monitor.clear_metrics()
        if values:
            metrics = {PREFIX + name: float(value) for name, value in values.items()}
            self.outbox.put_metrics(MetricBatch(metrics, None, int(time.time() * 1000)))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5.0)
