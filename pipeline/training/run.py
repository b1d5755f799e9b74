"""One training run end to end: check inputs, lock the run directory, train, export the model.

Order matters for "nothing half-written": the config is validated and the data opened before
the run directory is touched; the final model is written aside and renamed into place.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config.loader import dump_config
from pipeline.config.schema import Config
from pipeline.distributed.strategy import SingleDevice
from pipeline.model_artifact import save_model_dir
from pipeline.tracking.base import TrackerGroup
from pipeline.tracking.dvc_metrics import DvcMetricsTracker
from pipeline.tracking.mlflow_tracker import open_mlflow_tracker, run_files
from pipeline.tracking.tensorboard import TensorBoardTracker, run_folder
from pipeline.training.auto_resume import RESUME_AUTO, resolve_auto
from pipeline.training.components import build_components
from pipeline.training.resume_source import check_resume_source
from pipeline.training.run_logging import run_logging
from pipeline.training.trainer import Trainer, TrainResult

logger = logging.getLogger("pipeline.train")


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
        if resume == RESUME_AUTO:
            resume = strategy.main_only(
                lambda: resolve_auto(
                    config, trainer.checkpoints, parts.vocab_size, parts.tokenizer_id
                )
            )
        if resume is not None:
            trainer.resume(resume)
        if main:
            (run_dir / "resolved_config.yaml").write_text(dump_config(config))
        start = trainer.progress.step
        mlflow = open_mlflow_tracker(config, trainer) if main else None  # resumes trainer's run
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
