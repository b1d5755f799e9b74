"""Read a config YAML file strictly, with errors that name the file and the line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import yaml

from pipeline.errors import ConfigError


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
