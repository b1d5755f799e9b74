"""Open a trained model from wherever a user points: model folder, checkpoint, run dir, MLflow URI.

Evaluation, generation and the Hugging Face export all start from a `LoadedModel`: the plain
`GPT`, the run's resolved config, its tokenizer, and the tracking run id when the source names
one (so evaluation can add its numbers to the training run's MLflow record): a checkpoint
keeps it in `state["tracking"]["run_id"]`, a model folder in `tracking.json` (`TRACKING_FILE`,
written by the MLflow tracker at the end of training).

Accepted sources, tried in this order:
- `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `runs:/RUN_ID/NAME`: MLflow artifacts are
  downloaded (see `mlflow_source`) and the first model folder inside is used. The MLflow model
  layout belongs to the tracking integration; all this needs is that the logged artifacts
  contain an exported model folder somewhere (`model.safetensors` beside `config.yaml`).
- a model folder (`experiments/<name>/model/`): weights, `config.yaml`, tokenizer, meta.json.
- a run folder (`experiments/<name>/`): its `model/` when present, else its latest checkpoint.
- a checkpoints folder or a checkpoint file (`*.pt` with its `.sha256`): the weights come from
  the checkpoint and the tokenizer from the prepared folder its config names.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.checkpoint import checkpoint_directory, load_latest, load_verified
from pipeline.config.loader import read_yaml_mapping
from pipeline.config.schema import Config, ModelConfig
from pipeline.data.sources import primary_folder
from pipeline.data.tokenizer import Tokenizer, load_tokenizer
from pipeline.errors import CheckpointError, ConfigError, UserError
from pipeline.evaluation import mlflow_source
from pipeline.model import GPT
from pipeline.model_artifact import CONFIG, WEIGHTS, load_model_dir
from pipeline.tracking.mlflow_model import read_tracking_file
from pipeline.training.device import resolve_device

SHAPE_KEYS = ("n_layer", "d_model", "n_head", "d_head", "d_ff", "n_ctx")


@dataclass
class LoadedModel:
    """A model ready for inference and what belongs with it."""

    model: GPT
    config: Config
    """The resolved config the model was trained with (`model.vocab_size` set)."""
    tokenizer: Tokenizer
    source: str
    """What the user pointed at, for messages."""
    model_dir: Path | None
    """The model folder it was read from (a download for MLflow URIs; None for a checkpoint)."""
    tracking_run_id: str | None = None


def is_model_dir(path: Path) -> bool:
    return (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def load_model(
    source: str | Path,
    device: str | torch.device = "cpu",
    tracking_uri: str | None = None,
    download_dir: str | Path | None = None,
) -> LoadedModel:
    """Open `source` (see the module docstring) on `device`, in eval mode.

    `device` is a name as in `training.device` (`auto` included) or a torch device.
    `tracking_uri` is only used for MLflow URIs; `download_dir` is where their artifacts go,
    and must be given for them: the caller owns that folder (`open_model` makes and removes a
    temporary one).
    """
    device = resolve_device(device) if isinstance(device, str) else device
    if mlflow_source.is_mlflow_uri(source):
        if download_dir is None:
            raise ValueError("an MLflow URI needs a download_dir: use open_model")
        folder = _download_mlflow(str(source), tracking_uri, download_dir)
        loaded = _from_model_dir(folder, device)
        loaded.source = str(source)
        return loaded
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path}: no such model folder, run folder or checkpoint")
    if path.is_dir():
        if is_model_dir(path):
            return _from_model_dir(path, device)
        if is_model_dir(path / "model"):
            return _from_model_dir(path / "model", device)
        state, file = load_latest(checkpoint_directory(path))
        return _from_checkpoint(state, file, device)
    return _from_checkpoint(load_verified(path), path, device)


@contextlib.contextmanager
def open_model(
    source: str | Path, device: str | torch.device = "cpu", tracking_uri: str | None = None
) -> Iterator[LoadedModel]:
    """`load_model` for the length of a `with` block; an MLflow download (a full model copy)
    goes into a temporary folder that is removed when the block ends, however it ends."""
    if not mlflow_source.is_mlflow_uri(source):
        yield load_model(source, device, tracking_uri)
        return
    with tempfile.TemporaryDirectory(prefix="gpt3-model-") as download:
        yield load_model(source, device, tracking_uri, download)


def _from_model_dir(folder: Path, device: str | torch.device) -> LoadedModel:
    model, config = load_model_dir(folder, device)
    tokenizer = load_tokenizer(folder)  # the folder holds copies of meta.json and the tokenizer
    _check_vocab(model, tokenizer, folder)
    return LoadedModel(model, config, tokenizer, str(folder), folder, read_tracking_file(folder))


def _from_checkpoint(state: dict, file: Path, device: str | torch.device) -> LoadedModel:
    try:
        config = Config.model_validate(state["config"])
        vocab_size = int(state["data"]["vocab_size"])
        weights = state["model"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a training checkpoint ({exc})") from None
    config.model.vocab_size = vocab_size
    model = GPT(config.model, vocab_size)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"{file}: weights do not fit the model it describes: {first}"
        ) from None
    try:
        tokenizer = load_tokenizer(primary_folder(config.data))
    except UserError as exc:
        raise CheckpointError(
            f"{file}: the tokenizer comes from the prepared data the run used "
            f"({primary_folder(config.data)}), which cannot be opened: {exc}"
        ) from None
    _check_vocab(model, tokenizer, file)
    run_id = (state.get("tracking") or {}).get("run_id")
    return LoadedModel(model.to(device).eval(), config, tokenizer, str(file), None, run_id)


def _check_vocab(model: GPT, tokenizer: Tokenizer, where: Path) -> None:
    if tokenizer.vocab_size != model.vocab_size:
        raise CheckpointError(
            f"{where}: the model has {model.vocab_size} tokens but its tokenizer "
            f"{tokenizer.file} has {tokenizer.vocab_size}"
        )


def _download_mlflow(uri: str, tracking_uri: str | None, download_dir: str | Path) -> Path:
    """Download an MLflow URI's artifacts and return the first model folder among them."""
    destination = Path(download_dir)
    destination.mkdir(parents=True, exist_ok=True)
    local = mlflow_source.download(uri, tracking_uri, destination)
    found = find_model_dir(local)
    if found is None:
        raise CheckpointError(
            f"{uri}: the downloaded artifacts hold no model folder "
            f"({WEIGHTS} beside {CONFIG}) under {local}"
        )
    return found


def find_model_dir(root: Path) -> Path | None:
    """`root` itself or the shallowest folder below it that is a model folder."""
    if is_model_dir(root):
        return root
    candidates = sorted(root.rglob(WEIGHTS), key=lambda p: (len(p.parts), str(p)))
    return next((p.parent for p in candidates if is_model_dir(p.parent)), None)


def check_model_config(loaded: LoadedModel, model_config_file: str | Path) -> None:
    """The usage guide passes `--config MODEL.yaml` with the checkpoint: it must describe it.

    The weights carry their own config, so the file adds nothing; a mismatch means the user
    pointed at the wrong checkpoint or file, which deserves an error rather than silence.
    """
    values = read_yaml_mapping(model_config_file)
    values = values.get("model", values)
    values = {k: v for k, v in values.items() if k not in ("config", "vocab_size")}
    try:
        expected = ModelConfig.model_validate(values)
    except ValueError as exc:
        raise ConfigError(f"{model_config_file}: not a model config ({exc})") from None
    actual = loaded.model.config
    wrong = [
        f"{key} {getattr(expected, key)} != {getattr(actual, key)}"
        for key in SHAPE_KEYS
        if getattr(expected, key) != getattr(actual, key)
    ]
    if wrong:
        raise CheckpointError(
            f"{model_config_file} does not describe the model in {loaded.source}: "
            + "; ".join(wrong)
        )
