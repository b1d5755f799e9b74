"""The exported model: a folder with weights, config and tokenizer, distinct from checkpoints.

A resume checkpoint holds everything for training on (optimizer, RNG, data cursor); the model
folder holds only what inference needs, in formats that load without unpickling code
(`model.safetensors`, YAML, the tokenizer's own files). Evaluation, generation, MLflow and the
Hugging Face export all start from it.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_model, save_model

from pipeline.config.loader import dump_config
from pipeline.config.schema import Config
from pipeline.data.sources import primary_folder
from pipeline.errors import CheckpointError
from pipeline.model import GPT
from pipeline.model_manifest import manifest_problem, verify_model_files, write_manifest

logger = logging.getLogger("pipeline.train")

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


def save_model_dir(model: GPT, config: Config, vocab_size: int, out_dir: Path) -> Path:
    """Write weights, resolved config, the data's tokenizer, meta and the checksum manifest into
    a new folder beside `out_dir`, then swap it into place.

    Deletes nothing it did not make: the folder it assembles has a fresh unique name, and what
    was at `out_dir` is deleted only when its manifest shows it is a model folder this pipeline
    wrote, unchanged. Anything else there is moved aside (`<name>.previous-<date>-<random>`) and
    the log says where.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        save_model(model, str(tmp / WEIGHTS))
        resolved = config.model_copy(deep=True)
        resolved.model.vocab_size = vocab_size
        (tmp / CONFIG).write_text(dump_config(resolved))
        prepared = primary_folder(config.data)
        for item in prepared.iterdir():
            if item.is_file() and item.suffix != ".bin":
                shutil.copy2(item, tmp / item.name)
        write_manifest(tmp)
        previous = _set_aside(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # made above, in this call
        raise
    if previous is not None:
        shutil.rmtree(previous)  # verified above to be an unchanged model folder of ours
    return out_dir


def _set_aside(out_dir: Path) -> Path | None:
    """Clear `out_dir` for the new folder; return it (renamed) if it may be deleted after."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ours = out_dir.is_dir() and not out_dir.is_symlink() and manifest_problem(out_dir) is None
    if ours:
        aside = out_dir.with_name(f".{out_dir.name}.old-{stamp}-{secrets.token_hex(4)}")
    else:
        aside = out_dir.with_name(f"{out_dir.name}.previous-{stamp}-{secrets.token_hex(4)}")
    os.rename(out_dir, aside)
    if ours:
        return aside
    logger.warning(
        "%s was not a model folder this pipeline wrote (or was changed since); moved to %s",
        out_dir,
        aside,
    )
    return None


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Config]:
    """Load an exported model folder; a missing, changed or broken folder is a CheckpointError.

    Every file is checked against the folder's manifest first, so altered weights are never
    evaluated, served or exported; a config that does not parse is one line, not a traceback.
    """
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise CheckpointError(f"{path}: not a model folder (needs {WEIGHTS} and {CONFIG})")
    verify_model_files(path)
    config = read_model_config(path / CONFIG)
    model = GPT(config.model, config.model.vocab_size)
    try:
        load_model(model, str(path / WEIGHTS), strict=True)
    except Exception as exc:  # safetensors raises several types for bad files
        raise CheckpointError(f"{path / WEIGHTS}: cannot load weights: {exc}") from None
    return model.to(device).eval(), config


def read_model_config(path: Path) -> Config:
    """A model folder's `config.yaml` as a validated Config; anything else a CheckpointError."""
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
        config = Config.model_validate(values)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: not a readable model config: {first}") from None
    if config.model.vocab_size is None:
        raise CheckpointError(f"{path}: model.vocab_size is missing; export the model again")
    return config
