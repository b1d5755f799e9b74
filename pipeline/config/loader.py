"""Resolve the configuration from its layers and validate it once.

Precedence, lowest first: built-in defaults < model config file < training config file <
`params.yaml` < command-line flags. Each leaf key remembers the file that set it last, so a
validation error can name both the key and where it came from.
"""

from __future__ import annotations

import difflib
import functools
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config.schema import Config, CrossFieldError
from pipeline.errors import ConfigError

MODEL_CONFIG_DIR = Path("configs/model_configs")
BUILTIN = "built-in defaults"
COMMAND_LINE = "command line"
MAX_PROBLEMS = 12
"""At most this many problems are spelled out in one error; the rest are counted."""
_REPR_LIMIT = 60


@dataclass
class Layer:
    """One source of settings: a nested mapping and the name to blame for its keys."""

    source: str
    values: dict[str, Any] = field(default_factory=dict)


class _ConfigYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter where a config file would otherwise fail silently or oddly.

    - A key repeated in one mapping is an error (plain YAML keeps the last one, so a second
      `training:` block would silently drop the first).
    - Dates stay strings (`name: 2024-01-15` is a name; no config field holds a date, and an
      impossible date like 2024-13-01 would otherwise crash the parser).
    - A bad explicitly tagged scalar (`!!int abc`) is a YAML error with a line, not a crash.
    """

    yaml_implicit_resolvers: ClassVar[dict[Any, list[tuple[str, Any]]]] = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {node.tag} value: {exc}", node.start_mark
            ) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first_line
                except TypeError:  # unhashable: the base class reports it
                    continue
                if seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first set on line {first_line[key] + 1})",
                        key_node.start_mark,
                    )
                first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file whose top level must be a mapping; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=_ConfigYamlLoader)  # a SafeLoader: builds no objects
    except yaml.YAMLError as exc:
        where = _yaml_error_location(path, text, exc)
        raise ConfigError(f"{where}: YAML syntax error: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nesting too deep") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {kind}")
    return data


def _yaml_error_location(path: Path, text: str, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        return f"{path}:{mark.line + 1}"
    position = getattr(exc, "position", None)  # yaml.reader.ReaderError: bad characters
    if isinstance(position, int):
        return f"{path}:{text.count(chr(10), 0, position) + 1}"
    return str(path)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.reader.ReaderError):
        char = exc.character
        code = f"#x{char:04x}" if isinstance(char, int) else repr(char)
        return f"unacceptable character {code}: {exc.reason}"
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    return f"{problem} ({context})" if context else str(problem)


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
                node[leaf] = _deep_merge(node[leaf], value)
                continue
            raise ConfigError(
                f"{dotted}: conflicts with another override of its keys (in {COMMAND_LINE})"
            )
        node[leaf] = value
    return nested


def _nested_model(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the pydantic model inside `annotation`, whether None is also allowed)."""
    candidates = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (
        annotation,
    )
    nested = next(
        (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
    )
    return nested, type(None) in candidates


def _schema_at(path: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `path` (None past a leaf)."""
    model: type[BaseModel] = Config
    for part in path:
        info = model.model_fields.get(str(part))
        if info is None:
            return None
        nested, _ = _nested_model(info.annotation)
        if nested is None:
            return None
        model = nested
    return model


@functools.cache
def _schema_keys(model: type[BaseModel] = Config, prefix: str = "") -> tuple[str, ...]:
    """Every dotted key the schema knows, sections and leaves, in field order."""
    keys: list[str] = []
    for name, info in model.model_fields.items():
        keys.append(prefix + name)
        nested, _ = _nested_model(info.annotation)
        if nested is not None:
            keys.extend(_schema_keys(nested, f"{prefix}{name}."))
    return tuple(keys)


def _drop_empty_sections(values: dict[str, Any], model: type[BaseModel] = Config) -> dict[str, Any]:
    """`evaluation:` with nothing under it (YAML null) means "no settings here", not "no section".

    Only for sections that cannot be None; `training.batch_ramp: null` still switches the ramp off.
    """
    cleaned: dict[str, Any] = {}
    for key, value in values.items():
        info = model.model_fields.get(key) if isinstance(key, str) else None
        nested, nullable = _nested_model(info.annotation) if info is not None else (None, True)
        if nested is not None and value is None and not nullable:
            continue
        if nested is not None and isinstance(value, dict):
            value = _drop_empty_sections(value, nested)
        cleaned[key] = value
    return cleaned


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


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."


def _suggest_key(loc: tuple[str | int, ...]) -> str:
    """A did-you-mean for an unknown key: a near spelling here, else the same name elsewhere."""
    name = str(loc[-1])
    owner = _schema_at(loc[:-1])
    known = list(owner.model_fields) if owner else []
    hint = difflib.get_close_matches(name, known, n=1)
    if hint:
        return ".".join([*map(str, loc[:-1]), hint[0]])
    elsewhere = [key for key in _schema_keys() if key.rsplit(".", 1)[-1] == name]
    if not elsewhere:
        leaves = {key.rsplit(".", 1)[-1]: key for key in _schema_keys()}
        close = difflib.get_close_matches(name, list(leaves), n=1, cutoff=0.8)
        elsewhere = [leaves[close[0]]] if close else []
    return "' or '".join(elsewhere[:2])


def _literal_values(annotation: Any) -> list[Any]:
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [value for arg in get_args(annotation) for value in _literal_values(arg)]


def _suggest_value(loc: tuple[str | int, ...], value: Any) -> str | None:
    owner = _schema_at(loc[:-1])
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
        message += f", got {_short(error['input'])}"
    hint = _suggest_value(loc, error.get("input")) if error["type"] == "literal_error" else None
    suggestion = f"; did you mean {hint!r}?" if hint is not None else ""
    return [f"{dotted}: {message} (in {source}){suggestion}"]


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
        merged = _deep_merge(merged, values)
        _record_provenance(provenance, values, layer.source)
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        problems = [line for err in exc.errors() for line in _describe(err, provenance)]
        if len(problems) > MAX_PROBLEMS:
            extra = len(problems) - MAX_PROBLEMS
            problems = [*problems[:MAX_PROBLEMS], f"... and {extra} more"]
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
        cli = _deep_merge(cli, {"model": {"config": str(model_config)}})
    if training_config:
        cli = _deep_merge(cli, {"training": {"config": str(training_config)}})

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
            f"{section}.config: expected the path of a YAML file, got {_short(value)} (in {source})"
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


def dump_config(config: Config) -> str:
    """The resolved config as YAML, in field order, for `resolved_config.yaml` and MLflow."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _flatten_schema(
    model: type[BaseModel], values: dict[str, Any] | None, prefix: str = ""
) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        value = values.get(name) if values else None
        nested, _ = _nested_model(info.annotation)
        if nested is not None:
            flat.update(_flatten_schema(nested, value if isinstance(value, dict) else None,
                                        f"{prefix}{name}."))
        else:
            flat[prefix + name] = value
    return flat


def flatten_config(config: Config) -> dict[str, Any]:
    """Stable dotted keys (`training.lr`) for MLflow params, so runs line up column by column.

    The keys depend only on the schema: an unset optional section (`training.batch_ramp: null`)
    still gives its leaves (`training.batch_ramp.start_tokens: None`).
    """
    return _flatten_schema(Config, config.model_dump(mode="json"))
