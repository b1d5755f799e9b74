"""Tokenizers chosen by name: a byte-level BPE trained on the corpus, or GPT-2's BPE (tiktoken).

`prepare` builds one into the prepared folder; every later stage (training, evaluation,
generation, export) reopens it with `load_tokenizer(prepared_dir)` and sees the same small
interface, whatever the kind. Adding a kind means adding one `TokenizerKind` to the registry.

Both kinds split text with GPT-2's pre-tokenizer regex, which lets `encode` cut long documents
into pieces at places where that regex always ends a piece: the ids are identical to encoding
the whole text at once, while memory stays bounded and HF tokenizers runs about twice as fast.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar

import requests
import tiktoken
import tiktoken.load
import tokenizers
from tiktoken_ext.openai_public import r50k_pat_str
from tokenizers import decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from pipeline.config.schema import DataConfig
from pipeline.data.prepared import load_meta
from pipeline.errors import ConfigError, DataError

logger = logging.getLogger("pipeline.prepare")

EOT_TOKEN = "<|endoftext|>"
"""Ends every document, in both kinds (GPT-2's own end-of-text token)."""

SPECIAL_TOKENS = (EOT_TOKEN,)
"""Special tokens of the trained BPE; they never arise from encoding text."""

BYTE_ALPHABET_SIZE = 256
"""A byte-level BPE starts from all 256 bytes, so any text can be encoded."""

MAX_PIECE_CHARS = 1 << 14
"""`encode` cuts text into pieces of about this many characters (see `split_at_safe_boundaries`)."""
TIKTOKEN_PIECE_CHARS = 1 << 18
"""tiktoken is fastest on long pieces (measured: 16K-character pieces ran at 70% of its own
batch speed); pieces still bound the memory of a huge document."""

BPE_FILE = "tokenizer.json"
R50K_FILE = "r50k_base.tiktoken"
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
"""The hash tiktoken itself checks; anything else is not GPT-2's vocabulary."""
R50K_N_VOCAB = 50257


def split_at_safe_boundaries(text: str, max_chars: int = MAX_PIECE_CHARS) -> list[str]:
    """Cut `text` into pieces of at least `max_chars` characters (the last may be shorter).

    Cuts fall only before a newline that follows a non-space character. GPT-2's pre-tokenizer
    regex (used by both kinds) never lets a piece span such a place: no alternative matches a
    non-space followed by a newline, and whitespace runs start after it. So encoding the pieces
    one by one gives exactly the ids of encoding the whole text. `str.isspace` is a superset of
    the regex's `\\s`, which errs on the side of not cutting.
    """
    pieces: list[str] = []
    start = 0
    while len(text) - start > max_chars:
        cut = text.find("\n", start + max_chars)
        while cut != -1 and text[cut - 1].isspace():
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


class Tokenizer(ABC):
    """What later stages need from a tokenizer: ids in and out, the end-of-text id, its files.

    `encode` treats every character as text: a literal "<|endoftext|>" inside a document is
    encoded as ordinary characters, so only the pipeline itself places `eot_id` (between
    documents), and the token stream always splits back into the documents that went in.
    """

    kind: ClassVar[str]

    def __init__(self, files: tuple[Path, ...], max_piece_chars: int = MAX_PIECE_CHARS) -> None:
        self.files = files
        """The files that define this tokenizer (what an export copies), first the main one."""
        self.max_piece_chars = max_piece_chars

    @property
    def file(self) -> Path:
        """The main tokenizer file (`tokenizer.json` or `r50k_base.tiktoken`)."""
        return self.files[0]

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included: every id is below this."""

    @property
    @abstractmethod
    def eot_id(self) -> int:
        """The id of `<|endoftext|>`, which follows every document."""

    @abstractmethod
    def _encode_piece(self, text: str) -> list[int]:
        """Encode one piece of text, special-token strings included, as plain text."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; `eot_id` comes back as "<|endoftext|>"."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no end-of-text token added."""
        ids: list[int] = []
        for piece_ids in self.encode_pieces(text):
            ids.extend(piece_ids)
        return ids

    def encode_pieces(self, text: str) -> Iterator[list[int]]:
        """The ids of `text` a piece at a time (together exactly `encode(text)`), so a huge
        document never has all its ids in memory at once."""
        for piece in split_at_safe_boundaries(text, self.max_piece_chars):
            yield self._encode_piece(piece)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, file={str(self.file)!r})"


class BpeTokenizer(Tokenizer):
    """A byte-level BPE in HF `tokenizers` format, exactly invertible on any text."""

    kind = "bpe"

    def __init__(
        self, model: tokenizers.Tokenizer, file: Path, max_piece_chars: int = MAX_PIECE_CHARS
    ) -> None:
        super().__init__((file,), max_piece_chars)
        eot_id = model.token_to_id(EOT_TOKEN)
        if eot_id is None:
            raise DataError(f"{file}: the tokenizer has no {EOT_TOKEN} token")
        # Encode "<|endoftext|>" inside text as characters; only the pipeline places eot_id.
        model.encode_special_tokens = True
        self._model = model
        self._eot_id = eot_id

    @classmethod
    def from_file(cls, file: Path) -> BpeTokenizer:
        """Reopen a `tokenizer.json`; a missing or unreadable file is a DataError."""
        if not file.is_file():
            raise DataError(f"{file}: tokenizer file not found")
        try:
            model = tokenizers.Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust library raises a bare Exception on bad JSON
            raise DataError(f"{file}: not a readable tokenizers file ({exc})") from None
        return cls(model, file)

    @property
    def vocab_size(self) -> int:
        return self._model.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        return self._eot_id

    def _encode_piece(self, text: str) -> list[int]:
        return self._model.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._model.decode(list(ids), skip_special_tokens=False)


def check_bpe_vocab_size(vocab_size: int) -> None:
    """A byte-level BPE needs room for all 256 bytes and the special tokens."""
    minimum = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ConfigError(
            f"data.vocab_size: {vocab_size} is too small for a byte-level BPE; it needs at least "
            f"{minimum} ({BYTE_ALPHABET_SIZE} bytes + {len(SPECIAL_TOKENS)} special token)"
        )


def train_bpe(
    texts: Iterable[str], vocab_size: int, file: Path, progress: bool = False
) -> BpeTokenizer:
    """Train a byte-level BPE on `texts` and save it to `file`.

    No normalizer, no prefix space and the GPT-2 regex make decode(encode(text)) == text for
    any text. The trainer is deterministic for the same texts and vocab size (checked by the
    tests), which makes prepared data reproducible byte for byte.
    """
    check_bpe_vocab_size(vocab_size)
    model = tokenizers.Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=True
    )
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bar writes blank lines to stdout when not on a terminal
    )
    bar = tqdm(texts, desc="train bpe", unit="doc", disable=not progress)
    model.train_from_iterator(bar, trainer=trainer)
    model.save(str(file))
    tokenizer = BpeTokenizer(model, file)
    if tokenizer.vocab_size < vocab_size:  # the text ran out of pairs to merge
        logger.warning(
            "warning: data.vocab_size %d asked for, but the BPE learned only %d tokens from this "
            "text (too little of it to merge further); meta.json records both",
            vocab_size,
            tokenizer.vocab_size,
        )
    return tokenizer


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding (GPT-2's `r50k_base` in the pipeline) read from a local file."""

    kind = "gpt2"

    def __init__(
        self, encoding: tiktoken.Encoding, file: Path, max_piece_chars: int = TIKTOKEN_PIECE_CHARS
    ) -> None:
        super().__init__((file,), max_piece_chars)
        if EOT_TOKEN not in encoding.special_tokens_set:
            raise DataError(f"{file}: the encoding has no {EOT_TOKEN} token")
        self._encoding = encoding

    @property
    def vocab_size(self) -> int:
        return self._encoding.n_vocab

    @property
    def eot_id(self) -> int:
        return self._encoding.eot_token

    def _encode_piece(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode(list(ids))


def parse_tiktoken_ranks(contents: bytes, source: str) -> dict[bytes, int]:
    """Parse a `.tiktoken` file (one "base64-token rank" per line) into mergeable ranks."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(contents.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise DataError(f"{source}:{number}: not a .tiktoken line (base64, rank)") from None
    return ranks


def gpt2_style_encoding(name: str, ranks: dict[bytes, int]) -> tiktoken.Encoding:
    """An encoding with GPT-2's regex and `<|endoftext|>` right after the mergeable ranks."""
    return tiktoken.Encoding(
        name,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: len(ranks)},
        explicit_n_vocab=len(ranks) + 1,
    )


def _check_r50k(contents: bytes, source: str) -> None:
    _check_digest(contents, source, "r50k_base", R50K_SHA256)


def _check_digest(contents: bytes, source: str, name: str, sha256: str) -> None:
    actual = hashlib.sha256(contents).hexdigest()
    if actual != sha256:
        raise DataError(
            f"{source}: not tiktoken's {name} (sha256 {actual[:16]}..., expected "
            f"{sha256[:16]}...); download it from {R50K_URL}"
        )


def fetch_r50k(tiktoken_file: str | None) -> bytes:
    """GPT-2's BPE ranks: from `tiktoken_file`, else tiktoken's cache, else a download.

    The download goes through tiktoken, which also fills its cache. Offline with neither file
    present, the error says how to provide one.
    """
    if tiktoken_file is not None:
        path = Path(tiktoken_file).expanduser()
        if not path.is_file():
            raise DataError(
                f"data.tiktoken_file: {path} not found; download {R50K_URL} and point "
                "data.tiktoken_file (--tiktoken_file) at it"
            )
        contents = path.read_bytes()
        _check_r50k(contents, str(path))
        return contents
    try:
        return tiktoken.load.read_file_cached(R50K_URL, R50K_SHA256)
    except (requests.RequestException, OSError, ValueError) as exc:
        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
        where = f" ({cache})" if cache else ""
        raise DataError(
            f"GPT-2's BPE (tiktoken r50k_base) is not in tiktoken's cache{where} and could not "
            f"be downloaded ({type(exc).__name__}); on a machine with network, download "
            f"{R50K_URL} and set data.tiktoken_file (--tiktoken_file) to its path"
        ) from None


def load_r50k(file: Path) -> TiktokenTokenizer:
    """Reopen GPT-2's BPE from a prepared folder's copy, checking that it is the real one."""
    return load_gpt2_style(file, "r50k_base", R50K_SHA256)


def load_gpt2_style(file: Path, name: str, sha256: str) -> TiktokenTokenizer:
    """A GPT-2-style tokenizer from a `.tiktoken` file whose SHA-256 must be `sha256`.

    `load_r50k` is this with r50k_base's digest; the `gpt2` kind never takes another. Tests
    reach the same code with a small ranks file of their own (GPT-2's file is 1.6 MB and
    offline machines do not have it).
    """
    if not file.is_file():
        raise DataError(f"{file}: tokenizer file not found")
    contents = file.read_bytes()
    _check_digest(contents, str(file), name, sha256)
    encoding = gpt2_style_encoding(name, parse_tiktoken_ranks(contents, str(file)))
    return TiktokenTokenizer(encoding, file)


Builder = Callable[[Sequence[str], Path, bool], Tokenizer]
"""Makes the tokenizer in a folder: (train-split texts, folder, show progress) -> Tokenizer."""


@dataclass(frozen=True)
class TokenizerKind:
    """One entry of the registry: how to make a tokenizer of this kind and how to reopen it."""

    name: str
    filename: str
    """The file it keeps in the prepared folder."""
    plan: Callable[[DataConfig], Builder]
    """Checks the settings and fetches what is needed, writing nothing; returns the builder."""
    load: Callable[[Path], Tokenizer]
    """Reopens it from its file."""


def _plan_bpe(data: DataConfig) -> Builder:
    vocab_size = data.vocab_size
    check_bpe_vocab_size(vocab_size)  # now, so that nothing is written before the error

    def build(texts: Sequence[str], folder: Path, progress: bool) -> Tokenizer:
        return train_bpe(texts, vocab_size, folder / BPE_FILE, progress)

    return build


def _plan_gpt2(data: DataConfig) -> Builder:
    contents = fetch_r50k(data.tiktoken_file)

    def build(texts: Sequence[str], folder: Path, progress: bool) -> Tokenizer:
        file = folder / R50K_FILE
        file.write_bytes(contents)
        return load_r50k(file)

    return build


TOKENIZER_KINDS: Mapping[str, TokenizerKind] = MappingProxyType(
    {
        "bpe": TokenizerKind("bpe", BPE_FILE, _plan_bpe, BpeTokenizer.from_file),
        "gpt2": TokenizerKind("gpt2", R50K_FILE, _plan_gpt2, load_r50k),
    }
)
"""The registry: `data.tokenizer` names one of these."""


def tokenizer_kind(name: str) -> TokenizerKind:
    """The registry entry for `name`; an unknown name lists the known ones."""
    kind = TOKENIZER_KINDS.get(name)
    if kind is None:
        raise ConfigError(
            f"data.tokenizer: unknown tokenizer {name!r}; known: {', '.join(TOKENIZER_KINDS)}"
        )
    return kind


def open_tokenizer(kind: str, folder: str | Path) -> Tokenizer:
    """Reopen the tokenizer of `kind` kept in `folder` (no meta.json needed)."""
    entry = tokenizer_kind(kind)
    return entry.load(Path(folder) / entry.filename)


def load_tokenizer(prepared_dir: str | Path) -> Tokenizer:
    """The tokenizer of a prepared folder, checked against its meta.json."""
    meta = load_meta(prepared_dir)
    tokenizer = open_tokenizer(meta.tokenizer.kind, prepared_dir)
    if (tokenizer.vocab_size, tokenizer.eot_id) != (meta.vocab_size, meta.eot_id):
        raise DataError(
            f"{tokenizer.file}: vocab size {tokenizer.vocab_size} / eot id {tokenizer.eot_id} "
            f"do not match meta.json ({meta.vocab_size} / {meta.eot_id}); prepare again"
        )
    return tokenizer
