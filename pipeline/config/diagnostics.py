"""Turn pydantic's validation errors into lines that name the key, blame a file, and suggest.

Blame comes from the provenance that `pipeline.config.layers.resolve` records: for every
dotted leaf key, the source (file or command line) that set it last.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal, get_args, get_origin

from pydantic import ValidationError

from pipeline.config.schema import CrossFieldError
from pipeline.config.schema_walk import schema_at, schema_keys

BUILTIN = "built-in defaults"
MAX_PROBLEMS = 12
"""At most this many problems are spelled out in one error; the rest are counted."""
_REPR_LIMIT = 60


def validation_problems(exc: ValidationError, provenance: dict[str, str]) -> list[str]:
    """One line per problem in `exc`, at most `MAX_PROBLEMS` of them and then a count."""
    problems = [line for err in exc.errors() for line in _describe(err, provenance)]
    if len(problems) > MAX_PROBLEMS:
        extra = len(problems) - MAX_PROBLEMS
        problems = [*problems[:MAX_PROBLEMS], f"... and {extra} more"]
    return problems


def short_repr(value: Any) -> str:
    """`repr(value)`, cut to a length that fits in an error message."""
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."


def _sources_under(dotted: str, provenance: dict[str, str]) -> list[str]:
    if dotted in provenance:
        return [provenance[dotted]]
    return list(
        dict.fromkeys(src for key, src in provenance.items() if key.startswith(dotted + "."))
    )


def _blame(dotted: str, provenance: dict[str, str]) -> str:
    """The file(s) that set `dotted`, else those that set its nearest enclosing section."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        sources = _sources_under(".".join(parts[:cut]), provenance)
        if sources:
            return ", ".join(sources)
    return BUILTIN


def _suggest_key(loc: tuple[str | int, ...]) -> str:
    """A did-you-mean for an unknown key: a near spelling here, else the same name elsewhere."""
    name = str(loc[-1])
    owner = schema_at(loc[:-1])
    known = list(owner.model_fields) if owner else []
    hint = difflib.get_close_matches(name, known, n=1)
    if hint:
        return ".".join([*map(str, loc[:-1]), hint[0]])
    elsewhere = [key for key in schema_keys() if key.rsplit(".", 1)[-1] == name]
    if not elsewhere:
        leaves = {key.rsplit(".", 1)[-1]: key for key in schema_keys()}
        close = difflib.get_close_matches(name, list(leaves), n=1, cutoff=0.8)
        elsewhere = [leaves[close[0]]] if close else []
    return "' or '".join(elsewhere[:2])


def _literal_values(annotation: Any) -> list[Any]:
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [value for arg in get_args(annotation) for value in _literal_values(arg)]


def _suggest_value(loc: tuple[str | int, ...], value: Any) -> str | None:
    owner = schema_at(loc[:-1])
    info = owner.model_fields.get(str(loc[-1])) if owner else None
    if info is None or not isinstance(value, str):
        return None
    allowed = [str(v) for v in _literal_values(info.annotation)]
    hint = difflib.get_close_matches(value, allowed, n=1, cutoff=0.5)
    if not hint:
        hint = [v for v in allowed if v.lower() == value.lower()]
    return hint[0] if hint else None


def _describe_cross_field(
    error: CrossFieldError, loc: tuple[str | int, ...], provenance: dict[str, str]
) -> list[str]:
    section = ".".join(map(str, loc))
    problems = []
    for part in error.parts:
        keys = [".".join([*map(str, loc), key]) for key in part.keys] or [section or "<top level>"]
        explicit = [provenance[key] for key in keys if key in provenance]
        if explicit:
            implicit = [BUILTIN] if len(explicit) < len(keys) else []
            sources = ", ".join(dict.fromkeys(explicit + implicit))
        else:  # nothing set these keys: blame whoever wrote the section they belong to
            sources = _blame(section, provenance) if section else BUILTIN
        problems.append(f"{', '.join(keys)}: {part} (in {sources})")
    return problems


def _describe(error: Any, provenance: dict[str, str]) -> list[str]:
    loc = tuple(part for part in error["loc"] if not str(part).startswith("function-after"))
    dotted = ".".join(str(part) for part in loc) or "<top level>"
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, CrossFieldError):
        return _describe_cross_field(cause, loc, provenance)
    source = _blame(dotted, provenance)
    if error["type"] == "extra_forbidden":
        hint = _suggest_key(loc)
        suggestion = f"; did you mean '{hint}'?" if hint else ""
        return [f"{dotted}: unknown key (in {source}){suggestion}"]
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] not in ("value_error", "missing") and "input" in error:
        message += f", got {short_repr(error['input'])}"
    hint = _suggest_value(loc, error.get("input")) if error["type"] == "literal_error" else None
    suggestion = f"; did you mean {hint!r}?" if hint is not None else ""
    return [f"{dotted}: {message} (in {source}){suggestion}"]
