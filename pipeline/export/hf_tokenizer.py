"""Tokenizer files that `transformers.AutoTokenizer.from_pretrained` loads, for each kind.

- `bpe` (the byte-level BPE trained by `prepare`) is already a HF `tokenizers` file: copied
  as `tokenizer.json`.
- `gpt2` (tiktoken ranks) is converted to GPT-2's own files: `vocab.json` (byte-level unicode
  strings -> id), `merges.txt`, and the `tokenizer.json` built from them. The merge that made
  a token of rank r is found by running BPE on its bytes with only the ranks below r, which
  is exactly how tiktoken would have built it; on r50k_base this reproduces GPT-2's files.

Both get a `tokenizer_config.json` naming `PreTrainedTokenizerFast` with `<|endoftext|>` as
bos, eos and unk (as GPT-2 has it). One difference from the project's tokenizers: they read a
literal "<|endoftext|>" in text as characters, while HF reads it as the special token, as
GPT-2's HF tokenizer always has.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from pipeline.data.tokenizer import EOT_TOKEN, Tokenizer, parse_tiktoken_ranks
from pipeline.errors import DataError


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (its `encoder.py`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _as_text(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _merge_pair(ranks: Mapping[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The two tokens whose merge produced `token`: BPE on its bytes, ranks below its own."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best: tuple[int, int] | None = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < limit and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2 or any(p not in ranks for p in parts):
        raise DataError(f"token {token!r} (rank {limit}) is not the merge of two earlier tokens")
    return parts[0], parts[1]


def tiktoken_to_vocab_merges(
    ranks: Mapping[bytes, int],
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2 style `vocab.json` contents and merges (in priority order) from tiktoken ranks."""
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise DataError(
            f"the tiktoken ranks lack {len(missing)} single bytes; not a byte-level BPE"
        )
    vocab = {_as_text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _merge_pair(ranks, token)
            merges.append((_as_text(left), _as_text(right)))
    return vocab, merges


def _tokenizer_from_vocab_merges(
    vocab: dict[str, int], merges: list[tuple[str, str]], eot_id: int
) -> tokenizers.Tokenizer:
    model = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    model.decoder = decoders.ByteLevel()
    model.post_processor = processors.ByteLevel(trim_offsets=False)
    model.add_special_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)])
    if model.token_to_id(EOT_TOKEN) != eot_id:
        raise DataError(f"{EOT_TOKEN} would get id {model.token_to_id(EOT_TOKEN)}, not {eot_id}")
    return model


def _write_tiktoken(tokenizer: Tokenizer, out_dir: Path) -> list[Path]:
    ranks = parse_tiktoken_ranks(tokenizer.file.read_bytes(), str(tokenizer.file))
    vocab, merges = tiktoken_to_vocab_merges(ranks)
    vocab[EOT_TOKEN] = tokenizer.eot_id
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    core = {k: v for k, v in vocab.items() if k != EOT_TOKEN}
    _tokenizer_from_vocab_merges(core, merges, tokenizer.eot_id).save(
        str(out_dir / "tokenizer.json")
    )
    return [out_dir / "vocab.json", out_dir / "merges.txt", out_dir / "tokenizer.json"]


def _write_bpe(tokenizer: Tokenizer, out_dir: Path) -> list[Path]:
    shutil.copyfile(tokenizer.file, out_dir / "tokenizer.json")
    return [out_dir / "tokenizer.json"]


TOKENIZER_WRITERS: Mapping[str, Callable[[Tokenizer, Path], list[Path]]] = MappingProxyType({
    "bpe": _write_bpe,
    "gpt2": _write_tiktoken,
})
"""Tokenizer kind (`pipeline.data.tokenizer.TOKENIZER_KINDS`) -> writer of its HF files."""


def write_hf_tokenizer(tokenizer: Tokenizer, out_dir: Path, model_max_length: int) -> list[Path]:
    """Write the tokenizer's HF files plus `tokenizer_config.json` and the special-tokens map."""
    writer = TOKENIZER_WRITERS.get(tokenizer.kind)
    if writer is None:
        raise DataError(f"no Hugging Face export for tokenizer kind {tokenizer.kind!r}")
    files = writer(tokenizer, out_dir)
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return [*files, out_dir / "tokenizer_config.json", out_dir / "special_tokens_map.json"]
