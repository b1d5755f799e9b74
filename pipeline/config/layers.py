"""Merge configuration layers in order, remember which source set each key, validate once.

Layers come lowest first (the order is `pipeline.config.loader`'s). Each leaf key remembers the
source that set it last, so a validation error can name both the key and where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from pipeline.config.diagnostics import validation_problems
from pipeline.config.schema import Config
from pipeline.config.schema_walk import nested_model
from pipeline.errors import ConfigError

COMMAND_LINE = "command line"


@dataclass
class Layer:
    """One source of settings: a nested mapping and the name to blame for its keys."""

    source: str
    values: dict[str, Any] = field(default_factory=dict)


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


CLEARED_BY_EMPTY = frozenset({"data.sources"})
"""Mappings that are collections rather than sections: an empty one in a higher layer means
"none" (`data.sources: {}` selects the single-source keys), where an empty section merges."""


def deep_merge(base: dict[str, Any], update: dict[str, Any], path: str = "") -> dict[str, Any]:
    """`base` with `update` laid over it, mappings merged key by key (neither is modified)."""
    merged = dict(base)
    for key, value in update.items():
        dotted = f"{path}{key}"
        if value == {} and dotted in CLEARED_BY_EMPTY:
            merged[key] = {}
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value, dotted + ".")
        else:
            merged[key] = value
    return merged


def dotted_to_nested(overrides: dict[str, Any]) -> dict[str, Any]:
    """{"training.lr": 3e-4} -> {"training": {"lr": 3e-4}}.

    Two overrides that disagree about the shape (`model=3` and `model.n_layer=2`) are a
    ConfigError rather than one silently replacing the other.
    """
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        parts = str(dotted).split(".")
        if not all(parts):
            raise ConfigError(f"{dotted!r}: not a dotted config key (in {COMMAND_LINE})")
        node = nested
        *parents, leaf = parts
        for depth, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"{dotted}: conflicts with {'.'.join(parts[: depth + 1])}={child!r} "
                    f"(in {COMMAND_LINE})"
                )
            node = child
        if leaf in node:
            if isinstance(node[leaf], dict) and isinstance(value, dict):
                node[leaf] = deep_merge(node[leaf], value)
                continue
            raise ConfigError(
                f"{dotted}: conflicts with another override of its keys (in {COMMAND_LINE})"
            )
        node[leaf] = value
    return nested


def _drop_empty_sections(values: dict[str, Any], model: type[BaseModel] = Config) -> dict[str, Any]:
    """`evaluation:` with nothing under it (YAML null) means "no settings here", not "no section".

    Only for sections that cannot be None; `training.batch_ramp: null` still switches the ramp off.
    """
    cleaned: dict[str, Any] = {}
    for key, value in values.items():
        info = model.model_fields.get(key) if isinstance(key, str) else None
        nested, nullable = nested_model(info.annotation) if info is not None else (None, True)
        if nested is not None and value is None and not nullable:
            continue
        if nested is not None and isinstance(value, dict):
            value = _drop_empty_sections(value, nested)
        cleaned[key] = value
    return cleaned


def _record_provenance(provenance: dict[str, str], values: dict[str, Any], source: str) -> None:
    """Blame `source` for every leaf it sets, forgetting what it replaced in lower layers.

    A scalar that replaces a section (or a section that replaces a scalar) takes the blame for
    the whole subtree, so an error there never names a file whose value was overridden.
    """
    for key, value in _flatten(values).items():
        replaces_subtree = not (isinstance(value, dict) and not value)  # `{}` merges, keeps all
        parts = key.split(".")
        stale = [".".join(parts[:cut]) for cut in range(1, len(parts))]
        if replaces_subtree:
            stale += [old for old in provenance if old.startswith(key + ".")]
        for old in stale:
            provenance.pop(old, None)
        provenance[key] = source


def resolve(layers: list[Layer]) -> Config:
    """Merge layers in order and validate once; every problem goes into one ConfigError."""
    merged: dict[str, Any] = {}
    provenance: dict[str, str] = {}
    for layer in layers:
        values = _drop_empty_sections(layer.values)
        merged = deep_merge(merged, values)
        _record_provenance(provenance, values, layer.source)
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        problems = validation_problems(exc, provenance)
        raise ConfigError("invalid config: " + "; ".join(problems)) from None
