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
from pipeline.distributed.strategy import SingleDevice
from pipeline.errors import CheckpointError
from pipeline.model_artifact import save_model_dir
from pipeline.tracking.base import TrackerGroup
from pipeline.tracking.dvc_metrics import DvcMetricsTracker
from pipeline.tracking.mlflow_tracker import open_mlflow_tracker, run_files
from pipeline.tracking.tensorboard import TensorBoardTracker
from pipeline.training.components import build_components
from pipeline.training.resume_source import check_resume_source
from pipeline.training.run_logging import run_logging
from pipeline.training.trainer import Trainer, TrainResult

logger = logging.getLogger("pipeline.train")

RESUME_AUTO = "auto"
"""Resume when the run directory holds a checkpoint of this exact config, else start afresh."""


def _same_run(saved: dict, config: Config) -> bool:
    """Does a checkpoint's config describe this run (ignoring where and how it is observed)?

    With an explicit `training.decay_tokens` the schedule does not depend on the run's length,
    so a longer max_steps/max_tokens extends the same run instead of starting a new one.
    """
    ignore = {
        "tracking",
        "evaluation",
        "registry",
        "storage",
        "slurm",
        "output_dir",
        "output_root",
        "name",
    }
    current = config.model_dump(mode="json")
    saved = {**saved, "training": dict(saved.get("training", {}))}
    if config.training.decay_tokens is not None:
        for key in ("max_steps", "max_tokens"):
            saved["training"].pop(key, None)
            current["training"].pop(key, None)
    return all(saved.get(k) == v for k, v in current.items() if k not in ignore)


def _finished(progress: dict, config: Config) -> bool:
    """Had the checkpointed run already reached this config's end?"""
    t = config.training
    steps_done = t.max_steps is not None and progress.get("step", 0) >= t.max_steps
    tokens_done = t.max_tokens is not None and progress.get("tokens_seen", 0) >= t.max_tokens
    return steps_done or tokens_done


def _resolve_resume(
    config: Config, resume: str | None, checkpoints: CheckpointManager
) -> str | None:
    """Turn `auto` into a checkpoint path or None; anything else passes through.

    `auto` continues an interrupted run of this exact config. A finished run, or one of another
    config, is moved aside to `checkpoints.previous` (nothing is deleted) and training starts
    afresh, so `dvc repro --force` really retrains and reproduces.
    """
    if resume != RESUME_AUTO:
        return resume
    if not checkpoints.list_checkpoints():
        return None
    try:
        state, path = checkpoints.load("latest")
    except CheckpointError as exc:
        logger.warning("auto-resume: no usable checkpoint (%s); starting afresh", exc)
        return None
    same = _same_run(state.get("config", {}), config)
    if same and not _finished(state.get("progress", {}), config):
        return str(path)
    why = "a finished run of this config" if same else "a different config"
    stale = checkpoints.directory.with_name("checkpoints.previous")
    logger.warning(
        "auto-resume: checkpoints in %s belong to %s; moved to %s, starting afresh",
        checkpoints.directory,
        why,
        stale,
    )
    shutil.rmtree(stale, ignore_errors=True)
    os.replace(checkpoints.directory, stale)
    checkpoints.directory.mkdir(parents=True)
    return None


def train(
    config: Config,
    resume: str | None = None,
    console: bool = True,
    strategy: SingleDevice | None = None,
) -> TrainResult:
    """Train `config` (resuming from `resume`: a path, `latest`, or `auto`) and export the model.

    Under a distributed `strategy` every rank calls this; rank 0 alone holds the run lock and
    writes logs, trackers, the resolved config and the exported model.
    """
    strategy = strategy or SingleDevice(config=config)
    main = strategy.is_main
    parts = build_components(config)
    run_dir = Path(config.run_dir)
    # A bad resume source must fail before the run directory exists (nothing written).
    strategy.main_only(lambda: check_resume_source(resume, run_dir / "checkpoints"))
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = run_dir / "logs" / "training.log" if main else None
    with (
        strategy.run_lock(run_dir),
        run_logging(log_file, config.training.log_level if main else "WARNING", console),
    ):
        trainer = Trainer(config, parts, strategy)
        resume = strategy.main_only(lambda: _resolve_resume(config, resume, trainer.checkpoints))
        if resume is not None:
            trainer.resume(resume)
        if main:
            (run_dir / "resolved_config.yaml").write_text(dump_config(config))
        start = trainer.progress.step
        mlflow = open_mlflow_tracker(config, trainer) if main else None  # resumes trainer's run
        tracker = TrackerGroup(
            [
                TensorBoardTracker(run_dir / "logs", purge_step=start + 1 if start else None),
                DvcMetricsTracker(run_dir / "metrics" / "train.json", run_dir / "plots", start),
                *([mlflow] if mlflow is not None else []),
            ]
            if main
            else []
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
            if not result.preempted:
                model = strategy.export_model(parts)  # collective under ZeRO; None off rank 0
                if model is not None:
                    save_model_dir(model, config, parts.vocab_size, run_dir / "model")
                    if mlflow is not None:
                        mlflow.log_model(run_dir / "model", result.progress.step)
                logger.info("done: step %d, model in %s", result.progress.step, run_dir / "model")
            status = "KILLED" if result.preempted else "FINISHED"
        finally:
            for path, folder in run_files(config) if main else []:
                tracker.log_artifact(path, folder)
            tracker.close(status)  # MLflow: flushes, ends the run, writes model/tracking.json
        return result
