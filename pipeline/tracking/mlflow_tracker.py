"""MLflow backend of the tracker interface: one MLflow run per training run, outage-proof.

- One run per training run, continued across resumes: the run id travels in every checkpoint
  (`Trainer.tracking_run_id`) and, once the model is exported, in `model/tracking.json`.
- A resumed run re-logs metrics from the checkpoint's step + 1. Steps logged after the last
  checkpoint of a crashed session therefore appear twice in MLflow's history, with the same
  values when the resume is exact (it is on CPU); MLflow's "latest value" of a step is the
  resumed one. Nothing is ever logged out of order within a session.
- Nothing here blocks a training step on the network: calls are queued (`Outbox`, a few
  microseconds) and a background thread (`MlflowSender`) sends them, retrying while the server
  is away. Two waits are bounded: at start, for the first attempt to create the run (so the
  first checkpoint usually carries its id; a dead server answers at once, a hung one within
  `tracking.request_timeout_s`), and in `close`, for at most `tracking.flush_timeout_s`, after
  which what did not arrive is reported.
- Only rank 0 talks to MLflow; on other ranks every method does nothing.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config.schema import Config, TrackingConfig
from pipeline.tracking.checkpoint_uploads import STAGING_DIR, CheckpointUploads
from pipeline.tracking.mlflow_model import write_tracking_file
from pipeline.tracking.mlflow_outbox import (
    ArtifactOp,
    MetricBatch,
    ModelOp,
    Outbox,
    ParamsOp,
    TerminateOp,
)
from pipeline.tracking.mlflow_sender import MlflowSender
from pipeline.tracking.mlflow_setup import configure_environment, resolve_tracking_uri
from pipeline.tracking.run_metadata import (
    MAX_TAG_VALUE,
    param_value,
    run_name,
    run_params,
    run_tags,
    truncate,
)
from pipeline.tracking.system_metrics import SystemMetricsSampler

logger = logging.getLogger("pipeline.tracking")

METRIC_NAME = re.compile(r"^[\w./\- :]{1,250}$")
FIRST_CONTACT_WAIT_S = 60.0
"""Longest wait at start for the first attempt to create the run (a new sqlite store migrates
its schema for several seconds; a dead server answers at once; a hung one within the timeout)."""


class MlflowTracker:
    """Tracker backend; see the module docstring."""

    def __init__(
        self,
        settings: TrackingConfig,
        *,
        run_name: str,
        tags: dict[str, str],
        params: dict[str, str],
        run_id: str | None = None,
        rank: int = 0,
        on_run_id: Callable[[str], None] | None = None,
        checkpoint_dir: Path | None = None,
        start_step: int = 0,
    ) -> None:
        self.active = rank == 0
        self.start_step = start_step
        self.resumed = run_id is not None
        self.model_dir: Path | None = None
        self._bad_names: set[str] = set()
        if not self.active:
            return
        self.uri = resolve_tracking_uri(settings.uri)
        configure_environment(settings.request_timeout_s, self.uri)
        self.flush_timeout_s = settings.flush_timeout_s
        self.outbox = Outbox(settings.queue_size)
        self.sender = MlflowSender(
            self.uri,
            settings.experiment,
            self.outbox,
            run_id=run_id,
            run_name=run_name,
            tags=tags,
            params=params,
            on_run_id=on_run_id,
        )
        self.checkpoints = (
            CheckpointUploads(
                checkpoint_dir, settings.log_checkpoints, checkpoint_dir.parent / STAGING_DIR
            )
            if checkpoint_dir is not None
            else None
        )
        self.sender.start()
        started = time.monotonic()
        if not self.sender.first_contact.wait(FIRST_CONTACT_WAIT_S):
            logger.warning(
                "MLflow at %s has not answered in %.0f s; training starts anyway, "
                "tracking catches up in the background",
                self.uri,
                FIRST_CONTACT_WAIT_S,
            )
        logger.debug("MLflow first contact took %.2f s", time.monotonic() - started)
        self.sampler = SystemMetricsSampler(self.outbox) if settings.system_metrics else None
        if self.sampler is not None:
            self.sampler.start()

    @property
    def run_id(self) -> str | None:
        return self.sender.run_id if self.active else None

    # ------------------------------------------------------------------ tracker interface
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active or self.sender.disabled:
            return
        valid = {k: float(v) for k, v in metrics.items() if self._valid_name(k)}
        if valid:
            self.outbox.put_metrics(MetricBatch(valid, step, int(time.time() * 1000)))
        if self.checkpoints is not None:
            for op in self.checkpoints.scan():
                self.outbox.put(op)

    def _valid_name(self, name: str) -> bool:
        """MLflow's rule for metric names; a bad one would get its whole batch rejected."""
        if METRIC_NAME.match(name) and ".." not in name and not name.startswith("/"):
            return True
        if name not in self._bad_names:
            self._bad_names.add(name)
            logger.warning("metric name %r is not valid in MLflow; not sent there", name)
        return False

    def log_params(self, params: dict[str, Any]) -> None:
        if self.active:
            self.outbox.put(ParamsOp({k: param_value(v) for k, v in params.items()}))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.active:
            self.outbox.put(ArtifactOp(Path(path), artifact_path))

    def log_model(self, model_dir: Path, step: int) -> None:
        """Log the exported model folder as the run's MLflow model (a text-generating pyfunc).

        A resumed session that trained no step (a forced rerun of a finished run) exports the
        same weights again; they are not logged a second time.
        """
        if not self.active:
            return
        self.model_dir = Path(model_dir)
        if self.resumed and step == self.start_step:
            logger.info("model unchanged since step %d: not logged to MLflow again", step)
            return
        self.outbox.put(ModelOp(self.model_dir, step))

    def close(self, status: str = "FINISHED") -> None:
        """Send what is queued (waiting up to flush_timeout_s), end the run, report the rest."""
        if not self.active:
            return
        if self.sampler is not None:
            self.sampler.stop()
        if self.checkpoints is not None:
            for op in self.checkpoints.final():
                self.outbox.put(op)
        self.outbox.put(TerminateOp(status))
        self.sender.finish(self.flush_timeout_s)
        self._report()
        if self.checkpoints is not None:
            self.checkpoints.cleanup()
        if self.model_dir is not None and self.run_id and self.model_dir.is_dir():
            write_tracking_file(self.model_dir, self.run_id)

    def _report(self) -> None:
        queued, others = self.outbox.pending()
        dropped = self.outbox.dropped
        where = f"MLflow run {self.run_id or '(never created)'} at {self.uri}"
        if queued.batches or others:
            names = ", ".join(
                str(op.path.name) if isinstance(op, ArtifactOp) else type(op).__name__
                for op in others[:8]
            )
            reason = self.sender.disabled or f"unreachable for {self.flush_timeout_s:.0f} s"
            logger.warning(
                "%s: NOT SENT (%s): %s and %d other items [%s]; every step is still in the "
                "local logs (TensorBoard events, plots/*.csv, training.log)",
                where,
                reason,
                queued.describe(),
                len(others),
                names,
            )
        if dropped.batches:
            logger.warning(
                "%s: DROPPED %s while the queue was full (tracking.queue_size=%d)",
                where,
                dropped.describe(),
                self.outbox.max_metric_batches,
            )
        if self.sender.rejected:
            logger.warning(
                "%s: %d requests rejected by the server (see above)", where, self.sender.rejected
            )
        if not (queued.batches or others or dropped.batches or self.sender.rejected):
            logger.info("%s: everything sent", where)


def run_files(config: Config) -> list[tuple[Path, str | None]]:
    """(file, artifact folder) of the run's records: configs, log, the data's meta.json."""
    from pipeline.data.sources import data_sources

    run_dir = Path(config.run_dir)
    sources = data_sources(config.data)
    candidates: list[tuple[str | None, str | None]] = [
        (str(run_dir / "resolved_config.yaml"), None),
        (config.model.config, "configs"),
        (config.training.config, "configs"),
        (config.distributed.deepspeed_config, "configs"),
        (str(run_dir / "logs" / "training.log"), "logs"),
    ]
    candidates += [
        (str(source.folder / "meta.json"), f"data/{source.name}" if len(sources) > 1 else "data")
        for source in sources
    ]
    return [(Path(p), where) for p, where in candidates if p and Path(p).is_file()]


def open_mlflow_tracker(
    config: Config, trainer: Any, extra_tags: dict[str, str] | None = None
) -> MlflowTracker | None:
    """The MLflow backend for `trainer`'s run (None when tracking is off or off rank 0).

    The run id is taken from the trainer (restored from a checkpoint on resume) and written
    back as soon as the run exists, so the next checkpoint carries it. `extra_tags` say where
    the session came from (`resumed_from`, `rerun_of`, ...).
    """
    if not config.tracking.enabled or trainer.rank != 0:
        return None
    world = trainer.world_size
    return MlflowTracker(
        config.tracking,
        run_name=run_name(config),
        tags={
            # The strategy that runs (`auto` resolved: a DeepSpeed config makes it deepspeed).
            **run_tags(config, trainer.parts.data_hash, world, trainer.strategy.name),
            **{key: truncate(value, MAX_TAG_VALUE) for key, value in (extra_tags or {}).items()},
        },
        params=run_params(config),
        run_id=trainer.tracking_run_id,
        rank=trainer.rank,
        on_run_id=lambda run_id: setattr(trainer, "tracking_run_id", run_id),
        checkpoint_dir=Path(config.run_dir) / "checkpoints",
        start_step=trainer.progress.step,
    )
