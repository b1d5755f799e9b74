"""Throughput and peak memory of the prepare stage, per input format and tokenizer.

Settings come from params.yaml (seed, val_fraction, ...) with the flags below on top. The default
corpus (Shakespeare, about 5 MB; --copies of it) is cut into documents of about --doc_kb KB and
written in each input format (.txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet), in --parts files
with data.task_bytes set for about as many tasks, so that every worker has work. Each run
prepares one format with one tokenizer end to end in a fresh process, at num_workers 1 and 2,
and prints:
- MB/s of text per core (text MB / seconds / workers), end to end and for the encode pass alone
  (the tokenizer-bound pass; scan and sample are shown in seconds, and so is the serial rest:
  the BPE's training, choosing the split, meta.json), and the 1->2 workers scaling efficiency
  t1 / (2 * t2). Every pass starts its own pool of spawned workers; the header says what that
  costs here, which small corpora feel;
- peak RSS. main: the main process's ru_maxrss. worker: the largest worker's peak (VmHWM, read
  every 20 ms); not RUSAGE_CHILDREN, since a spawned worker's ru_maxrss starts at its parent's
  RSS (fork, then exec) and says nothing of its own. tree: the largest sum of RSS over the main
  process and its workers (read every 20 ms; shared pages count once per process).
After the table, for each tokenizer: encoding speed in one process through the pipeline's
tokenizer and, for gpt2, tiktoken's own `encode_ordinary_batch` on the same text, the ceiling.
gpt2 runs when GPT-2's r50k_base.tiktoken is found (--tiktoken_file, $TIKTOKEN_FILE or
tiktoken's cache; nothing is downloaded); otherwise a line says it is skipped.

--sizes 0.3,1,3 instead prepares generated corpora of that many GB of text each (.jsonl.gz files
of --file_mb MB; seeded word-like text written to a temporary folder as it is generated, so the
generator stays small), with params.yaml's task_bytes, tokenizer_sample_bytes, shard_max_bytes
(or --task_mb) and --num_workers, and prints the peak RSS per size: it should stay flat as the
corpus grows. task_bytes counts bytes on disk: a task of gzip'd JSONL holds ~2.5x more text.
Each corpus is deleted before the next is written; --tmp_dir needs room for the largest.

    .venv/bin/python bench/prepare.py [--vocab_size 4096] [--copies 4] [--tiktoken_file F]
    .venv/bin/python bench/prepare.py --sizes 0.3,1,3 [--num_workers 2] [--tmp_dir /scratch]
"""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config.loader import load_config
from pipeline.data.inputs import shakespeare_files
from pipeline.data.tokenizer import (
    R50K_URL,
    TOKENIZER_KINDS,
    Tokenizer,
    fetch_r50k,
    gpt2_style_encoding,
    load_tokenizer,
    parse_tiktoken_ranks,
)
from pipeline.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("txt", "jsonl", "jsonl.gz", "jsonl.zst", "parquet")
WORKERS = (1, 2)
SAMPLE_SECONDS = 0.02
MB = 1e6


# --------------------------------------------------------------------------- measuring one run


def _vm_hwm(pid: int) -> int:
    """Peak RSS of a process so far, in bytes (Linux's VmHWM); 0 when unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeMemory(threading.Thread):
    """Reads the RSS of this process and its descendants every SAMPLE_SECONDS."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.tree_peak = 0
        self.worker_peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self._done.wait(SAMPLE_SECONDS):
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    continue
                if process.pid != me.pid:
                    self.worker_peak = max(self.worker_peak, _vm_hwm(process.pid))
            self.tree_peak = max(self.tree_peak, total)

    def stop(self) -> None:
        self._done.set()
        self.join()


def child_main(overrides: dict[str, object]) -> None:
    """Run one prepare in this process; print its figures as one JSON line."""
    import resource

    import pipeline.data.prepare as stage

    phase_seconds: dict[str, float] = defaultdict(float)
    tasks: dict[str, int] = {}
    run_phase = stage.run_phase

    def timed_phase(job, *args, **kwargs):  # stage.run_phase, timed
        started = time.perf_counter()
        try:
            return run_phase(job, *args, **kwargs)
        finally:
            phase_seconds[job.phase] += time.perf_counter() - started
            tasks[job.phase] = len(job.tasks)

    stage.run_phase = timed_phase
    config = load_config(params_file="params.yaml", overrides=overrides)
    memory = TreeMemory()
    memory.start()
    started = time.perf_counter()
    [summary] = stage.prepare_data(config, progress=False)
    seconds = time.perf_counter() - started
    memory.stop()
    main_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "seconds": seconds,
        "phase_seconds": dict(phase_seconds),
        "tasks": tasks.get("encode", 0),
        "text_bytes": summary.text_bytes,
        "tokens": summary.tokens,
        "documents": summary.documents,
        "vocab_size": summary.meta.vocab_size,
        "main_peak": main_peak,
        "worker_peak": memory.worker_peak,
        "tree_peak": max(memory.tree_peak, main_peak),
    }
    print(json.dumps(result))


def measure(overrides: dict[str, object]) -> dict[str, object]:
    """One prepare in a fresh process (this file with --child): its figures, or its error."""
    command = [sys.executable, __file__, "--child", json.dumps(overrides)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        return {"error": lines[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_overrides(
    inputs: str, folder: Path, kind: str, workers: int, settings: dict[str, object]
) -> dict[str, object]:
    """One source from `inputs`, prepared into `folder` (scratch beside it)."""
    return {
        "data.sources": {},
        "data.source": "files",
        "data.inputs": [inputs],
        "data.tokenizer": kind,
        "data.num_workers": workers,
        "data.prepared_dir": str(folder),
        "data.work_dir": str(folder.parent / f".work-{folder.name}"),
        **{f"data.{key}": value for key, value in settings.items()},
    }


def mb(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB" if value else "-"


# --------------------------------------------------------------------------- inputs


def shakespeare_documents(doc_kb: int) -> list[str]:
    """The default corpus, each work cut at line ends into documents of about `doc_kb` KB."""
    documents = []
    for file in shakespeare_files():
        current: list[str] = []
        size = 0
        for line in file.read_bytes().decode("utf-8").splitlines(keepends=True):
            current.append(line)
            size += len(line)
            if size >= doc_kb * 1000:
                documents.append("".join(current))
                current, size = [], 0
        if current:
            documents.append("".join(current))
    return documents


def write_format(fmt: str, documents: list[str], folder: Path, parts: int) -> str:
    """`documents` in `parts` files of format `fmt` under `folder`; returns their glob."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    folder.mkdir(parents=True)
    if fmt == "txt":
        for number, text in enumerate(documents):
            (folder / f"doc-{number:05d}.txt").write_bytes(text.encode("utf-8"))
        return str(folder / "*.txt")
    per_part = -(-len(documents) // parts)
    for part in range(parts):
        chunk = documents[part * per_part : (part + 1) * per_part]
        path = folder / f"part-{part:02d}.{fmt}"
        if fmt == "parquet":
            pq.write_table(pa.table({"text": chunk}), path, row_group_size=64)
            continue
        data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in chunk).encode()
        if fmt == "jsonl.gz":
            data = gzip.compress(data, compresslevel=6, mtime=0)
        elif fmt == "jsonl.zst":
            data = zstandard.ZstdCompressor(level=3).compress(data)
        path.write_bytes(data)
    return str(folder / f"*.{fmt}")


def find_r50k(tiktoken_file: str | None) -> tuple[str | None, str]:
    """GPT-2's r50k_base.tiktoken from the flag, $TIKTOKEN_FILE or tiktoken's cache: (its path,
    or None and what was looked at). Never downloads; a file must match r50k_base's sha256."""
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get(
        "DATA_GYM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "data-gym-cache")
    )
    cached = os.path.join(cache_dir, hashlib.sha1(R50K_URL.encode()).hexdigest())
    looked = []
    for candidate in (tiktoken_file, os.environ.get("TIKTOKEN_FILE"), cached):
        if not candidate:
            continue
        path = Path(candidate).expanduser()
        if not path.is_file():
            looked.append(f"{path} (missing)")
            continue
        try:
            fetch_r50k(str(path))
        except UserError:
            looked.append(f"{path} (not r50k_base)")
            continue
        return str(path), ""
    return None, ", ".join(looked)


# --------------------------------------------------------------------------- encoding speed


def encode_speed(tokenizer: Tokenizer, texts: list[str], repeat: int) -> tuple[int, float]:
    """(tokens, best seconds) to encode every text in this process."""
    best = float("inf")
    tokens = 0
    for _ in range(repeat):
        started = time.perf_counter()
        tokens = sum(len(tokenizer.encode(text)) for text in texts)
        best = min(best, time.perf_counter() - started)
    return tokens, best


def tiktoken_ceiling(r50k: str, texts: list[str], repeat: int) -> str:
    """tiktoken's own batch encoder on the same texts, at 1 and 2 threads."""
    contents = Path(r50k).read_bytes()
    encoding = gpt2_style_encoding("r50k_base", parse_tiktoken_ranks(contents, r50k))
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / MB
    figures = []
    for threads in WORKERS:
        best = float("inf")
        for _ in range(repeat):
            started = time.perf_counter()
            encoding.encode_ordinary_batch(texts, num_threads=threads)
            best = min(best, time.perf_counter() - started)
        figures.append(f"{megabytes / best / threads:6.2f} MB/s/core at {threads} thread(s)")
    return "tiktoken encode_ordinary_batch (the ceiling): " + ", ".join(figures)


# --------------------------------------------------------------------------- the format table


HEADER = (
    f"{'format':10s} {'tok':4s} {'workers':>7s} {'tasks':>5s} {'seconds':>8s} {'MB/s/core':>9s} "
    f"{'encode MB/s/core':>16s} {'scan+sample s':>13s} {'serial s':>8s} "
    f"{'RSS main':>9s} {'worker':>8s} {'tree':>8s}"
)
"""Per run: end to end (MB/s/core = text MB / seconds / workers), the encode pass alone, the
scan and sample passes, the rest (serial: the BPE's training, choosing the split, meta.json)."""


def table_row(fmt: str, kind: str, workers: int, result: dict) -> str:
    if "error" in result:
        return f"{fmt:10s} {kind:4s} {workers:7d} failed: {result['error']}"
    text_mb = result["text_bytes"] / MB
    phases = result["phase_seconds"]
    scan_sample = phases.get("scan", 0.0) + phases.get("sample", 0.0)
    serial = result["seconds"] - sum(phases.values())
    return (
        f"{fmt:10s} {kind:4s} {workers:7d} {result['tasks']:5d} {result['seconds']:8.2f} "
        f"{text_mb / result['seconds'] / workers:9.2f} "
        f"{text_mb / phases['encode'] / workers:16.2f} {scan_sample:13.2f} {serial:8.2f} "
        f"{mb(result['main_peak']):>9s} {mb(result['worker_peak']):>8s} "
        f"{mb(result['tree_peak']):>8s}"
    )


def scaling_row(kind: str, one: dict, two: dict) -> str:
    """Efficiency t1 / (2 * t2): 100% is twice as fast on two workers."""
    if "error" in one or "error" in two:
        return f"{'':10s} {kind:4s} scaling 1->2 workers: -"
    end_to_end = one["seconds"] / (2 * two["seconds"])
    encode = one["phase_seconds"]["encode"] / (2 * two["phase_seconds"]["encode"])
    return (
        f"{'':10s} {kind:4s} scaling 1->2 workers: end to end {end_to_end:.0%}, "
        f"encode pass {encode:.0%}"
    )


def _import_worker(_: int) -> None:
    import pipeline.data.phases  # noqa: F401 -- what a prepare worker imports first


def pool_start_seconds() -> float:
    """Seconds to start a spawned pool like a pass's and import the worker's modules."""
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(max(WORKERS)) as pool:
        pool.map(_import_worker, range(max(WORKERS)))
    return time.perf_counter() - started


def bench_formats(
    root: Path,
    kinds: list[str],
    settings: dict[str, object],
    doc_kb: int,
    parts: int,
    copies: int,
    repeat: int,
) -> None:
    unique = shakespeare_documents(doc_kb)
    documents = unique * copies
    text_bytes = sum(len(d.encode("utf-8")) for d in documents)
    click.echo(
        f"corpus: the default corpus x{copies}, {len(documents)} documents of about {doc_kb} KB, "
        f"{text_bytes / MB:.2f} MB of text; {parts} files per format (txt: one per document), "
        f"data.task_bytes set for about {parts} tasks; {os.cpu_count()} CPUs"
    )
    click.echo(
        f"a pool of {max(WORKERS)} spawned workers starts in {pool_start_seconds():.2f} s here; "
        "each pass starts one (bpe: scan, sample, encode; gpt2: scan, encode)"
    )
    globs, task_bytes = {}, {}
    for fmt in FORMATS:
        globs[fmt] = write_format(fmt, documents, root / "in" / fmt, parts)
        sizes = [p.stat().st_size for p in (root / "in" / fmt).iterdir()]
        task_bytes[fmt] = -(-sum(sizes) // parts) if fmt == "txt" else min(sizes)
    click.echo(HEADER)
    for fmt in FORMATS:
        for kind in kinds:
            results = {}
            for workers in WORKERS:
                folder = root / "out" / f"{fmt}-{kind}-{workers}"
                run = {**settings, "task_bytes": task_bytes[fmt]}
                results[workers] = measure(run_overrides(globs[fmt], folder, kind, workers, run))
                click.echo(table_row(fmt, kind, workers, results[workers]))
            click.echo(scaling_row(kind, results[1], results[2]))
    unique_bytes = sum(len(d.encode("utf-8")) for d in unique)
    for kind in kinds:  # each tokenizer alone, as the txt run prepared it
        folder = root / "out" / f"txt-{kind}-1"
        if not (folder / "meta.json").is_file():
            continue
        tokenizer = load_tokenizer(folder)
        tokens, seconds = encode_speed(tokenizer, unique, repeat)
        click.echo(
            f"{kind:4s} vocab {tokenizer.vocab_size:>6}: encode in 1 process "
            f"{unique_bytes / MB / seconds:6.2f} MB/s, {tokens / seconds:>9,.0f} tokens/s "
            f"({tokens:,} tokens, {tokens / unique_bytes:.3f} tokens/byte)"
        )
        if kind == "gpt2":
            r50k = str(settings["tiktoken_file"])
            click.echo(f"     {tiktoken_ceiling(r50k, unique, repeat)}")


# --------------------------------------------------------------------------- --sizes


SYLLABLES = [
    *(c + v for c in ("", *"bcdfghjklmnprstvwz", "th", "sh", "ch", "st", "str") for v in "aeiou"),
    *("ng", "nd", "nt", "rs", "ll", "ss", "ck", "rth"),
]


def word_like_documents(seed: int, target_bytes: int) -> Iterator[str]:
    """Seeded documents of word-like text until `target_bytes` of text: 30,000 made-up words
    drawn by a Zipf law, commas, full stops and paragraphs, documents of about 2.5 KB (log-normal
    lengths). A few MB of state whatever the target."""
    rng = np.random.default_rng(seed)
    words = []
    for count in rng.integers(1, 5, size=30_000):
        words.append("".join(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), count)))
    zipf = 1.0 / np.arange(1, len(words) + 1) ** 1.05
    rng.shuffle(zipf)
    common = zipf[:3000] / zipf[:3000].sum()
    vocabulary = [
        *words,
        *(w + "," for w in words[:3000]),
        *(w + "." for w in words[:3000]),
        "\n\n",
    ]
    weights = np.concatenate([0.9 * zipf / zipf.sum(), 0.05 * common, 0.045 * common, [0.005]])
    cdf = np.cumsum(weights / weights.sum())
    table = np.searchsorted(cdf, (np.arange(1 << 20) + 0.5) / (1 << 20))  # a fast inverse cdf
    widths = np.array([len(word) + 1 for word in vocabulary])  # with the space after it
    written = 0
    while written < target_bytes:
        picks = table[rng.integers(0, len(table), size=1 << 20)]
        text = " ".join(map(vocabulary.__getitem__, picks.tolist()))
        ends = np.cumsum(widths[picks])  # where each word's following space ends
        lengths = rng.lognormal(6.0, 0.8, size=len(picks) // 100).astype(np.int64) + 20
        counts = np.cumsum(lengths)
        begin = 0
        for count in counts[counts <= len(picks)].tolist():
            if written >= target_bytes:
                break
            document = text[begin : ends[count - 1] - 1]
            begin = int(ends[count - 1])
            written += len(document)
            yield document


def write_generated(folder: Path, gigabytes: float, file_mb: int, seed: int) -> int:
    """Write a generated .jsonl.gz corpus of files of about `file_mb` MB of JSONL; returns the
    number of files."""
    folder.mkdir(parents=True)
    documents = word_like_documents(seed, int(gigabytes * 1e9))
    text = next(documents, None)
    files = 0
    while text is not None:
        path = folder / f"part-{files:05d}.jsonl.gz"
        with gzip.open(path, "wb", compresslevel=1) as handle:
            in_file = 0
            while text is not None and in_file < file_mb * MB:
                line = (json.dumps({"text": text}) + "\n").encode()
                handle.write(line)
                in_file += len(line)
                text = next(documents, None)
        files += 1
    return files


def bench_sizes(
    root: Path, sizes: list[float], settings: dict[str, object], file_mb: int, workers: int
) -> None:
    click.echo(
        "sizes: generated .jsonl.gz corpora; bpe; params.yaml's settings: "
        + ", ".join(f"{k} {v:,}" for k, v in settings.items() if isinstance(v, int))
        + f"; num_workers {workers}"
    )
    click.echo(
        f"{'GB':>6s} {'files':>6s} {'gen s':>7s} {'tasks':>5s} {'seconds':>8s} "
        f"{'MB/s/core':>9s} {'RSS main':>10s} {'worker':>10s} {'tree':>10s}"
    )
    for number, gigabytes in enumerate(sizes):
        started = time.perf_counter()
        corpus = root / f"size-{number}"
        files = write_generated(corpus / "in", gigabytes, file_mb, seed=number)
        generated = time.perf_counter() - started
        overrides = run_overrides(
            str(corpus / "in" / "*.jsonl.gz"), corpus / "out", "bpe", workers, settings
        )
        result = measure(overrides)
        if "error" in result:
            click.echo(f"{gigabytes:6.2f} failed: {result['error']}")
        else:
            rate = result["text_bytes"] / MB / result["seconds"] / workers
            click.echo(
                f"{result['text_bytes'] / 1e9:6.2f} {files:6d} {generated:7.1f} "
                f"{result['tasks']:5d} {result['seconds']:8.1f} {rate:9.2f} "
                f"{mb(result['main_peak']):>10s} {mb(result['worker_peak']):>10s} "
                f"{mb(result['tree_peak']):>10s}"
            )
        shutil.rmtree(corpus)  # before the next, larger one


# --------------------------------------------------------------------------- the command


@click.command()
@click.option("--vocab_size", default=4096, show_default=True, help="Vocabulary of the BPE.")
@click.option("--tiktoken_file", default=None, help="A local r50k_base.tiktoken for gpt2.")
@click.option("--doc_kb", default=4, show_default=True, help="Document size (format table).")
@click.option("--parts", default=8, show_default=True, help="Files (and tasks) per format.")
@click.option("--copies", default=1, show_default=True, help="Copies of the default corpus.")
@click.option("--repeat", default=2, show_default=True, help="Encoding passes (best counts).")
@click.option(
    "--sizes",
    default=None,
    metavar="GB,GB,...",
    help="Instead of the format table: generated corpora of these many GB of text.",
)
@click.option("--file_mb", default=64, show_default=True, help="MB of text per --sizes file.")
@click.option("--num_workers", default=2, show_default=True, help="Workers for --sizes.")
@click.option("--task_mb", type=float, help="data.task_bytes / 1e6 for --sizes (else params').")
@click.option("--tmp_dir", default=None, help="Where corpora and outputs go (default: $TMPDIR).")
@click.option("--child", default=None, hidden=True, help="Internal: run one prepare.")
def main(
    vocab_size: int,
    tiktoken_file: str | None,
    doc_kb: int,
    parts: int,
    copies: int,
    repeat: int,
    sizes: str | None,
    file_mb: int,
    num_workers: int,
    task_mb: float | None,
    tmp_dir: str | None,
    child: str | None,
) -> None:
    """Print MB/s per core and peak RSS of prepare per input format and tokenizer."""
    os.chdir(REPO_ROOT)  # params.yaml names its config files relative to the repo root
    if child is not None:
        child_main(json.loads(child))
        return
    click.echo(f"$ {shlex.join(sys.orig_argv)}")
    data = load_config(params_file="params.yaml", overrides={"data.sources": {}}).data
    with tempfile.TemporaryDirectory(prefix="bench-prepare-", dir=tmp_dir) as tmp:
        if sizes is not None:
            settings = {
                "vocab_size": vocab_size,
                "task_bytes": int(task_mb * MB) if task_mb else data.task_bytes,
                "tokenizer_sample_bytes": data.tokenizer_sample_bytes,
                "shard_max_bytes": data.shard_max_bytes,
            }
            gigabytes = [float(size) for size in sizes.split(",")]
            bench_sizes(Path(tmp), gigabytes, settings, file_mb, num_workers)
            return
        kinds = list(TOKENIZER_KINDS)
        r50k, looked = find_r50k(tiktoken_file)
        if r50k is None:
            click.echo(f"gpt2 skipped: no r50k_base.tiktoken here; looked at {looked}")
            kinds.remove("gpt2")
        settings = {"vocab_size": vocab_size, "tiktoken_file": r50k}
        bench_formats(Path(tmp), kinds, settings, doc_kb, parts, copies, repeat)


if __name__ == "__main__":
    main()
