"""One training run end to end: check inputs, lock the run directory, train, export the model.

Order matters for "nothing half-written": the config is validated and the data opened before
the run directory is touched; the final model is written aside and renamed into place.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config.loader import dump_config
from pipeline.config.schema import Config
from pipeline.distributed.data_parallel import SingleDevice
from pipeline.distributed.strategy import Strategy
from pipeline.model import count_parameters
from pipeline.model_artifact import save_model_dir
from pipeline.tracking.base import TrackerGroup
from pipeline.tracking.dvc_metrics import DvcMetricsTracker
from pipeline.tracking.mlflow_tracker import open_mlflow_tracker, run_files
from pipeline.tracking.run_reader import is_run_uri
from pipeline.tracking.tensorboard import TensorBoardTracker, run_folder
from pipeline.training.auto_resume import RESUME_AUTO, resolve_auto
from pipeline.training.components import TrainingComponents, build_components
from pipeline.training.mlflow_checkpoint import FetchedCheckpoint, fetch_checkpoint
from pipeline.training.resume_source import check_resume_source
from pipeline.training.run_logging import run_logging
from pipeline.training.trainer import Trainer, TrainResult

logger = logging.getLogger("pipeline.train")


def train(
    config: Config,
    resume: str | None = None,
    console: bool = True,
    strategy: Strategy | None = None,
    tags: dict[str, str] | None = None,
) -> TrainResult:
    """Train `config` (resuming from `resume`: a path, `latest`, `auto`, or a `runs:/` URI of
    a checkpoint logged to MLflow) and export the model. `tags` go onto the MLflow run.

    Under a distributed `strategy` every rank calls this; rank 0 alone holds the run lock and
    writes logs, trackers, the resolved config and the exported model.
    """
    strategy = strategy or SingleDevice(config=config)
    main = strategy.is_main
    parts = build_components(config)
    run_dir = Path(config.run_dir)
    # A bad resume source must fail before the run directory exists (nothing written).
    fetched: FetchedCheckpoint | None = None
    if is_run_uri(resume):
        fetched = strategy.main_only(
            lambda: fetch_checkpoint(
                str(resume), config, parts.vocab_size, parts.tokenizer_id, strategy.name
            )
        )
    else:
        strategy.main_only(lambda: check_resume_source(resume, run_dir / "checkpoints"))
    try:
        return _train_locked(config, parts, strategy, resume, fetched, console, tags or {})
    finally:
        if fetched is not None and main:
            fetched.cleanup()  # the temporary download folder, empty once installed


def _train_locked(
    config: Config,
    parts: TrainingComponents,
    strategy: Strategy,
    resume: str | None,
    fetched: FetchedCheckpoint | None,
    console: bool,
    tags: dict[str, str],
) -> TrainResult:
    """`train` from the moment the run directory may be written."""
    main = strategy.is_main
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = run_dir / "logs" / "training.log" if main else None
    with (
        strategy.run_lock(run_dir),
        run_logging(log_file, config.training.log_level if main else "WARNING", console),
    ):
        trainer = Trainer(config, parts, strategy)
        if resume == RESUME_AUTO:
            resume = strategy.main_only(
                lambda: resolve_auto(
                    config, trainer.checkpoints, parts.vocab_size, parts.tokenizer_id
                )
            )
        if fetched is not None:
            resume = str(strategy.main_only(lambda: fetched.install(run_dir)))
        if resume is not None:
            trainer.resume(resume)
        if fetched is not None:  # the original run if unfinished, else a new one nested in it
            trainer.tracking_run_id = fetched.tracking_run_id() if main else None
            tags = {**fetched.tags(), **tags}
        if main:
            (run_dir / "resolved_config.yaml").write_text(dump_config(config))
        start = trainer.progress.step
        # Continues the trainer's run (restored from the checkpoint on a resume).
        mlflow = open_mlflow_tracker(config, trainer, tags) if main else None
        tracker = TrackerGroup(
            [
                TensorBoardTracker(
                    run_folder(run_dir / "logs", resumed=start > 0),
                    purge_step=start + 1 if start else None,
                ),
                DvcMetricsTracker(run_dir / "metrics" / "train.json", run_dir / "plots", start),
                *([mlflow] if mlflow is not None else []),
            ]
            if main
            else []
        )
        logger.info(
            "training %s (%s parameters) on %s in %s from step %d to %s",
            config.model.name,
            f"{count_parameters(config.model, parts.vocab_size):,}",  # ZeRO-3 holds partitions
            parts.device,
            config.training.precision,
            start,
            config.training.max_steps or f"{config.training.max_tokens} tokens",
        )
        status = "FAILED"
        try:
            result = trainer.fit(tracker)
            if not result.preempted:
                model = strategy.export_model(parts.model)  # collective under ZeRO; None off rank 0
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
