"""Prepare at scale, on generated corpora: determinism whatever the workers or the shard layout,
mixtures with one shared tokenizer, a bounded tokenizer sample, bad input that leaves the
previous output alone, and peak memory that does not grow with the corpus."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config.loader import load_config
from pipeline.data.doc_keys import val_count
from pipeline.data.prepare import load_meta, open_stream, prepare_data, verify_prepared

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "one",
    "all",
    "we",
    "their",
    "king",
    "love",
    "night",
    "sword",
    "crown",
    "river",
    "stone",
    "ship",
    "star",
    "garden",
    "letter",
    "mother",
    "city",
    "winter",
]


def _document(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 300))) + rng.choice(
        ["", "\n", "\r\n", " é—ü"]
    )


def write_corpus(folder: Path, seed: int, gz_docs: int = 1500, parquet_docs: int = 800) -> Path:
    """Two .jsonl.gz files, one Parquet file with several row groups, two .txt files."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for part in range(2):
        with gzip.open(folder / f"web-{part}.jsonl.gz", "wt", encoding="utf-8") as handle:
            for _ in range(gz_docs):
                handle.write(json.dumps({"text": _document(rng), "id": rng.random()}) + "\n")
            handle.write(json.dumps({"text": ""}) + "\n")  # empty: skipped and counted
    texts = [_document(rng) for _ in range(parquet_docs)]
    pq.write_table(pa.table({"text": texts}), folder / "books.parquet", row_group_size=97)
    for name in ("a.txt", "b.txt"):
        (folder / name).write_text(_document(rng) * 3, encoding="utf-8")
    return folder


def one_source(corpus: Path, out: Path, **data: object) -> dict[str, object]:
    return {
        "data.sources": {},
        "data.source": "files",
        "data.inputs": [str(corpus / "*")],
        "data.vocab_size": 400,
        "data.val_fraction": 0.1,
        "data.prepared_dir": str(out),
        "data.work_dir": str(out.parent / "work"),
        **{f"data.{k}": v for k, v in data.items()},
    }


def _prepare(overrides: dict[str, object]) -> None:
    prepare_data(load_config(overrides=overrides), progress=False)


def _files(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), seed=3)


def test_same_bytes_whatever_workers_and_same_stream_whatever_layout(
    corpus: Path, tmp_path: Path
) -> None:
    small_tasks = {"task_bytes": 150_000, "shard_max_bytes": 64_000}
    _prepare(one_source(corpus, tmp_path / "w1" / "out", num_workers=1, **small_tasks))
    _prepare(one_source(corpus, tmp_path / "w2" / "out", num_workers=2, **small_tasks))
    _prepare(one_source(corpus, tmp_path / "big" / "out", num_workers=2))
    one, two, big = (tmp_path / d / "out" for d in ("w1", "w2", "big"))
    assert _files(one) == _files(two)  # byte-identical, meta.json included
    meta, big_meta = verify_prepared(one), verify_prepared(big)
    assert len(meta.splits["train"].shards) > 3 > len(big_meta.splits["train"].shards)
    for split in ("train", "val"):  # another layout, the very same token stream
        stream, reference = open_stream(one, split), open_stream(big, split)
        assert np.array_equal(stream[0 : len(stream)], reference[0 : len(reference)])
    documents = meta.splits["train"].documents + meta.splits["val"].documents
    assert meta.splits["val"].documents == val_count(documents, 0.1)
    assert meta.empty_documents_skipped == 2 and len(meta.inputs) == 5
    assert not (tmp_path / "w2" / "work").exists()  # scratch space cleared


def test_a_mixture_shares_one_tokenizer_and_prepares_sources_apart(
    tmp_path: Path,
) -> None:
    web = write_corpus(tmp_path / "raw" / "web", seed=1, parquet_docs=0)
    books = write_corpus(tmp_path / "raw" / "books", seed=2, gz_docs=0)
    for stray in (*web.glob("*.parquet"), *books.glob("*.jsonl.gz")):
        stray.unlink()
    sources = {
        "web": {"kind": "files", "inputs": [str(web / "*")], "text_field": "text", "weight": 3},
        "books": {"kind": "files", "inputs": [str(books / "*")], "text_field": "text"},
    }
    overrides = {
        "data.sources": sources,
        "data.vocab_size": 400,
        "data.prepared_dir": str(tmp_path / "prepared"),
        "data.tokenizer_dir": str(tmp_path / "tokenizer"),
        "data.work_dir": str(tmp_path / "work"),
    }
    config = load_config(overrides=overrides)
    summaries = prepare_data(config, progress=False)
    assert [s.meta.source for s in summaries] == ["web", "books"]
    web_meta, books_meta = (load_meta(tmp_path / "prepared" / n) for n in ("web", "books"))
    shared = json.loads((tmp_path / "tokenizer" / "tokenizer_meta.json").read_text())
    for meta in (web_meta, books_meta):
        assert meta.outputs["tokenizer.json"] == shared["sha256"]  # one vocabulary for all
    before = _files(tmp_path / "prepared" / "web")

    # The DVC stages' way: tokenizer, then one source at a time; same bytes.
    (books / "extra.txt").write_text("a new book " * 50, encoding="utf-8")
    prepare_data(config, progress=False, source="books")
    assert _files(tmp_path / "prepared" / "web") == before  # the other source untouched
    assert (
        load_meta(tmp_path / "prepared" / "books").splits["train"].documents
        + load_meta(tmp_path / "prepared" / "books").splits["val"].documents
        == books_meta.splits["train"].documents + books_meta.splits["val"].documents + 1
    )


def test_the_bpe_learns_from_a_bounded_seeded_sample(corpus: Path, tmp_path: Path) -> None:
    limit = 120_000
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        overrides = one_source(corpus, tmp_path / name / "out", tokenizer_sample_bytes=limit)
        prepare_data(load_config(overrides={**overrides, "seed": seed}), progress=False)
        runs[name] = load_meta(tmp_path / name / "out")
    sample = runs["a"].tokenizer_sample
    assert sample is not None and 0.8 * limit < sample.text_bytes <= limit
    assert sample.text_bytes < runs["a"].splits["train"].text_bytes / 3
    assert runs["a"].outputs == runs["b"].outputs  # same seed, same sample, same bytes
    assert runs["c"].outputs["tokenizer.json"] != runs["a"].outputs["tokenizer.json"]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run(
        [sys.executable, "-c", "from pipeline.cli import main; main()", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )


def test_a_broken_file_is_one_line_exit_2_and_the_previous_output_stays(
    corpus: Path, tmp_path: Path
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for item in corpus.iterdir():
        (inputs / item.name).write_bytes(item.read_bytes())
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"vocab_size": 300, "num_workers": 2}}))
    ok = _cli(
        ["prepare", "--params", str(params), "--input", "inputs/*", "--no-progress"], tmp_path
    )
    assert ok.returncode == 0, ok.stderr
    before = _files(tmp_path / "data" / "prepared")

    good = (inputs / "web-1.jsonl.gz").read_bytes()
    (inputs / "web-1.jsonl.gz").write_bytes(good[: len(good) // 2])  # a cut gzip stream
    bad = _cli(
        ["prepare", "--params", str(params), "--input", "inputs/*", "--no-progress"], tmp_path
    )
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "web-1.jsonl.gz" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
    assert _files(tmp_path / "data" / "prepared") == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["prepared"]


PEAK_RSS = """
import resource, sys
from pipeline.cli import main
try:
    main()
finally:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print("PEAK_KB", max(own, children), file=sys.stderr)
"""


def _write_gz_corpus(folder: Path, megabytes: int, seed: int) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    written, part = 0, 0
    while written < megabytes * 1_000_000:
        with gzip.open(folder / f"part-{part:03d}.jsonl.gz", "wt", encoding="utf-8") as handle:
            for _ in range(2000):
                line = json.dumps({"text": _document(rng)}) + "\n"
                handle.write(line)
                written += len(line)
        part += 1


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path: Path) -> None:
    peaks = {}
    for megabytes in (6, 24):
        root = tmp_path / f"c{megabytes}"
        _write_gz_corpus(root / "corpus", megabytes, seed=megabytes)
        params = root / "params.yaml"
        data = {"vocab_size": 300, "tokenizer_sample_bytes": 3_000_000, "task_bytes": 1_000_000}
        params.write_text(yaml.safe_dump({"data": data}))
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        args = ["prepare", "--params", str(params), "--input", "corpus/*", "--no-progress"]
        proc = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, *args],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        peaks[megabytes] = int(proc.stderr.split("PEAK_KB")[1].split()[0]) / 1024
    # 4x the text, about the same peak (the old prepare grew by ~2.3 bytes per byte of text)
    assert peaks[24] < peaks[6] * 1.15 + 20, peaks


def test_ctrl_c_during_a_run_ends_it_and_keeps_the_previous_output(
    corpus: Path, tmp_path: Path
) -> None:
    """A terminal's Ctrl-C reaches the whole process group, workers included: prepare must end
    (a worker dying inside the pool's queue lock once hung it) and leave the old data."""
    params = tmp_path / "params.yaml"
    data = {"vocab_size": 2000, "num_workers": 2, "task_bytes": 200_000}
    params.write_text(yaml.safe_dump({"data": data}))
    args = ["prepare", "--params", str(params), "--input", f"{corpus}/*", "--no-progress"]
    assert _cli(args, tmp_path).returncode == 0
    before = _files(tmp_path / "data" / "prepared")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    # As from a terminal: Ctrl-C raises KeyboardInterrupt. A suite started in the background by
    # a non-interactive shell (as CI may be) ignores SIGINT, and children inherit that.
    interactive = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)"
    process = subprocess.Popen(
        [sys.executable, "-c", f"{interactive}; from pipeline.cli import main; main()", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    data = tmp_path / "data"
    try:
        while process.poll() is None and not any(data.glob(".prepare_work/run-*/*/sample")):
            time.sleep(0.01)  # until the sample pass has begun (the BPE is about to train)
        # Freeze the whole group there, then check that it is still mid-run (its output not yet
        # committed): a Ctrl-C that lands after the commit, in the exit, could not fail it.
        os.killpg(process.pid, signal.SIGSTOP)
        assert process.poll() is None, "prepare ended before it could be interrupted"
        assert list(data.glob(".prepared.tmp-*")), "prepare committed before it was interrupted"
        os.killpg(process.pid, signal.SIGINT)  # pending until the group runs again
        os.killpg(process.pid, signal.SIGCONT)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0
    assert _files(tmp_path / "data" / "prepared") == before


def test_an_input_changed_between_passes_is_an_error_not_silent_data(tmp_path: Path) -> None:
    """The scan decided the split from the text it read; encode must not write other text."""
    from pipeline.data.inputs import plan_tasks, source_inputs
    from pipeline.data.phases import Cuts, PhaseJob
    from pipeline.data.sources import data_sources
    from pipeline.errors import DataError

    corpus = tmp_path / "in.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"doc {i} " * 20}) + "\n" for i in range(20)))
    config = load_config(overrides=one_source(tmp_path, tmp_path / "out"))
    config.data.inputs = [str(corpus)]
    (spec,) = data_sources(config.data)
    inputs = tuple(source_inputs(spec))
    tasks = tuple(plan_tasks(inputs, 1 << 20))
    work = tmp_path / "work"
    scan = PhaseJob("scan", tasks, inputs, "text", 1, str(work))
    scan(0)
    corpus.write_text(corpus.read_text().replace("doc 7 ", "doc 8 "))  # same count, other text
    (tmp_path / "out").mkdir()
    encode = PhaseJob(
        "encode", tasks, inputs, "text", 1, str(work),
        cuts=Cuts((0,), (0, -1), None), tokenizer_kind="bpe", out_dir=str(tmp_path / "out"),
        tokenizer_dir=str(_tiny_tokenizer(tmp_path)),
    )  # fmt: skip
    with pytest.raises(DataError, match=r"in\.jsonl:8: the input changed while preparing"):
        encode(0)


def _tiny_tokenizer(tmp_path: Path) -> Path:
    from pipeline.data.tokenizer import train_bpe

    folder = tmp_path / "tok"
    folder.mkdir()
    train_bpe(["doc a b c"], 300, folder / "tokenizer.json")
    return folder


def test_folders_that_overlap_or_hold_the_inputs_are_refused(corpus: Path, tmp_path: Path) -> None:
    from pipeline.errors import ConfigError, DataError

    sources = {"web": {"kind": "files", "inputs": [str(corpus / "*")], "text_field": "text"}}
    with pytest.raises(ConfigError, match="overlap; prepare replaces these folders whole"):
        load_config(overrides={"data.sources": sources, "data.tokenizer_dir": "data/prepared/web"})
    out = tmp_path / "out"
    _prepare(one_source(corpus, out))  # earlier prepared data, then an input copied into it
    (out / "mine.txt").write_text("a document that lives in the output folder " * 20)
    before = _files(out)
    with pytest.raises(DataError, match="an input inside the prepared folder"):
        _prepare(
            {**one_source(corpus, out), "data.inputs": [str(corpus / "*"), str(out / "*.txt")]}
        )
    assert _files(out) == before


def test_a_symlinked_prepared_folder_is_written_where_it_points(
    corpus: Path, tmp_path: Path
) -> None:
    real = tmp_path / "bigdisk" / "prepared"
    real.mkdir(parents=True)
    link = tmp_path / "data" / "prepared"
    link.parent.mkdir()
    link.symlink_to(real)
    for _ in range(2):  # a first run and a replacement
        _prepare({**one_source(corpus, link), "data.work_dir": str(tmp_path / "work")})
    assert link.is_symlink() and (real / "meta.json").is_file()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["prepared"]


def test_a_source_needs_the_tokenizer_built_with_its_settings(tmp_path: Path) -> None:
    from pipeline.errors import DataError

    web = write_corpus(tmp_path / "raw", seed=4)
    sources = {"web": {"kind": "files", "inputs": [str(web / "*")], "text_field": "text"}}
    overrides = {
        "data.sources": sources,
        "data.vocab_size": 300,
        "data.prepared_dir": str(tmp_path / "prepared"),
        "data.tokenizer_dir": str(tmp_path / "tokenizer"),
        "data.work_dir": str(tmp_path / "work"),
    }
    prepare_data(load_config(overrides=overrides), progress=False, tokenizer_only=True)
    changed = load_config(overrides={**overrides, "data.vocab_size": 400, "seed": 9})
    with pytest.raises(DataError, match=r"built with seed 1337, vocab_size 300, not this"):
        prepare_data(changed, progress=False, source="web")
    assert not (tmp_path / "prepared").exists()
