"""The base of every config section, and the error that cross-field checks raise.

Kept apart from the sections themselves so that section modules (`schema.py`,
`schema_cluster.py`) can share it without importing each other.
"""

from __future__ import annotations

import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class CrossFieldError(ValueError):
    """A check that relates several fields failed; `keys` names them for the error message.

    Keys are dotted and relative to the model that raises (`"d_model"` in ModelConfig,
    `"training.seq_len"` in Config), so the loader can name each one and the file that set it.
    """

    def __init__(self, message: str, *keys: str) -> None:
        super().__init__(message)
        self.keys: tuple[str, ...] = keys
        self.parts: tuple[CrossFieldError, ...] = (self,)

    @classmethod
    def combine(cls, problems: list[CrossFieldError]) -> CrossFieldError:
        """One error for several failed checks of one model, each still reported on its own."""
        if len(problems) == 1:
            return problems[0]
        keys = [key for problem in problems for key in problem.keys]
        combined = cls("; ".join(str(problem) for problem in problems), *dict.fromkeys(keys))
        combined.parts = tuple(problems)
        return combined


def _is_number_type(annotation: Any) -> bool:
    """True for int/float fields (optionally `| None`, or a tuple of numbers), never for bool."""
    if annotation in (int, float):
        return True
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return bool(args) and all(_is_number_type(a) for a in args)
    if origin is tuple:
        return all(_is_number_type(a) for a in get_args(annotation) if a is not Ellipsis)
    return False


class Section(BaseModel):
    """Base for every config section: unknown keys are rejected, assignments re-validated.

    Numbers are checked a little more strictly than pydantic's lax mode: `true`/`false` is not
    a number (pydantic would read `n_layer: true` as 1), and infinities and NaN are rejected.
    """

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None or not _is_number_type(field.annotation):
            return value
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(item, bool) for item in items):
            raise ValueError(f"expected a number, not a boolean, got {value!r}")
        return value
