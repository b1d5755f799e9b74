"""Where an evaluation writes, and whether it may touch a training run's MLflow record.

The evaluate stage of the pipeline (no `--model_checkpoint`, or one naming the run's own
`<run_dir>/model` or `<run_dir>`) writes `<run_dir>/metrics/{eval.json,samples.md}`, which DVC
tracks and `promote` reads, and adds its numbers to the run's MLflow record. Anything else is
an ad-hoc evaluation: it must not overwrite the pipeline's tracked outputs (a 256-token spot
check would then decide promotion) nor log into the evaluated model's run. It writes

- where `--output` says, or else
- beside what it evaluated: `<model folder>-eval/` for a model folder (a run folder's
  `model/` included), `<run_dir>/<step>-eval/` for a checkpoint (beside the `checkpoints/`
  folder, never inside it: that is a pipeline output too).

An MLflow URI has no place beside it that outlives the command (the download is temporary),
so it needs `--output`.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config.schema import Config
from pipeline.errors import ConfigError
from pipeline.evaluation import mlflow_source
from pipeline.evaluation.model_source import LoadedModel

SUFFIX = "-eval"


def _same(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def is_own_stage(base: Config | None, source: str | None) -> bool:
    """Is this the pipeline's evaluate stage for the run `base` describes?"""
    if base is None:
        return False
    if source is None:
        return True
    if mlflow_source.is_mlflow_uri(source):
        return False
    run_dir = Path(base.run_dir)
    return _same(source, run_dir / "model") or _same(source, run_dir)


def check_adhoc_source(source: str, output: str | None) -> None:
    """Before any model time: an MLflow URI evaluated ad hoc needs `--output`."""
    if output is None and mlflow_source.is_mlflow_uri(source):
        raise ConfigError(
            f"--model_checkpoint {source}: the download is temporary, so there is no place "
            "beside it to write the results; pass --output FOLDER"
        )


def adhoc_output(loaded: LoadedModel) -> Path:
    """The folder beside the evaluated model (see the module docstring)."""
    if loaded.model_dir is not None:
        return loaded.model_dir.with_name(loaded.model_dir.name + SUFFIX)
    file = Path(loaded.source)
    beside = file.parent.parent if file.parent.name == "checkpoints" else file.parent
    return beside / f"{file.stem}{SUFFIX}"
