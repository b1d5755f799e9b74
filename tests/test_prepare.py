"""The prepare stage, end to end on real files with real tokenizers (no mocks).

Covers: the default corpus and user txt/jsonl inputs, exact round trips, byte-identical reruns
(whatever the worker count), seeded splits (checked against the rule written out here),
every bad-input class (one line, exit 2, prior outputs untouched), an interrupted run, the
readers later stages use (sharded and format 1 folders), and the tokenizers. Generated corpora
at scale, other input formats and mixtures: tests/test_prepare_scale.py, tests/test_formats.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
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
from pipeline.config.loader import load_config
from pipeline.config.schema import Config, DataConfig
from pipeline.data.doc_keys import split_key, val_count
from pipeline.data.inputs import shakespeare_files
from pipeline.data.prepare import (
    SPLITS,
    PrepareSummary,
    load_meta,
    open_stream,
    open_tokens,
    prepare_data,
    token_dtype,
    verify_prepared,
)
from pipeline.data.prepared import data_hash
from pipeline.data.token_stream import TokenStream
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
    """One source; its scratch space beside the prepared folder (not in the repo's data/)."""
    work_dir = str(prepared_dir.parent / ".prepare_work")
    data = {"vocab_size": 300, "num_workers": 1, "work_dir": work_dir, **data}
    return Config(seed=seed, data=DataConfig(prepared_dir=str(prepared_dir), **data))


def prepare_one(config: Config) -> PrepareSummary:
    """Prepare a config of one source: exactly one summary comes back."""
    [summary] = prepare_data(config, progress=False)
    return summary


def expected_split(texts: list[str], seed: int, val_fraction: float) -> tuple[list[int], list[int]]:
    """The split rule written out, independently of the code: rank the documents by
    sha256(f"{seed}:{sha256 of the text}") (ties by corpus position) and send the first
    round(n * val_fraction) to val, at least one on each side. Both lists in corpus order.
    This is the rule of the in-memory split that the streaming prepare replaced."""

    def rank(i: int) -> tuple[bytes, int]:
        document = hashlib.sha256(texts[i].encode("utf-8")).hexdigest()
        return hashlib.sha256(f"{seed}:{document}".encode()).digest(), i

    val = set(sorted(range(len(texts)), key=rank)[: val_count(len(texts), val_fraction)])
    return [i for i in range(len(texts)) if i not in val], sorted(val)


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


def split_texts(folder: Path | str, split: str, eot_id: int, decode) -> list[str]:
    """A split's documents, decoded from its token stream (every shard)."""
    stream = open_stream(folder, split)
    return [decode(seg.tolist()) for seg in segments(stream[0 : len(stream)], eot_id)]


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
    return config, prepare_one(config), folder


@pytest.fixture(scope="module")
def small_prepared(tmp_path_factory: pytest.TempPathFactory):
    """A prepared folder from a small user corpus: the 'previous outputs' of the bad-input tests."""
    root = tmp_path_factory.mktemp("small")
    texts = write_small_corpus(root / "docs")
    folder = root / "prepared"
    config = make_config(folder, seed=7, source="files", inputs=[str(root / "docs" / "*.txt")])
    prepare_one(config)
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
    assert meta.format_version == 2
    assert set(meta.outputs) == {"tokenizer.json", "train-00000-000.bin", "val-00000-000.bin"}
    assert [s.file for s in meta.splits["train"].shards] == ["train-00000-000.bin"]
    assert verify_prepared(folder).data_hash == summary.meta.data_hash
    line = summary.line()
    assert line.startswith("prepared shakespeare: 42 documents (train 40, val 2)"), line
    assert "MB/s" in line and "in 2 shard(s)" in line
    # The BPE learned from the whole train split (it is far below the sample limit).
    texts = [by_name[Path(item.path).name].read_bytes().decode("utf-8") for item in meta.inputs]
    train_idx, val_idx = expected_split(texts, config.seed, config.data.val_fraction)
    assert meta.tokenizer_sample is not None
    assert meta.tokenizer_sample.documents == len(train_idx)
    assert meta.tokenizer_sample.text_bytes == meta.splits["train"].text_bytes

    tokenizer = load_tokenizer(folder)
    assert (tokenizer.kind, tokenizer.vocab_size, tokenizer.files) == (
        "bpe",
        512,
        (folder / "tokenizer.json",),
    )
    for split, idx in (("train", train_idx), ("val", val_idx)):
        tokens = open_tokens(folder, split)
        docs = [texts[i] for i in idx]
        assert len(tokens) == meta.splits[split].tokens
        assert int((tokens == tokenizer.eot_id).sum()) == len(docs)
        assert meta.splits[split].text_bytes == sum(len(d.encode("utf-8")) for d in docs)
        # The round trip: the token file decodes to exactly the text that went in.
        expected = "".join(doc + EOT_TOKEN for doc in docs)
        assert tokenizer.decode(tokens.tolist()) == expected


def test_rerun_with_same_seed_is_byte_identical_whatever_num_workers(
    shakespeare_prepared, tmp_path: Path
) -> None:
    _config, summary, folder = shakespeare_prepared
    again = tmp_path / "prepared"
    shutil.copytree(folder, again)  # rerun over earlier outputs, as `dvc repro` does
    rerun = make_config(again, vocab_size=512, num_workers=1, val_fraction=0.05)
    assert prepare_one(rerun).meta.data_hash == summary.meta.data_hash
    assert snapshot(again) == snapshot(folder)  # tokens, tokenizer and meta.json alike
    assert leftovers(again) == []
    assert not (tmp_path / ".prepare_work").exists()  # the scratch space is cleared


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
    assert out.startswith("prepared files: 7 documents") and "2 empty documents skipped" in out

    meta = load_meta("out/prepared")
    assert meta.source == "files" and meta.seed == 11 and meta.empty_documents_skipped == 2
    assert [item.path for item in meta.inputs] == [
        "docs/empty.txt",
        *(f"docs/plays/doc{i:02d}.txt" for i in range(4)),
        "docs/special.txt",
        "docs/sub/records.jsonl",
    ]
    expected_docs = [*texts, special, records[0]["body"], records[2]["body"]]
    train_idx, val_idx = expected_split(expected_docs, 11, meta.val_fraction)
    tokenizer = load_tokenizer("out/prepared")
    for split, idx in (("train", train_idx), ("val", val_idx)):
        decoded = split_texts("out/prepared", split, tokenizer.eot_id, tokenizer.decode)
        assert decoded == [expected_docs[i] for i in idx]
    assert not (tmp_path / "data" / ".prepare_work").exists()  # the default scratch space


def test_seed_decides_the_split_and_nothing_else_does(small_prepared, tmp_path: Path) -> None:
    root, _folder, texts = small_prepared
    files = sorted(str(p) for p in (root / "docs").glob("*.txt"))
    train, val = expected_split(texts, 7, 0.25)
    assert len(val) == 3 and sorted(train + val) == list(range(len(texts)))
    other_val = expected_split(texts, 8, 0.25)[1]
    assert other_val != val
    # The scan's split keys are that ranking's first 8 bytes (the position breaks ties).
    digest = hashlib.sha256(texts[0].encode()).hexdigest()
    assert (
        split_key(7, digest).to_bytes(8, "big")
        == hashlib.sha256(f"7:{digest}".encode()).digest()[:8]
    )

    def run(name: str, seed: int, inputs: list[str]) -> tuple[object, dict[str, list[str]]]:
        folder = tmp_path / name
        config = make_config(folder, seed=seed, val_fraction=0.25, source="files", inputs=inputs)
        meta = prepare_one(config).meta
        tokenizer = load_tokenizer(folder)
        docs = {s: split_texts(folder, s, tokenizer.eot_id, tokenizer.decode) for s in SPLITS}
        return meta, docs

    meta7, docs7 = run("p7", 7, [str(root / "docs" / "*.txt")])
    assert docs7 == {"train": [texts[i] for i in train], "val": [texts[i] for i in val]}
    assert meta7.splits["val"].text_bytes == sum(len(texts[i].encode()) for i in val)
    # Reading the inputs in the opposite order keeps the same documents in val: the split
    # follows the texts, not the paths or their order.
    meta_reversed, docs_reversed = run("reversed", 7, files[::-1])
    assert docs_reversed["val"] == docs7["val"][::-1]
    assert meta_reversed.splits["val"].text_bytes == meta7.splits["val"].text_bytes

    meta8, docs8 = run("p8", 8, [str(root / "docs" / "*.txt")])
    assert meta8.seed == 8 and meta8.data_hash != meta7.data_hash
    assert docs8["val"] == [texts[i] for i in other_val]
    assert (tmp_path / "p7" / "val-00000-000.bin").read_bytes() != (
        tmp_path / "p8" / "val-00000-000.bin"
    ).read_bytes()
    assert meta8.splits["val"].text_bytes == sum(len(texts[i].encode()) for i in other_val)


def test_split_sizes(tmp_path: Path) -> None:
    assert val_count(42, 0.05) == 2
    assert val_count(3, 0.9) == 2  # train keeps at least one
    assert val_count(10, 0.01) == 1  # val gets at least one
    assert val_count(2, 0.01) == val_count(2, 0.99) == 1
    assert val_count(10, 0.25) == 3 and val_count(10, 0.35) == 4  # round half up
    (tmp_path / "one.txt").write_text("a single document")
    config = make_config(tmp_path / "prepared", source="files", inputs=[str(tmp_path / "*.txt")])
    with pytest.raises(DataError, match="at least 2"):
        prepare_data(config, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.txt"]


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
        "jsonl not str": (
            ["--input", f"{d}/notstr.jsonl"],
            "notstr.jsonl:2: field 'text' is number, not a string",
        ),
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


MESSAGE_REGRESSIONS = {"empty corpus"}
"""Cases whose message lost what it said before the streaming prepare: checked on their own
in `test_messages_that_regressed`, which is expected to fail until the message is mended."""


def test_every_bad_input_is_one_line_exit_2_and_leaves_prior_outputs(
    prior, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target, params, before = prior
    cases = _bad_inputs(tmp_path / "bad")
    for name, (flags, expected) in cases.items():
        code, _out, err = run_cli(["--params", str(params), "--no-progress", *flags], capsys)
        assert code == USER_ERROR_EXIT_CODE, name
        assert err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert name in MESSAGE_REGRESSIONS or expected in err, (name, err)
        assert snapshot(target) == before, name
        assert leftovers(target) == [], name
    assert not (tmp_path / "data" / ".prepare_work").exists()  # no scratch left either


def test_messages_that_regressed(prior, tmp_path: Path, capsys) -> None:
    _target, params, _before = prior
    cases = _bad_inputs(tmp_path / "bad")
    for name in sorted(MESSAGE_REGRESSIONS):
        flags, expected = cases[name]
        _code, _out, err = run_cli(["--params", str(params), "--no-progress", *flags], capsys)
        assert expected in err, (name, err)


def test_bad_input_met_by_a_worker_process_is_one_line_too(
    prior, small_prepared, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Several tasks on two spawned workers: the worker's error reaches the user as is."""
    target, _params, before = prior
    root, _, _ = small_prepared
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "zz-latin1.txt").write_bytes("fine line\ncaf\xe9".encode("latin-1"))
    params = write_params(
        tmp_path / "workers.yaml",
        source="files",
        inputs=[str(root / "docs" / "*.txt"), str(tmp_path / "bad" / "*.txt")],
        vocab_size=300,
        num_workers=2,
        task_bytes=4096,  # one task per file
        prepared_dir=str(target),
    )
    code, _out, err = run_cli(["--params", str(params), "--no-progress"], capsys)
    assert code == USER_ERROR_EXIT_CODE
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "zz-latin1.txt:2: not UTF-8" in err and "Traceback" not in err, err
    assert snapshot(target) == before and leftovers(target) == []
    assert not (tmp_path / "data" / ".prepare_work").exists()


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


def test_inputs_without_source_files_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked when prepare resolves the inputs (training never reads them)."""
    inputs_only = write_params(tmp_path / "a.yaml", inputs=["x/*.txt"])
    code, _out, err = run_cli(["--params", str(inputs_only), "--no-progress"], capsys)
    assert code == USER_ERROR_EXIT_CODE and err.count("\n") == 1, err
    assert "data.inputs: set, but data.source is 'shakespeare'" in err, err
    files_only = write_params(tmp_path / "b.yaml", source="files")
    code, _out, err = run_cli(["--params", str(files_only), "--no-progress"], capsys)
    assert code == USER_ERROR_EXIT_CODE and err.count("\n") == 1, err
    assert "data.inputs: empty, but data.source is 'files'" in err, err
    assert load_config(params_file=inputs_only).data.inputs == ["x/*.txt"]  # training may


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
    assert result.stderr == "error: data.inputs (files): 'nowhere/*.txt': matched no files\n"
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
    scratch = tmp_path / "data" / ".prepare_work" / f"run-{socket.gethostname()}-{process.pid}"
    assert scratch.is_dir()  # the killed run's scratch space (data.work_dir)

    code, _out, _ = run_cli(["--params", str(params), "--no-progress", "--seed", "3"], capsys)
    assert code == 0 and leftovers(target) == []
    assert load_meta(target).seed == 3
    assert verify_prepared(target).seed == 3


def test_next_run_clears_the_scratch_space_of_a_killed_run(
    prior, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a killed run leaves under data.work_dir, as the killed-prepare test above sees it."""
    _target, params, _before = prior
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    scratch = tmp_path / "data" / ".prepare_work" / f"run-{socket.gethostname()}-{dead.pid}"
    (scratch / "files" / "scan").mkdir(parents=True)
    (scratch / "files" / "scan" / "00000.keys").write_bytes(bytes(24))
    code, _out, _ = run_cli(["--params", str(params), "--no-progress"], capsys)
    assert code == 0
    assert not scratch.exists()


def test_group_command_runs_prepare(prior, capsys: pytest.CaptureFixture[str]) -> None:
    target, params, before = prior
    code, out, _err = run_cli(["prepare", "--params", str(params), "--no-progress"], capsys, cli)
    assert code == 0 and out.startswith("prepared files: 12 documents")
    assert snapshot(target) == before  # same inputs, same seed: the same bytes


# --------------------------------------------------------------------------- readers


def test_readers_turn_damage_into_clear_errors(prior) -> None:
    target, _, _ = prior
    meta = load_meta(target)
    assert open_tokens(target, "val").dtype == np.dtype("<u2")
    assert isinstance(open_tokens(target, "val"), np.memmap)  # one shard: the map itself
    with pytest.raises(DataError, match="no split 'test'"):
        open_tokens(target, "test")

    train = target / "train-00000-000.bin"
    data = train.read_bytes()
    train.write_bytes(data[:-1])
    with pytest.raises(DataError, match="not a whole number of uint16 tokens"):
        open_tokens(target, "train")
    train.write_bytes(data[:-2])
    with pytest.raises(DataError, match=f"but meta.json says {meta.splits['train'].tokens}"):
        open_tokens(target, "train")
    train.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(DataError, match=r"train-00000-000\.bin: sha256 differs"):
        verify_prepared(target)
    train.unlink()
    with pytest.raises(DataError, match=r"train-00000-000\.bin: token file missing"):
        open_tokens(target, "train")

    (target / "meta.json").write_text('{"format_version": 1')
    with pytest.raises(DataError, match="corrupt"):
        load_meta(target)
    (target / "meta.json").unlink()
    with pytest.raises(DataError, match="missing"):
        open_tokens(target, "train")
    with pytest.raises(DataError, match="no prepared data"):
        load_tokenizer(target.parent / "never-prepared")


def test_several_shards_read_as_one_stream(small_prepared, prior, tmp_path: Path) -> None:
    root, _, _ = small_prepared
    one, _, _ = prior  # the same corpus and seed in one shard per split
    folder = tmp_path / "sharded"
    config = make_config(
        folder, seed=7, source="files", inputs=[str(root / "docs" / "*.txt")], shard_max_bytes=4096
    )
    meta = prepare_one(config).meta
    shards = meta.splits["train"].shards
    assert len(shards) > 2 and [s.file for s in shards[:2]] == [
        "train-00000-000.bin",
        "train-00000-001.bin",
    ]
    assert all(s.tokens == 2048 for s in shards[:-1])  # 4096 bytes of uint16 ids
    assert set(meta.outputs) == {"tokenizer.json", *(s.file for s in shards)} | {
        s.file for s in meta.splits["val"].shards
    }
    stream = open_tokens(folder, "train")
    reference = np.asarray(open_tokens(one, "train"))
    assert isinstance(stream, TokenStream) and len(stream) == len(reference)
    assert np.array_equal(stream[0 : len(stream)], reference)  # the same stream, cut
    assert np.array_equal(stream[2040:2060], reference[2040:2060])  # across a cut
    assert stream[2048] == reference[2048] and stream[-1] == reference[-1]
    assert verify_prepared(folder).data_hash == meta.data_hash != load_meta(one).data_hash
    (folder / shards[1].file).unlink()
    with pytest.raises(DataError, match=r"train-00000-001\.bin: token file missing"):
        open_tokens(folder, "train")


def test_format_1_folders_are_still_read(prior) -> None:
    """Folders prepared before sharding: one `<split>.bin` named by `file` in meta.json."""
    target, _, _ = prior
    meta = json.loads((target / "meta.json").read_text())
    meta["format_version"] = 1
    for key in ("tokenizer_sample", "task_bytes"):
        meta.pop(key)
    for split in SPLITS:
        [shard] = meta["splits"][split].pop("shards")
        (target / shard["file"]).rename(target / f"{split}.bin")
        meta["splits"][split]["file"] = f"{split}.bin"
        meta["outputs"][f"{split}.bin"] = meta["outputs"].pop(shard["file"])
    keys = ("dtype", "vocab_size", "eot_id")
    meta["data_hash"] = data_hash(*(meta[k] for k in keys), "bpe", meta["outputs"])
    (target / "meta.json").write_text(json.dumps(meta))
    loaded = verify_prepared(target)
    assert loaded.format_version == 1 and loaded.splits["train"].shards[0].file == "train.bin"
    assert loaded.data_hash == meta["data_hash"]  # as checkpoints recorded it
    tokens = open_tokens(target, "train")
    assert isinstance(tokens, np.memmap) and len(tokens) == loaded.splits["train"].tokens
    tokenizer = load_tokenizer(target)
    assert tokenizer.decode(tokens.tolist()).count(EOT_TOKEN) == loaded.splits["train"].documents


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
    meta = prepare_one(config).meta
    assert (meta.vocab_size, meta.eot_id, meta.dtype) == (50257, 50256, "uint16")
    tokenizer = load_tokenizer(tmp_path / "prepared")
    assert tokenizer.encode("Hello world") == [15496, 995]
    decoded = tokenizer.decode(open_tokens(tmp_path / "prepared", "train").tolist())
    assert decoded.count(EOT_TOKEN) == meta.splits["train"].documents
