"""Write a resolved config out: as YAML, and as flat dotted keys for MLflow params.

Everything written goes through `public_values`, so a password in a URL (`tracking.uri`,
`storage.url`) never reaches a file, a checkpoint or MLflow (see `pipeline.redact`).
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from pipeline.config.schema import Config
from pipeline.config.schema_walk import nested_model
from pipeline.redact import redact_values


def public_values(config: Config) -> dict[str, Any]:
    """The config as JSON-like values, credentials in URLs replaced by `***`."""
    return redact_values(config.model_dump(mode="json"))


def dump_config(config: Config) -> str:
    """The resolved config as YAML, in field order, for `resolved_config.yaml` and MLflow."""
    return yaml.safe_dump(public_values(config), sort_keys=False)


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
    return _flatten_schema(Config, public_values(config))
