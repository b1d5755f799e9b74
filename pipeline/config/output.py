"""Write a resolved config out: as YAML, and as flat dotted keys for MLflow params."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from pipeline.config.schema import Config
from pipeline.config.schema_walk import nested_model


def dump_config(config: Config) -> str:
    """The resolved config as YAML, in field order, for `resolved_config.yaml` and MLflow."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _flatten_schema(
    model: type[BaseModel], values: dict[str, Any] | None, prefix: str = ""
) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        value = values.get(name) if values else None
        nested, _ = nested_model(info.annotation)
        if nested is not None:
            flat.update(
                _flatten_schema(
                    nested, value if isinstance(value, dict) else None, f"{prefix}{name}."
                )
            )
        else:
            flat[prefix + name] = value
    return flat


def flatten_config(config: Config) -> dict[str, Any]:
    """Stable dotted keys (`training.lr`) for MLflow params, so runs line up column by column.

    The keys depend only on the schema: an unset optional section (`training.batch_ramp: null`)
    still gives its leaves (`training.batch_ramp.start_tokens: None`).
    """
    return _flatten_schema(Config, config.model_dump(mode="json"))
