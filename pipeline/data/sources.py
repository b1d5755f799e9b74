"""The sources a run reads: one (`data.source`/`data.inputs`) or a mixture (`data.sources`).

Every later stage asks this module where each source's prepared folder is and where the
tokenizer lives, so the two layouts differ in one place only:
- one source: `data.prepared_dir` is the prepared folder (tokenizer inside it);
- a mixture: `data.prepared_dir/<name>` per source, and one tokenizer in `data.tokenizer_dir`,
  copied into each source's folder so that each folder is complete on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config.schema import DataConfig
from pipeline.data.prepared import PreparedMeta
from pipeline.errors import ConfigError, DataError


@dataclass(frozen=True)
class SourceSpec:
    """One source, resolved: what to read, how much to sample it, where it is prepared."""

    name: str
    kind: str
    """`files` or `shakespeare`."""
    inputs: tuple[str, ...]
    text_field: str
    weight: float
    folder: Path
    """Its prepared folder (meta.json, tokenizer copy, token shards)."""


def data_sources(data: DataConfig) -> list[SourceSpec]:
    """The sources in params order; a single source is named after `data.source`."""
    if not data.sources:
        return [
            SourceSpec(
                name=data.source,
                kind=data.source,
                inputs=tuple(data.inputs),
                text_field=data.jsonl_field,
                weight=1.0,
                folder=Path(data.prepared_dir),
            )
        ]
    return [
        SourceSpec(
            name=name,
            kind=source.kind,
            inputs=tuple(source.inputs),
            text_field=source.text_field,
            weight=source.weight,
            folder=Path(data.prepared_dir) / name,
        )
        for name, source in data.sources.items()
    ]


def find_source(data: DataConfig, name: str) -> SourceSpec:
    """The source called `name`; an unknown name lists the known ones."""
    for spec in data_sources(data):
        if spec.name == name:
            return spec
    known = ", ".join(spec.name for spec in data_sources(data))
    raise ConfigError(f"--source: no source {name!r} in data.sources; known: {known}")


def tokenizer_folder(data: DataConfig) -> Path:
    """Where prepare builds the tokenizer: the prepared folder, or a mixture's shared one."""
    return Path(data.tokenizer_dir) if data.sources else Path(data.prepared_dir)


def primary_folder(data: DataConfig) -> Path:
    """The folder later stages take the tokenizer and vocabulary from: the first source's."""
    return data_sources(data)[0].folder


def tokenizer_id(meta: PreparedMeta) -> str:
    """Which tokenizer made a prepared folder: its kind and the hash of its file."""
    return f"{meta.tokenizer.kind}:{meta.outputs.get(meta.tokenizer.file, '?')}"


def check_same_vocabulary(specs: list[SourceSpec], metas: list[PreparedMeta]) -> None:
    """Every source must be tokenized alike: one model reads them all with one embedding."""
    first, first_meta = specs[0], metas[0]
    for spec, meta in zip(specs[1:], metas[1:], strict=True):
        for what, get in (
            ("vocab_size", lambda m: m.vocab_size),
            ("eot_id", lambda m: m.eot_id),
            ("dtype", lambda m: m.dtype),
            ("tokenizer", tokenizer_id),
        ):
            if get(meta) != get(first_meta):
                raise DataError(
                    f"{first.folder} and {spec.folder} differ in {what} ({get(first_meta)} vs "
                    f"{get(meta)}): the sources of a mixture need one tokenizer; prepare again"
                )
