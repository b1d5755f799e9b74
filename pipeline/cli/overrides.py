"""`--set KEY=VALUE` flags, shared by the commands that take them.

A module of its own, not part of `pipeline/cli/train.py`: `gpt3 promote` and `gpt3 remote`
parse the same flags, and importing them from the train command would make the promote DVC
stage depend on the whole training stack (see tests/test_stage_deps.py).
"""

from __future__ import annotations

from typing import Any

import yaml

from pipeline.errors import ConfigError


def parse_set(values: tuple[str, ...]) -> dict[str, Any]:
    """`--set training.lr=3e-4` -> {"training.lr": 3e-4} (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. training.lr=3e-4")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
            raise ConfigError(
                f"--set {item!r}: the value is not YAML ({problem}); quote it, e.g. "
                f"--set '{key.strip()}=\"...\"'"
            ) from None
    return out
