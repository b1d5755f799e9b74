"""A mixture's one tokenizer, shared by every source: its record, and the check that a source
prepared later uses a tokenizer built with this config's settings."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config.schema import Config, DataConfig
from pipeline.data.prepared import SampleMeta
from pipeline.data.sources import tokenizer_folder
from pipeline.data.staging import write_json
from pipeline.data.tokenizer import Tokenizer, open_tokenizer
from pipeline.errors import DataError
from pipeline.hashing import file_sha256

TOKENIZER_META = "tokenizer_meta.json"
"""A mixture's shared tokenizer folder: which tokenizer, and what it learned from."""


def tokenizer_settings(data: DataConfig, seed: int) -> dict[str, object]:
    """What a shared tokenizer depends on: a source prepared with it must agree on all."""
    if data.tokenizer != "bpe":
        return {"kind": data.tokenizer}
    return {
        "kind": data.tokenizer,
        "vocab_size": data.vocab_size,
        "seed": seed,
        "val_fraction": data.val_fraction,
        "tokenizer_sample_bytes": data.tokenizer_sample_bytes,
        "tokenizer_sources": data.tokenizer_sources,
    }


def shared_tokenizer(data: DataConfig, seed: int) -> tuple[Tokenizer, SampleMeta | None]:
    """A mixture's tokenizer, built earlier by `--tokenizer_only`, checked to fit the config."""
    folder = tokenizer_folder(data)
    meta_file = folder / TOKENIZER_META
    if not meta_file.is_file():
        raise DataError(
            f"{folder}: no shared tokenizer; run `gpt3 prepare --tokenizer_only` (the DVC stage "
            "`tokenizer`) before preparing single sources"
        )
    record = json.loads(meta_file.read_text())
    if record.get("kind") != data.tokenizer:
        raise DataError(
            f"{folder}: holds a {record.get('kind')} tokenizer but data.tokenizer is "
            f"{data.tokenizer}; run `gpt3 prepare --tokenizer_only` again"
        )
    built, wanted = record.get("settings") or {}, tokenizer_settings(data, seed)
    changed = sorted(key for key in wanted if built.get(key) != wanted[key])
    if changed:
        was = ", ".join(f"{key} {built.get(key)!r}" for key in changed)
        raise DataError(
            f"{folder}: the shared tokenizer was built with {was}, not this config's; run "
            "`gpt3 prepare --tokenizer_only` (the DVC stage `tokenizer`) again"
        )
    tokenizer = open_tokenizer(record["kind"], folder)
    if file_sha256(tokenizer.file) != record.get("sha256"):
        raise DataError(f"{tokenizer.file}: differs from {meta_file}; prepare the tokenizer again")
    sample = record.get("sample")
    return tokenizer, SampleMeta(**sample) if sample else None


def write_shared_record(
    folder: Path,
    tokenizer: Tokenizer,
    config: Config,
    learn_from: list[str],
    sample: SampleMeta | None,
) -> None:
    """`tokenizer_meta.json` beside a freshly built shared tokenizer."""
    record = {
        "kind": tokenizer.kind,
        "file": tokenizer.file.name,
        "sha256": file_sha256(tokenizer.file),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "seed": config.seed,
        "sources": learn_from,
        "settings": tokenizer_settings(config.data, config.seed),
        "sample": sample.model_dump() if sample else None,
    }
    write_json(folder / TOKENIZER_META, json.dumps(record, indent=2))
