"""Resolve the configuration from its layers and validate it once.

Precedence, lowest first: built-in defaults < model config file < training config file <
`params.yaml` < command-line flags. Each leaf key remembers the file that set it last, so a
validation error can name both the key and where it came from.

`load_config` finds the files and builds the layers; the rest is done by modules with one job
each, and this module is their public face (import from here):
`pipeline.config.yaml_reader` (strict YAML reading), `pipeline.config.layers` (merging and
provenance), `pipeline.config.diagnostics` (error messages with blame and did-you-mean),
`pipeline.config.schema_walk` (schema introspection) and `pipeline.config.output`
(`dump_config`, `flatten_config`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pipeline.config.diagnostics import BUILTIN, MAX_PROBLEMS, short_repr
from pipeline.config.layers import COMMAND_LINE, Layer, deep_merge, dotted_to_nested, resolve
from pipeline.config.output import dump_config, flatten_config
from pipeline.config.schema import Config
from pipeline.config.yaml_reader import read_yaml_mapping
from pipeline.errors import ConfigError

__all__ = [
    "BUILTIN",
    "COMMAND_LINE",
    "MAX_PROBLEMS",
    "MODEL_CONFIG_DIR",
    "Layer",
    "dotted_to_nested",
    "dump_config",
    "flatten_config",
    "load_config",
    "model_config_path",
    "read_yaml_mapping",
    "resolve",
]

MODEL_CONFIG_DIR = Path("configs/model_configs")


def model_config_path(model_size: str) -> Path:
    """`--model_size 1.3B` -> `configs/model_configs/1.3B.yaml`; an unknown size lists the known."""
    path = MODEL_CONFIG_DIR / f"{model_size}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))
        hint = difflib.get_close_matches(model_size, known, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(
            f"--model_size {model_size!r}: no {path}{did_you_mean}; known sizes: {', '.join(known)}"
        )
    return path


def load_config(
    params_file: str | Path | None = None,
    model_config: str | Path | None = None,
    training_config: str | Path | None = None,
    model_size: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Resolve the run's config from files and flags (see the module docstring for precedence).

    `model_config`/`model_size` and `training_config` replace the files that `params.yaml` names
    in `model.config` and `training.config` (as do `model.config`/`training.config` overrides).
    `overrides` are dotted keys from the command line. Nothing is written.
    """
    params = read_yaml_mapping(params_file) if params_file is not None else {}
    if model_size is not None and model_config is not None:
        raise ConfigError("give --config or --model_size, not both")
    if model_size is not None:
        model_config = model_config_path(model_size)
    cli = dotted_to_nested({k: v for k, v in (overrides or {}).items() if v is not None})
    if model_config:
        cli = deep_merge(cli, {"model": {"config": str(model_config)}})
    if training_config:
        cli = deep_merge(cli, {"training": {"config": str(training_config)}})

    layers = []
    for section in ("model", "training"):
        named = _config_file(cli, section, COMMAND_LINE)
        if named is None and params_file is not None:
            named = _config_file(params, section, str(params_file))
        if named is not None:
            path, source = named
            values = _read_named_file(path, f"{section}.config", source, params_file)
            layers.append(Layer(path, values))
    if params_file is not None:
        layers.append(Layer(str(params_file), params))
    layers.append(Layer(COMMAND_LINE, cli))
    return resolve(layers)


def _config_file(values: dict[str, Any], section: str, source: str) -> tuple[str, str] | None:
    """(path, who named it) from `<section>.config`, or None when it is unset or empty."""
    value = _section_key(values, section, "config")
    if value is None or value == "":
        return None
    if not isinstance(value, (str, Path)):
        raise ConfigError(
            f"{section}.config: expected the path of a YAML file, got {short_repr(value)} "
            f"(in {source})"
        )
    return str(value), source


def _read_named_file(
    path: str, key: str, source: str, params_file: str | Path | None
) -> dict[str, Any]:
    if not Path(path).is_file():
        hint = ""
        if params_file is not None and not Path(path).is_absolute():
            beside = Path(params_file).parent / path
            if beside.is_file():
                hint = f"; paths are relative to the working directory: did you mean {beside}?"
        raise ConfigError(f"{key}: config file {path} not found (in {source}){hint}")
    return read_yaml_mapping(path)


def _section_key(params: dict[str, Any], section: str, key: str) -> Any:
    value = params.get(section)
    return value.get(key) if isinstance(value, dict) else None
