"""The exported model: a folder with weights, config and tokenizer, distinct from checkpoints.

A resume checkpoint holds everything for training on (optimizer, RNG, data cursor); the model
folder holds only what inference needs, in formats that load without unpickling code
(`model.safetensors`, YAML, the tokenizer's own files). Evaluation, generation, MLflow and the
Hugging Face export all start from it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_model, save_model

from pipeline.config.loader import dump_config
from pipeline.config.schema import Config
from pipeline.data.sources import primary_folder
from pipeline.errors import CheckpointError
from pipeline.model import GPT

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


def save_model_dir(model: GPT, config: Config, vocab_size: int, out_dir: Path) -> Path:
    """Write weights, resolved config, the data's tokenizer and meta; swap into place atomically."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / WEIGHTS))
    resolved = config.model_copy(deep=True)
    resolved.model.vocab_size = vocab_size
    (tmp / CONFIG).write_text(dump_config(resolved))
    prepared = primary_folder(config.data)
    for item in prepared.iterdir():
        if item.is_file() and item.suffix != ".bin":
            shutil.copy2(item, tmp / item.name)
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Config]:
    """Load an exported model folder; a missing or broken folder is a CheckpointError."""
    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise CheckpointError(f"{path}: not a model folder (needs {WEIGHTS} and {CONFIG})")
    config = Config.model_validate(yaml.safe_load((path / CONFIG).read_text()))
    assert config.model.vocab_size is not None
    model = GPT(config.model, config.model.vocab_size)
    try:
        load_model(model, str(path / WEIGHTS), strict=True)
    except Exception as exc:  # safetensors raises several types for bad files
        raise CheckpointError(f"{path / WEIGHTS}: cannot load weights: {exc}") from None
    return model.to(device).eval(), config
