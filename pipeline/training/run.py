"""One training run end to end: check inputs, lock the run directory, train, export the model.

Order matters for "nothing half-written": the config is validated and the data opened before
the run directory is touched; the final model is written aside and renamed into place.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from pipeline.checkpoint import CheckpointManager
from pipeline.config.loader import dump_config
from pipeline.config.schema import Config
from pipeline.errors import CheckpointError
from pipeline.model_artifact import save_model_dir
from pipeline.run_lock import RunLock
from pipeline.tracking.base import TrackerGroup
from pipeline.tracking.dvc_metrics import DvcMetricsTracker
from pipeline.tracking.tensorboard import TensorBoardTracker
from pipeline.training.components import build_components
from pipeline.training.run_logging import run_logging
from pipeline.training.trainer import Trainer, TrainResult

logger = logging.getLogger("pipeline.train")

RESUME_AUTO = "auto"
"""Resume when the run directory holds a checkpoint of this exact config, else start afresh."""


def _same_run(saved: dict, config: Config) -> bool:
    """Does a checkpoint's config describe this run (ignoring where and how it is observed)?"""
    ignore = {"tracking", "evaluation", "registry", "output_dir", "output_root", "name"}
    current = config.model_dump(mode="json")
    return all(saved.get(k) == v for k, v in current.items() if k not in ignore)


def _resolve_resume(
    config: Config, resume: str | None, checkpoints: CheckpointManager
) -> str | None:
    """Turn `auto` into `latest` or None; anything else passes through."""
    if resume != RESUME_AUTO:
        return resume
    if not checkpoints.list_checkpoints():
        return None
    try:
        state, path = checkpoints.load("latest")
    except CheckpointError as exc:
        logger.warning("auto-resume: no usable checkpoint (%s); starting afresh", exc)
        return None
    if _same_run(state.get("config", {}), config):
        return str(path)
    stale = checkpoints.directory.with_name("checkpoints.previous")
    logger.warning(
        "auto-resume: checkpoints in %s belong to a different config; moved to %s, starting afresh",
        checkpoints.directory,
        stale,
    )
    shutil.rmtree(stale, ignore_errors=True)
    os.replace(checkpoints.directory, stale)
    checkpoints.directory.mkdir(parents=True)
    return None


def train(config: Config, resume: str | None = None, console: bool = True) -> TrainResult:
    """Train `config` (resuming from `resume`: a path, `latest`, or `auto`) and export the model."""
    parts = build_components(config)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with (
        RunLock(run_dir),
        run_logging(run_dir / "logs" / "training.log", config.training.log_level, console),
    ):
        trainer = Trainer(config, parts)
        resume = _resolve_resume(config, resume, trainer.checkpoints)
        if resume is not None:
            trainer.resume(resume)
        (run_dir / "resolved_config.yaml").write_text(dump_config(config))
        start = trainer.progress.step
        tracker = TrackerGroup(
            [
                TensorBoardTracker(run_dir / "logs", purge_step=start + 1 if start else None),
                DvcMetricsTracker(run_dir / "metrics" / "train.json", run_dir / "plots", start),
            ]
        )
        logger.info(
            "training %s (%s parameters) on %s in %s from step %d to %s",
            config.model.name,
            f"{parts.model.num_parameters():,}",
            parts.device,
            config.training.precision,
            start,
            config.training.max_steps or f"{config.training.max_tokens} tokens",
        )
        status = "FAILED"
        try:
            result = trainer.fit(tracker)
            status = "KILLED" if result.preempted else "FINISHED"
        finally:
            tracker.close(status)
        if not result.preempted:
            save_model_dir(parts.model, config, parts.vocab_size, run_dir / "model")
            logger.info("done: step %d, model in %s", result.progress.step, run_dir / "model")
        return result
