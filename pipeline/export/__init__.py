"""Export a trained model to other ecosystems' formats, chosen by name from `EXPORT_FORMATS`.

Each exporter takes a `LoadedModel` (see `pipeline.evaluation.model_source`) and an output
folder, and returns the folder it wrote. Adding a format means adding one entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

from pipeline.errors import ConfigError
from pipeline.evaluation.model_source import LoadedModel
from pipeline.export.hf import export_hf

Exporter = Callable[[LoadedModel, Path, bool], Path]
"""(model, output folder, overwrite) -> the folder written."""

EXPORT_FORMATS: Mapping[str, Exporter] = MappingProxyType({"hf": export_hf})


def exporter_for(fmt: str) -> Exporter:
    """The exporter registered as `fmt`; an unknown format lists the known ones."""
    exporter = EXPORT_FORMATS.get(fmt)
    if exporter is None:
        raise ConfigError(f"unknown export format {fmt!r}; known: {', '.join(EXPORT_FORMATS)}")
    return exporter


def export_model(
    loaded: LoadedModel, fmt: str, output: str | Path, overwrite: bool = False
) -> Path:
    """Export `loaded` in format `fmt` to `output` and return the folder written."""
    return exporter_for(fmt)(loaded, Path(output), overwrite)
