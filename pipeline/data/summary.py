"""What preparing one source did: the closing line of `gpt3 prepare`, and figures for callers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.data.prepared import PreparedMeta


@dataclass(frozen=True)
class PrepareSummary:
    """What preparing one source did, for the closing line and for callers (bench, tests)."""

    prepared_dir: Path
    meta: PreparedMeta
    seconds: float

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.meta.splits.values())

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.meta.splits.values())

    @property
    def text_bytes(self) -> int:
        return sum(s.text_bytes for s in self.meta.splits.values())

    @property
    def mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)

    def line(self) -> str:
        """One summary line: documents, tokens, throughput, where and which data."""
        train, val = self.meta.splits["train"], self.meta.splits["val"]
        skipped = self.meta.empty_documents_skipped
        shards = sum(len(s.shards) for s in self.meta.splits.values())
        return (
            f"prepared {self.meta.source}: {self.documents} documents (train {train.documents}, "
            f"val {val.documents}), {self.tokens:,} tokens (train {train.tokens:,}, val "
            f"{val.tokens:,}) in {shards} shard(s) from {self.text_bytes / 1e6:.2f} MB of text "
            f"in {self.seconds:.1f} s ({self.mb_per_s:.2f} MB/s); {self.meta.tokenizer.kind} "
            f"vocab {self.meta.vocab_size} {self.meta.dtype} -> {self.prepared_dir} "
            f"[data_hash {self.meta.data_hash[:12]}]"
            + (f"; {skipped} empty documents skipped" if skipped else "")
        )
