"""The prepare stage, end to end on real files with real tokenizers (no mocks).

Covers: the default corpus and user txt/jsonl inputs, exact round trips, byte-identical reruns
(whatever the worker count), seeded splits, every bad-input class (one line, exit 2, prior
outputs untouched), an interrupted run, the readers later stages use, and the tokenizers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.cli import cli, run_command
from pipeline.cli.prepare import prepare
from pipeline.config.schema import Config, DataConfig
from pipeline.data.corpus import Document, read_corpus, shakespeare_files
from pipeline.data.prepare import (
    load_meta,
    open_tokens,
    prepare_data,
    split_documents,
    token_dtype,
    verify_prepared,
)
from pipeline.data.tokenizer import (
    EOT_TOKEN,
    R50K_FILE,
    TOKENIZER_KINDS,
    BpeTokenizer,
    TiktokenTokenizer,
    check_bpe_vocab_size,
    fetch_r50k,
    gpt2_style_encoding,
    load_tokenizer,
    parse_tiktoken_ranks,
    split_at_safe_boundaries,
    tokenizer_kind,
    train_bpe,
)
from pipeline.errors import USER_ERROR_EXIT_CODE, ConfigError, DataError

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGE = REPO_ROOT / "stages" / "prepare.py"


# --------------------------------------------------------------------------- helpers


def make_config(prepared_dir: Path, seed: int = 1337, **data: object) -> Config:
    data = {"vocab_size": 300, "num_workers": 1, **data}
    return Config(seed=seed, data=DataConfig(prepared_dir=str(prepared_dir), **data))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(folder: Path) -> list[str]:
    """Temporary or set-aside siblings of a prepared folder."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str], command=prepare) -> tuple:
    """Run a command the way the console script and the DVC stage do: (exit code, out, err)."""
    with pytest.raises(SystemExit) as exited:
        run_command(command, args)
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def segments(tokens: np.ndarray, eot_id: int) -> list[np.ndarray]:
    """The token stream cut after each end-of-text id: one array per document."""
    ends = np.flatnonzero(tokens == eot_id)
    starts = np.concatenate(([0], ends[:-1] + 1))
    return [tokens[s:e] for s, e in zip(starts, ends, strict=True)]


def write_small_corpus(folder: Path, n_docs: int = 12) -> list[str]:
    """Real Shakespeare, cut into `n_docs` .txt documents; returns their texts."""
    text = next(p for p in shakespeare_files() if p.name == "hamlet_gut.txt").read_text()
    lines = text.splitlines(keepends=True)[:1800]
    step = len(lines) // n_docs
    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(n_docs):
        doc = "".join(lines[i * step : (i + 1) * step])
        (folder / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
        texts.append(doc)
    return texts


def write_params(path: Path, **data: object) -> Path:
    path.write_text(yaml.safe_dump({"seed": 7, "data": data}), encoding="utf-8")
    return path


def write_tiktoken(path: Path, merges: list[bytes]) -> dict[bytes, int]:
    """A small .tiktoken file: all 256 bytes, then `merges` in rank order."""
    ranks = {bytes([b]): b for b in range(256)}
    for token in merges:
        ranks[token] = len(ranks)
    lines = [base64.b64encode(tok) + b" " + str(rank).encode() for tok, rank in ranks.items()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return ranks


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shakespeare_prepared(tmp_path_factory: pytest.TempPathFactory):
    """The default corpus, prepared once with a small vocabulary and two worker processes."""
    folder = tmp_path_factory.mktemp("default") / "prepared"
    config = make_config(folder, vocab_size=512, num_workers=2, val_fraction=0.05)
    summary = prepare_data(config, progress=False)
    return config, summary, folder


@pytest.fixture(scope="module")
def small_prepared(tmp_path_factory: pytest.TempPathFactory):
    """A prepared folder from a small user corpus: the 'previous outputs' of the bad-input tests."""
    root = tmp_path_factory.mktemp("small")
    texts = write_small_corpus(root / "docs")
    folder = root / "prepared"
    config = make_config(folder, seed=7, source="files", inputs=[str(root / "docs" / "*.txt")])
    prepare_data(config, progress=False)
    return root, folder, texts


@pytest.fixture
def prior(small_prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A private copy of the small prepared folder, with a params file; cwd is tmp_path."""
    root, folder, _ = small_prepared
    target = tmp_path / "prepared"
    shutil.copytree(folder, target)
    params = write_params(
        tmp_path / "params.yaml",
        source="files",
        inputs=[str(root / "docs" / "*.txt")],
        vocab_size=300,
        num_workers=1,
        prepared_dir=str(target),
    )
    monkeypatch.chdir(tmp_path)
    return target, params, snapshot(target)


# --------------------------------------------------------------------------- the default corpus


def test_default_corpus_is_split_tokenized_and_described(shakespeare_prepared) -> None:
    config, summary, folder = shakespeare_prepared
    meta = load_meta(folder)
    assert meta.source == "shakespeare" and len(meta.inputs) == 42
    assert all(item.path.startswith("shksprdata/texts/") for item in meta.inputs)
    by_name = {p.name: p for p in shakespeare_files()}
    for item in meta.inputs:
        assert hashlib.sha256(by_name[Path(item.path).name].read_bytes()).hexdigest() == item.sha256
    assert (meta.splits["train"].documents, meta.splits["val"].documents) == (40, 2)
    assert meta.dtype == "uint16" and meta.vocab_size == 512 and meta.tokenizer.kind == "bpe"
    assert set(meta.outputs) == {"tokenizer.json", "train.bin", "val.bin"}
    assert verify_prepared(folder).data_hash == summary.meta.data_hash
    assert "42 documents" in summary.line() and "MB/s" in summary.line()

    corpus = read_corpus(config.data)
    train_idx, val_idx = split_documents(corpus.documents, config.seed, config.data.val_fraction)
    tokenizer = load_tokenizer(folder)
    assert (tokenizer.kind, tokenizer.vocab_size, tokenizer.files) == (
        "bpe",
        512,
        (folder / "tokenizer.json",),
    )
    for split, idx in (("train", train_idx), ("val", val_idx)):
        tokens = open_tokens(folder, split)
        docs = [corpus.documents[i] for i in idx]
        assert len(tokens) == meta.splits[split].tokens
        assert int((tokens == tokenizer.eot_id).sum()) == len(docs)
        assert meta.splits[split].text_bytes == sum(d.n_bytes for d in docs)
        # The round trip: the token file decodes to exactly the text that went in.
        expected = "".join(doc.text + EOT_TOKEN for doc in docs)
        assert tokenizer.decode(tokens.tolist()) == expected


def test_rerun_with_same_seed_is_byte_identical_whatever_num_workers(
    shakespeare_prepared, tmp_path: Path
) -> None:
    _config, summary, folder = shakespeare_prepared
    again = tmp_path / "prepared"
    shutil.copytree(folder, again)  # rerun over earlier outputs, as `dvc repro` does
    rerun = make_config(again, vocab_size=512, num_workers=1, val_fraction=0.05)
    assert prepare_data(rerun, progress=False).meta.data_hash == summary.meta.data_hash
    assert snapshot(again) == snapshot(folder)  # tokens, tokenizer and meta.json alike
    assert leftovers(again) == []


# --------------------------------------------------------------------------- user files


def test_user_txt_and_jsonl_round_trip_per_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    texts = write_small_corpus(docs / "plays", n_docs=4)
    special = "Windows\r\nlines, tabs\t, é, 日本語, emoji 🎭, and a literal <|endoftext|> inside.\n"
    (docs / "special.txt").write_bytes(special.encode("utf-8"))
    (docs / "empty.txt").write_bytes(b"")
    records = [
        {"body": "First record.\n\n  Indented   spaces   ", "id": 1},
        {"body": ""},
        {"body": 'Third \u2028 record with a line separator and "quotes"', "x": [1, 2]},
    ]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    jsonl = lines[0] + "\n" + lines[1] + "\n\n" + lines[2] + "\n"  # a blank line is skipped
    (docs / "sub" / "records.jsonl").write_text(jsonl, encoding="utf-8")
    params = write_params(tmp_path / "params.yaml", source="shakespeare", num_workers=2)

    code, out, err = run_cli(
        [
            "--params",
            str(params),
            "--no-progress",
            "--input",
            "docs/**/*.txt",
            "--input",
            "docs/sub/*.jsonl",
            "--jsonl_field",
            "body",
            "--vocab_size",
            "300",
            "--prepared_dir",
            "out/prepared",
            "--seed",
            "11",
        ],
        capsys,
    )
    assert (code, err) == (0, "")
    assert out.startswith("prepared 7 documents") and "2 empty documents skipped" in out

    meta = load_meta("out/prepared")
    assert meta.source == "files" and meta.seed == 11 and meta.empty_documents_skipped == 2
    assert [item.path for item in meta.inputs] == [
        "docs/empty.txt",
        *(f"docs/plays/doc{i:02d}.txt" for i in range(4)),
        "docs/special.txt",
        "docs/sub/records.jsonl",
    ]
    expected_docs = [*texts, special, records[0]["body"], records[2]["body"]]
    documents = [Document(t, "", hashlib.sha256(t.encode()).hexdigest(), 0) for t in expected_docs]
    train_idx, val_idx = split_documents(documents, 11, meta.val_fraction)
    tokenizer = load_tokenizer("out/prepared")
    for split, idx in (("train", train_idx), ("val", val_idx)):
        decoded = [
            tokenizer.decode(seg.tolist())
            for seg in segments(open_tokens("out/prepared", split), tokenizer.eot_id)
        ]
        assert decoded == [expected_docs[i] for i in idx]


def test_seed_decides_the_split_and_nothing_else_does(small_prepared, tmp_path: Path) -> None:
    root, _folder, _texts = small_prepared
    documents = read_corpus(
        DataConfig(source="files", inputs=[str(root / "docs" / "*.txt")])
    ).documents
    train, val = split_documents(documents, 7, 0.25)
    assert len(val) == 3 and sorted(train + val) == list(range(len(documents)))
    assert split_documents(documents, 7, 0.25) == (train, val)
    # Shuffling the input order keeps the same documents in val: the split follows the texts.
    reordered = list(reversed(documents))
    _, val_reordered = split_documents(reordered, 7, 0.25)
    assert {reordered[i].text for i in val_reordered} == {documents[i].text for i in val}
    other_val = split_documents(documents, 8, 0.25)[1]
    assert other_val != val

    metas = {}
    for seed in (7, 8):
        config = make_config(
            tmp_path / f"p{seed}",
            seed=seed,
            val_fraction=0.25,
            source="files",
            inputs=[str(root / "docs" / "*.txt")],
        )
        metas[seed] = prepare_data(config, progress=False).meta
    assert metas[8].seed == 8 and metas[8].data_hash != metas[7].data_hash
    assert (tmp_path / "p7" / "val.bin").read_bytes() != (tmp_path / "p8" / "val.bin").read_bytes()
    assert metas[7].splits["val"].text_bytes == sum(documents[i].n_bytes for i in val)
    assert metas[8].splits["val"].text_bytes == sum(documents[i].n_bytes for i in other_val)


def test_split_sizes() -> None:
    docs = [Document(str(i), "", str(i), 1) for i in range(42)]
    assert len(split_documents(docs, 1, 0.05)[1]) == 2
    assert len(split_documents(docs[:3], 1, 0.9)[1]) == 2  # train keeps at least one
    assert len(split_documents(docs[:10], 1, 0.01)[1]) == 1  # val gets at least one
    with pytest.raises(DataError, match="at least 2"):
        split_documents(docs[:1], 1, 0.5)


def test_token_dtype_fits_the_vocabulary() -> None:
    assert token_dtype(50257) == np.dtype("<u2") and token_dtype(65536) == np.dtype("<u2")
    assert token_dtype(65537) == np.dtype("<u4")


# --------------------------------------------------------------------------- bad inputs


def _bad_inputs(folder: Path) -> dict[str, tuple[list[str], str]]:
    """Each case: the extra CLI flags and the text the one-line error must contain."""
    folder.mkdir()
    (folder / "empty1.txt").write_bytes(b"")
    (folder / "empty2.txt").write_bytes(b"")
    (folder / "latin1.txt").write_bytes("fine line\ncaf\xe9".encode("latin-1"))
    (folder / "badjson.jsonl").write_text('{"text": "ok"}\n{"text": "broken"\n')
    (folder / "nofield.jsonl").write_text('{"text": "ok"}\n{"body": "where is text?"}\n')
    (folder / "notstr.jsonl").write_text('{"text": "ok"}\n{"text": 42}\n')
    (folder / "notobj.jsonl").write_text('{"text": "ok"}\n["text"]\n')
    (folder / "one.txt").write_text("a single document")
    (folder / "notes.md").write_text("# not a document type")
    write_tiktoken(folder / "fake.tiktoken", [b"th", b"the"])
    d = str(folder)
    return {
        "glob matches nothing": (["--input", f"{d}/nothing/*.txt"], "matched no files"),
        "missing file": (["--input", f"{d}/missing.txt"], "no such file"),
        "empty corpus": (["--input", f"{d}/empty*.txt"], "empty corpus"),
        "not UTF-8": (["--input", f"{d}/latin1.txt"], "latin1.txt:2: not UTF-8"),
        "jsonl not JSON": (["--input", f"{d}/badjson.jsonl"], "badjson.jsonl:2: not valid JSON"),
        "jsonl no field": (["--input", f"{d}/nofield.jsonl"], "nofield.jsonl:2: no field 'text'"),
        "jsonl not str": (["--input", f"{d}/notstr.jsonl"], "notstr.jsonl:2: field 'text' is int"),
        "jsonl not obj": (["--input", f"{d}/notobj.jsonl"], "notobj.jsonl:2: expected a JSON obj"),
        "one document": (["--input", f"{d}/one.txt"], "at least 2"),
        "unsupported type": (["--input", f"{d}/*.md"], "unsupported input type"),
        "vocab too small": (["--vocab_size", "100"], "data.vocab_size"),
        "val fraction": (["--val_fraction", "1.5"], "data.val_fraction"),
        "no tiktoken file": (
            ["--tokenizer", "gpt2", "--tiktoken_file", f"{d}/none.tiktoken"],
            "not found",
        ),
        "wrong tiktoken file": (
            ["--tokenizer", "gpt2", "--tiktoken_file", f"{d}/fake.tiktoken"],
            "not tiktoken's r50k_base",
        ),
    }


def test_every_bad_input_is_one_line_exit_2_and_leaves_prior_outputs(
    prior, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target, params, before = prior
    cases = _bad_inputs(tmp_path / "bad")
    for name, (flags, expected) in cases.items():
        code, _out, err = run_cli(["--params", str(params), "--no-progress", *flags], capsys)
        assert code == USER_ERROR_EXIT_CODE, name
        assert err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert expected in err, (name, err)
        assert snapshot(target) == before, name
        assert leftovers(target) == [], name


def test_bpe_vocab_floor_is_checked_by_the_tokenizer_too() -> None:
    check_bpe_vocab_size(257)
    with pytest.raises(ConfigError, match="at least 257"):
        check_bpe_vocab_size(256)


def test_refuses_to_replace_a_folder_that_is_not_prepared_data(
    small_prepared, tmp_path: Path
) -> None:
    root, _, _ = small_prepared
    keep = tmp_path / "data"
    keep.mkdir()
    (keep / "precious.txt").write_text("not prepared data")
    config = make_config(keep, source="files", inputs=[str(root / "docs" / "*.txt")])
    with pytest.raises(DataError, match="refusing to replace"):
        prepare_data(config, progress=False)
    assert snapshot(keep) == {"precious.txt": b"not prepared data"}


def test_inputs_without_source_files_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"data\.source is 'shakespeare'"):
        read_corpus(DataConfig(inputs=["x/*.txt"]))
    with pytest.raises(ConfigError, match=r"data\.inputs: empty"):
        read_corpus(DataConfig(source="files"))


def test_stage_script_reports_errors_in_one_line(tmp_path: Path) -> None:
    params = write_params(tmp_path / "params.yaml", source="files", inputs=["nowhere/*.txt"])
    result = subprocess.run(
        [sys.executable, str(STAGE), "--params", str(params)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == USER_ERROR_EXIT_CODE
    assert result.stderr == "error: data.inputs: 'nowhere/*.txt': matched no files\n"
    assert not (tmp_path / "data").exists()  # nothing written


def test_killed_prepare_leaves_previous_outputs_and_next_run_cleans_up(
    prior, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target, params, before = prior
    default_params = write_params(
        tmp_path / "default.yaml", vocab_size=512, num_workers=1, prepared_dir=str(target)
    )
    process = subprocess.Popen(
        [sys.executable, str(STAGE), "--params", str(default_params), "--no-progress"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not leftovers(target) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "prepare finished before it could be interrupted"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert snapshot(target) == before
    assert leftovers(target) and leftovers(target)[0].startswith(".prepared.tmp-")

    code, _out, _ = run_cli(["--params", str(params), "--no-progress", "--seed", "3"], capsys)
    assert code == 0 and leftovers(target) == []
    assert load_meta(target).seed == 3


def test_group_command_runs_prepare(prior, capsys: pytest.CaptureFixture[str]) -> None:
    target, params, before = prior
    code, out, _err = run_cli(["prepare", "--params", str(params), "--no-progress"], capsys, cli)
    assert code == 0 and out.startswith("prepared 12 documents")
    assert snapshot(target) == before  # same inputs, same seed: the same bytes


# --------------------------------------------------------------------------- readers


def test_readers_turn_damage_into_clear_errors(prior) -> None:
    target, _, _ = prior
    meta = load_meta(target)
    assert open_tokens(target, "val").dtype == np.dtype("<u2")
    with pytest.raises(DataError, match="no split 'test'"):
        open_tokens(target, "test")

    train = target / "train.bin"
    data = train.read_bytes()
    train.write_bytes(data[:-1])
    with pytest.raises(DataError, match="not a whole number of uint16 tokens"):
        open_tokens(target, "train")
    train.write_bytes(data[:-2])
    with pytest.raises(DataError, match=f"but meta.json says {meta.splits['train'].tokens}"):
        open_tokens(target, "train")
    train.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(DataError, match=r"train\.bin: sha256 differs"):
        verify_prepared(target)

    (target / "meta.json").write_text('{"format_version": 1')
    with pytest.raises(DataError, match="corrupt"):
        load_meta(target)
    (target / "meta.json").unlink()
    with pytest.raises(DataError, match="missing"):
        open_tokens(target, "train")
    with pytest.raises(DataError, match="no prepared data"):
        load_tokenizer(target.parent / "never-prepared")


# --------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def small_bpe(tmp_path_factory: pytest.TempPathFactory) -> BpeTokenizer:
    text = next(p for p in shakespeare_files() if p.name == "macbeth_gut.txt").read_text()
    return train_bpe([text[:40_000]], 400, tmp_path_factory.mktemp("bpe") / "tokenizer.json")


@pytest.fixture(scope="module")
def small_tiktoken(tmp_path_factory: pytest.TempPathFactory) -> TiktokenTokenizer:
    file = tmp_path_factory.mktemp("tiktoken") / "small.tiktoken"
    write_tiktoken(file, [b"th", b"the", b" t", b" the", b"in", b"ing", b"\n\n", b"  "])
    ranks = parse_tiktoken_ranks(file.read_bytes(), str(file))
    return TiktokenTokenizer(gpt2_style_encoding("small", ranks), file)


def test_registry_names_the_kinds() -> None:
    assert set(TOKENIZER_KINDS) == {"bpe", "gpt2"}
    assert tokenizer_kind("gpt2").filename == R50K_FILE
    with pytest.raises(ConfigError, match="known: bpe, gpt2"):
        tokenizer_kind("sentencepiece")


TRICKY = st.lists(
    st.sampled_from([*"ab \n\r\t'sd1.,!é日\u3000\u2028\x1c", "'ll", "\n\n", "  "]), max_size=40
).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=TRICKY, cut=st.integers(min_value=1, max_value=6))
def test_cutting_long_text_never_changes_the_ids(
    small_bpe: BpeTokenizer, small_tiktoken: TiktokenTokenizer, text: str, cut: int
) -> None:
    pieces = split_at_safe_boundaries(text, cut)
    assert "".join(pieces) == text
    for tokenizer in (small_bpe, small_tiktoken):
        # `encode` is exactly this loop over the pieces; compare it with the uncut text.
        cut_ids = [i for piece in pieces for i in tokenizer._encode_piece(piece)]
        assert cut_ids == tokenizer._encode_piece(text)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200))
def test_any_text_round_trips(
    small_bpe: BpeTokenizer, small_tiktoken: TiktokenTokenizer, text: str
) -> None:
    for tokenizer in (small_bpe, small_tiktoken):
        ids = tokenizer.encode(text)
        assert tokenizer.eot_id not in ids
        assert tokenizer.decode(ids) == text


def test_tiktoken_wrapper_on_a_local_file(small_tiktoken: TiktokenTokenizer) -> None:
    assert (small_tiktoken.kind, small_tiktoken.vocab_size, small_tiktoken.eot_id) == (
        "gpt2",
        265,
        264,
    )
    assert small_tiktoken.encode(" the") == [259]
    assert small_tiktoken.decode([*small_tiktoken.encode("in"), 264]) == "in" + EOT_TOKEN
    assert small_tiktoken.eot_id not in small_tiktoken.encode(EOT_TOKEN)
    with pytest.raises(DataError, match=r"bad\.tiktoken:2: not a \.tiktoken line"):
        parse_tiktoken_ranks(b"YQ== 0\nnot-base64!! 1\n", "bad.tiktoken")


def test_gpt2_without_its_file_says_how_to_provide_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    try:
        contents = fetch_r50k(None)  # a machine with network downloads it: also fine
    except DataError as exc:
        assert "data.tiktoken_file" in str(exc) and "r50k_base.tiktoken" in str(exc)
    else:
        assert len(contents) > 100_000


def test_gpt2_end_to_end_when_its_file_is_available(small_prepared, tmp_path: Path) -> None:
    try:
        contents = fetch_r50k(os.environ.get("R50K_TIKTOKEN_FILE"))
    except DataError as exc:
        pytest.skip(f"GPT-2's r50k_base.tiktoken is not available offline here: {exc}")
    file = tmp_path / "r50k_base.tiktoken"
    file.write_bytes(contents)
    root, _, _texts = small_prepared
    config = make_config(
        tmp_path / "prepared",
        tokenizer="gpt2",
        tiktoken_file=str(file),
        source="files",
        inputs=[str(root / "docs" / "*.txt")],
    )
    meta = prepare_data(config, progress=False).meta
    assert (meta.vocab_size, meta.eot_id, meta.dtype) == (50257, 50256, "uint16")
    tokenizer = load_tokenizer(tmp_path / "prepared")
    assert tokenizer.encode("Hello world") == [15496, 995]
    decoded = tokenizer.decode(open_tokens(tmp_path / "prepared", "train").tolist())
    assert decoded.count(EOT_TOKEN) == meta.splits["train"].documents
