"""Walk the `Config` schema: which fields are sections, and every dotted key it knows."""

from __future__ import annotations

import functools
import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel

from pipeline.config.schema import Config


def nested_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the pydantic model inside `annotation`, whether None is also allowed)."""
    candidates = (
        get_args(annotation)
        if get_origin(annotation) in (Union, types.UnionType)
        else (annotation,)
    )
    nested = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return nested, type(None) in candidates


def schema_at(path: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `path` (None past a leaf)."""
    model: type[BaseModel] = Config
    for part in path:
        info = model.model_fields.get(str(part))
        if info is None:
            return None
        nested, _ = nested_model(info.annotation)
        if nested is None:
            return None
        model = nested
    return model


@functools.cache
def schema_keys(model: type[BaseModel] = Config, prefix: str = "") -> tuple[str, ...]:
    """Every dotted key the schema knows, sections and leaves, in field order."""
    keys: list[str] = []
    for name, info in model.model_fields.items():
        keys.append(prefix + name)
        nested, _ = nested_model(info.annotation)
        if nested is not None:
            keys.extend(schema_keys(nested, f"{prefix}{name}."))
    return tuple(keys)
