"""Resolve the configuration from its layers and validate it once.

Precedence, lowest first: built-in defaults < model config file < training config file <
`params.yaml` < command-line flags. Each leaf key remembers the file that set it last, so a
validation error can name both the key and where it came from.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config.schema import Config
from pipeline.errors import ConfigError

MODEL_CONFIG_DIR = Path("configs/model_configs")
BUILTIN = "built-in defaults"
COMMAND_LINE = "command line"


@dataclass
class Layer:
    """One source of settings: a nested mapping and the name to blame for its keys."""

    source: str
    values: dict[str, Any] = field(default_factory=dict)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file whose top level must be a mapping; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def model_config_path(model_size: str) -> Path:
    """`--model_size 1.3B` -> `configs/model_configs/1.3B.yaml` (an unknown size lists the known)."""
    path = MODEL_CONFIG_DIR / f"{model_size}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))
        hint = difflib.get_close_matches(model_size, known, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(
            f"--model_size {model_size!r}: no {path}{did_you_mean}; known sizes: {', '.join(known)}"
        )
    return path


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def dotted_to_nested(overrides: dict[str, Any]) -> dict[str, Any]:
    """{"training.lr": 3e-4} -> {"training": {"lr": 3e-4}}."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _schema_at(path: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `path` (None past a leaf)."""
    model: type[BaseModel] = Config
    for part in path:
        info = model.model_fields.get(str(part))
        if info is None:
            return None
        annotation = info.annotation
        candidates = getattr(annotation, "__args__", (annotation,))
        nested = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if nested is None:
            return None
        model = nested
    return model


def _blame(dotted: str, provenance: dict[str, str]) -> str:
    if dotted in provenance:
        return provenance[dotted]
    children = [src for key, src in provenance.items() if key.startswith(dotted + ".")]
    if children:
        return ", ".join(dict.fromkeys(children))
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:cut])
        if parent in provenance:
            return provenance[parent]
    return BUILTIN


def _describe(error: dict[str, Any], provenance: dict[str, str]) -> str:
    loc = tuple(part for part in error["loc"] if not str(part).startswith("function-after"))
    dotted = ".".join(str(part) for part in loc) or "<top level>"
    source = _blame(dotted, provenance)
    if error["type"] == "extra_forbidden":
        owner = _schema_at(loc[:-1])
        known = list(owner.model_fields) if owner else []
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        suggestion = f"; did you mean {'.'.join(map(str, loc[:-1] + (hint[0],)))!r}?" if hint else ""
        return f"{dotted}: unknown key (in {source}){suggestion}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] not in ("value_error", "missing") and "input" in error:
        message += f", got {error['input']!r}"
    return f"{dotted}: {message} (in {source})"


def resolve(layers: list[Layer]) -> Config:
    """Merge layers in order and validate once; every problem goes into one ConfigError."""
    merged: dict[str, Any] = {}
    provenance: dict[str, str] = {}
    for layer in layers:
        merged = _deep_merge(merged, layer.values)
        for key in _flatten(layer.values):
            provenance[key] = layer.source
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        problems = [_describe(err, provenance) for err in exc.errors()]
        raise ConfigError("invalid config: " + "; ".join(problems)) from None


def load_config(
    params_file: str | Path | None = None,
    model_config: str | Path | None = None,
    training_config: str | Path | None = None,
    model_size: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Resolve the run's config from files and flags (see the module docstring for precedence).

    `model_config`/`model_size` and `training_config` replace the files that `params.yaml` names
    in `model.config` and `training.config`. `overrides` are dotted keys from the command line.
    """
    params = read_yaml_mapping(params_file) if params_file is not None else {}
    if model_size is not None and model_config is not None:
        raise ConfigError("give --config or --model_size, not both")
    if model_size is not None:
        model_config = model_config_path(model_size)
    model_file = model_config or _section_key(params, "model", "config")
    training_file = training_config or _section_key(params, "training", "config")

    layers = []
    if model_file:
        layers.append(Layer(str(model_file), read_yaml_mapping(model_file)))
    if training_file:
        layers.append(Layer(str(training_file), read_yaml_mapping(training_file)))
    if params_file is not None:
        layers.append(Layer(str(params_file), params))
    cli = dotted_to_nested({k: v for k, v in (overrides or {}).items() if v is not None})
    if model_config:
        cli = _deep_merge(cli, {"model": {"config": str(model_config)}})
    if training_config:
        cli = _deep_merge(cli, {"training": {"config": str(training_config)}})
    layers.append(Layer(COMMAND_LINE, cli))
    return resolve(layers)


def _section_key(params: dict[str, Any], section: str, key: str) -> Any:
    value = params.get(section)
    return value.get(key) if isinstance(value, dict) else None


def dump_config(config: Config) -> str:
    """The resolved config as YAML, in field order, for `resolved_config.yaml` and MLflow."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flatten_config(config: Config) -> dict[str, Any]:
    """Stable dotted keys (`training.lr`) for MLflow params, so runs line up column by column."""
    return _flatten(config.model_dump(mode="json"))
