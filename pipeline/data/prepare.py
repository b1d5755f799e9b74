"""The prepare stage: inputs -> seeded train/val split -> tokenizer -> token shards + meta.json.

Streaming, in bounded memory, whatever the corpus size. A source's inputs are cut into tasks
(`pipeline.data.inputs`), and three passes run over them on any number of workers or machines
(`pipeline.data.phases`, `pipeline.data.executors`):
1. scan: every document's seeded keys, to choose the validation documents (round(n * f) with
   the smallest keys, as before) and the tokenizer's sample (the train documents with the
   smallest sample keys up to `data.tokenizer_sample_bytes`);
2. sample: the BPE learns from those documents, streamed in corpus order (trained BPE only);
3. encode: each task writes its documents' ids into the next token shards of its split.
Same inputs, seed and settings give byte-identical outputs whatever `num_workers`, `executor`
or the number of machines.

Outputs are written into a temporary sibling folder and swapped into place by rename, so a
failed or interrupted run leaves the previous outputs as they were.

One source is prepared into `data.prepared_dir` (tokenizer inside). A mixture's tokenizer is
built once from a sample of every source into `data.tokenizer_dir`, then each source into
`data.prepared_dir/<name>` with a copy of it: the DVC pipeline runs these as separate stages
(`--tokenizer_only`, then `--source NAME` per source), so changing one source's inputs
re-prepares that source alone.

Later stages read the result through `load_meta` and `open_stream`/`open_tokens` (and
`pipeline.data.tokenizer.load_tokenizer`). This module is the stage and the public face of
the modules behind it; import from here.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.config.schema import Config
from pipeline.data.doc_keys import KeyChunk, chosen, iter_positions, smallest_within, val_count
from pipeline.data.executors import LocalPool, run_phase
from pipeline.data.inputs import InputFile, Task, check_kind_and_inputs, plan_tasks, source_inputs
from pipeline.data.phases import (
    SAMPLE_PIECE_CHARS,
    Cuts,
    PhaseJob,
    read_encode_result,
    read_keys,
    read_sample,
    read_scan_summary,
)
from pipeline.data.prepared import (
    FORMAT_VERSION,
    META_FILE,
    SPLITS,
    InputMeta,
    PreparedMeta,
    SampleMeta,
    ShardMeta,
    Split,
    SplitMeta,
    TokenizerMeta,
    data_hash,
    dtype_name,
    load_meta,
    open_stream,
    open_tokens,
    token_dtype,
    verify_prepared,
)
from pipeline.data.shared_tokenizer import (
    TOKENIZER_META,
    shared_tokenizer,
    write_shared_record,
)
from pipeline.data.sources import SourceSpec, data_sources, find_source, tokenizer_folder
from pipeline.data.staging import Staging, clear_stale_work, keep_only_logs, write_json
from pipeline.data.summary import PrepareSummary
from pipeline.data.tokenizer import (
    Tokenizer,
    open_tokenizer,
    split_at_safe_boundaries,
    tokenizer_kind,
)
from pipeline.errors import DataError
from pipeline.hashing import file_sha256

__all__ = [
    "FORMAT_VERSION",
    "META_FILE",
    "SPLITS",
    "PrepareSummary",
    "PreparedMeta",
    "Split",
    "SplitMeta",
    "load_meta",
    "open_stream",
    "open_tokens",
    "prepare_data",
    "token_dtype",
    "verify_prepared",
]


@dataclass(frozen=True)
class ScannedSource:
    """A source after the scan pass: its tasks, documents and validation cut."""

    spec: SourceSpec
    inputs: tuple[InputFile, ...]
    tasks: tuple[Task, ...]
    work_dir: Path
    counts: tuple[int, ...]
    empty: int
    input_sha256: dict[int, str]
    cuts: Cuts

    @property
    def documents(self) -> int:
        return sum(self.counts)

    def chunks(self, weights: str, offset: int = 0) -> Iterator[KeyChunk]:
        """Key chunks per task: weight 1 per document (`count`) or train bytes (`train_bytes`)."""
        for rank, start in enumerate(self.cuts.positions):
            keys = read_keys(self.work_dir, rank)
            positions = np.arange(len(keys), dtype=np.uint64) + np.uint64(start)
            if weights == "count":
                yield KeyChunk(keys["split"], positions, np.ones(len(keys), dtype=np.int64))
                continue
            train = ~chosen(keys["split"], positions, self.cuts.val)
            sample_weights = np.where(train, keys["bytes"].astype(np.int64), 0)
            yield KeyChunk(keys["sample"], positions + np.uint64(offset), sample_weights)


# --------------------------------------------------------------------------- passes


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, unit="task", desc=desc, disable=not progress)


def _scan(
    config: Config, spec: SourceSpec, work_root: Path, progress: bool, pool: LocalPool
) -> ScannedSource:
    data = config.data
    inputs = tuple(source_inputs(spec))
    target = spec.folder.resolve()
    inside = [item.display for item in inputs if item.path.resolve().is_relative_to(target)]
    if inside:
        raise DataError(
            f"{inside[0]}: an input inside the prepared folder {spec.folder}, which prepare "
            "replaces whole; move the inputs elsewhere"
        )
    tasks = tuple(plan_tasks(inputs, data.task_bytes))
    work = work_root / spec.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    job = PhaseJob("scan", tasks, inputs, spec.text_field, config.seed, str(work))
    with _bar(len(tasks), f"scan {spec.name}", progress) as bar:
        run_phase(job, data, config.slurm, lambda _: bar.update(), pool)
    summaries = [read_scan_summary(work, rank) for rank in range(len(tasks))]
    counts = tuple(s["documents"] for s in summaries)
    total = sum(counts)
    if total == 0:
        names = ", ".join(item.display for item in inputs[:3]) + (
            ", ..." if len(inputs) > 3 else ""
        )
        raise DataError(f"empty corpus: no text in {len(inputs)} input file(s) ({names})")
    if total < 2:
        raise DataError(
            f"source {spec.name!r} has 1 document; a split by document needs at least 2 "
            "(one train, one val): add documents, or split the text into several .txt files "
            "or jsonl lines"
        )
    hashes = {int(k): v for s in summaries for k, v in s["input_sha256"].items()}
    positions = tuple(iter_positions(counts))
    scanned = ScannedSource(
        spec,
        inputs,
        tasks,
        work,
        counts,
        sum(s["empty"] for s in summaries),
        hashes,
        Cuts(positions, (0, -1), None),
    )
    cut = smallest_within(lambda: scanned.chunks("count"), val_count(total, data.val_fraction))
    return replace(scanned, cuts=Cuts(positions, cut, None))


SOURCE_OFFSET_BITS = 48
"""Sample positions across a mixture: source index above this bit, corpus position below."""


def _build_tokenizer(
    config: Config, scanned: list[ScannedSource], folder: Path, progress: bool, pool: LocalPool
) -> tuple[Tokenizer, SampleMeta | None]:
    """The tokenizer in `folder`: GPT-2's file copied, or a BPE trained on the sample."""
    data = config.data
    build = tokenizer_kind(data.tokenizer).plan(data)
    if data.tokenizer != "bpe":
        return build([], folder, progress), None

    def all_chunks() -> Iterator[KeyChunk]:
        for index, source in enumerate(scanned):
            yield from source.chunks("train_bytes", index << SOURCE_OFFSET_BITS)

    cut = smallest_within(all_chunks, data.tokenizer_sample_bytes)
    sampled = []
    for index, source in enumerate(scanned):
        cuts = Cuts(source.cuts.positions, source.cuts.val, cut, index << SOURCE_OFFSET_BITS)
        source = replace(source, cuts=cuts)
        job = _job(source, config, "sample")
        with _bar(len(source.tasks), f"sample {source.spec.name}", progress) as bar:
            run_phase(job, data, config.slurm, lambda _: bar.update(), pool)
        sampled.append(source)

    stats = {"documents": 0, "text_bytes": 0}

    def texts() -> Iterator[str]:
        for source in sampled:
            for text in read_sample(source.work_dir, len(source.tasks)):
                stats["documents"] += 1
                stats["text_bytes"] += len(text.encode("utf-8"))
                yield from split_at_safe_boundaries(text, SAMPLE_PIECE_CHARS)

    tokenizer = build(texts(), folder, progress)  # type: ignore[arg-type]
    return tokenizer, SampleMeta(limit_bytes=data.tokenizer_sample_bytes, **stats)


def _job(source: ScannedSource, config: Config, phase: str, **extra: object) -> PhaseJob:
    return PhaseJob(
        phase,
        source.tasks,
        source.inputs,
        source.spec.text_field,
        config.seed,
        str(source.work_dir),
        cuts=source.cuts,
        **extra,  # type: ignore[arg-type]
    )


def _encode(
    config: Config,
    source: ScannedSource,
    tokenizer: Tokenizer,
    sample: SampleMeta | None,
    folder: Path,
    progress: bool,
    pool: LocalPool,
) -> PreparedMeta:
    """Tokenize `source` into `folder` (which holds the tokenizer file) and write meta.json."""
    data = config.data
    dtype = token_dtype(tokenizer.vocab_size)
    job = _job(
        source,
        config,
        "encode",
        tokenizer_kind=tokenizer.kind,
        tokenizer_dir=str(tokenizer.file.parent),
        out_dir=str(folder),
        dtype=dtype.str,
        shard_max_tokens=max(1, data.shard_max_bytes // dtype.itemsize),
    )
    with _bar(len(source.tasks), f"encode {source.spec.name}", progress) as bar:
        run_phase(job, data, config.slurm, lambda _: bar.update(), pool)
    results = [read_encode_result(source.work_dir, r) for r in range(len(source.tasks))]
    outputs = {tokenizer.file.name: file_sha256(tokenizer.file)}
    splits: dict[Split, SplitMeta] = {}
    for split in SPLITS:
        shards = [shard for result in results for shard in result[split]["shards"]]
        outputs.update({shard["file"]: shard["sha256"] for shard in shards})
        splits[split] = SplitMeta(
            shards=[ShardMeta(file=s["file"], tokens=s["tokens"]) for s in shards],
            documents=sum(r[split]["documents"] for r in results),
            tokens=sum(s["tokens"] for s in shards),
            text_bytes=sum(r[split]["text_bytes"] for r in results),
        )
    meta = PreparedMeta(
        data_hash=data_hash(
            dtype_name(dtype), tokenizer.vocab_size, tokenizer.eot_id, tokenizer.kind, outputs
        ),
        vocab_size=tokenizer.vocab_size,
        dtype=dtype_name(dtype),
        eot_id=tokenizer.eot_id,
        tokenizer=TokenizerMeta(
            kind=tokenizer.kind,
            file=tokenizer.file.name,
            vocab_size_requested=data.vocab_size if tokenizer.kind == "bpe" else None,
        ),
        seed=config.seed,
        val_fraction=data.val_fraction,
        source=source.spec.name,
        splits=splits,
        empty_documents_skipped=source.empty,
        inputs=[
            InputMeta(path=item.display, sha256=source.input_sha256[i], bytes=item.bytes)
            for i, item in enumerate(source.inputs)
        ],
        outputs=outputs,
        tokenizer_sample=sample,
        task_bytes=data.task_bytes,
    )
    write_json(folder / META_FILE, meta.model_dump_json(indent=2))
    return meta


# --------------------------------------------------------------------------- the stage


def prepare_data(
    config: Config,
    progress: bool = True,
    source: str | None = None,
    tokenizer_only: bool = False,
) -> list[PrepareSummary]:
    """Run the prepare stage for `config`; see the module docstring for the guarantees.

    One source: everything in one go. A mixture: the shared tokenizer, then every source;
    `tokenizer_only` stops after the tokenizer, `source` prepares that one source with the
    tokenizer built before.
    """
    data = config.data
    work_root = Path(data.work_dir) / f"run-{socket.gethostname()}-{os.getpid()}"
    tokenizer_kind(data.tokenizer).plan(data)  # settings and files checked before any work
    for spec in data_sources(data):
        check_kind_and_inputs(spec)
    clear_stale_work(Path(data.work_dir))
    try:
        with LocalPool(data.num_workers) as pool:
            if not data.sources:
                spec = data_sources(data)[0]
                summaries = [_prepare_single(config, spec, work_root, progress, pool)]
            elif source is not None:
                spec = find_source(data, source)
                summaries = [_prepare_one_of_mixture(config, spec, work_root, progress, pool)]
            else:
                summaries = _prepare_mixture(config, work_root, progress, tokenizer_only, pool)
    except BaseException:
        keep_only_logs(work_root)  # what a failed task's message points at
        raise
    shutil.rmtree(work_root, ignore_errors=True)
    if Path(data.work_dir).is_dir() and not any(Path(data.work_dir).iterdir()):
        Path(data.work_dir).rmdir()
    return summaries


def _prepare_single(
    config: Config, spec: SourceSpec, work_root: Path, progress: bool, pool: LocalPool
) -> PrepareSummary:
    started = time.perf_counter()
    staging = Staging(spec.folder)
    scanned = _scan(config, spec, work_root, progress, pool)
    with staging as folder:
        tokenizer, sample = _build_tokenizer(config, [scanned], folder, progress, pool)
        meta = _encode(config, scanned, tokenizer, sample, folder, progress, pool)
        staging.commit()
    return PrepareSummary(spec.folder, meta, time.perf_counter() - started)


def _prepare_mixture(
    config: Config, work_root: Path, progress: bool, tokenizer_only: bool, pool: LocalPool
) -> list[PrepareSummary]:
    data = config.data
    specs = data_sources(data)
    stagings = [] if tokenizer_only else [Staging(spec.folder) for spec in specs]
    tokenizer_staging = Staging(tokenizer_folder(data), TOKENIZER_META)
    learn_from = data.tokenizer_sources or [spec.name for spec in specs]
    if data.tokenizer != "bpe":
        learn_from = []  # a fixed vocabulary learns from nothing
    needed = [spec for spec in specs if spec.name in learn_from or not tokenizer_only]
    scanned = [_scan(config, spec, work_root, progress, pool) for spec in needed]
    with tokenizer_staging as folder:
        teachers = [source for source in scanned if source.spec.name in learn_from]
        tokenizer, sample = _build_tokenizer(config, teachers, folder, progress, pool)
        write_shared_record(folder, tokenizer, config, learn_from, sample)
        tokenizer_staging.commit()
    if tokenizer_only:
        return []
    shared, sample = shared_tokenizer(data, config.seed)
    summaries = []
    for source, staging in zip(scanned, stagings, strict=True):
        started = time.perf_counter()
        summaries.append(
            _encode_into(config, source, shared, sample, staging, progress, started, pool)
        )
    return summaries


def _prepare_one_of_mixture(
    config: Config, spec: SourceSpec, work_root: Path, progress: bool, pool: LocalPool
) -> PrepareSummary:
    started = time.perf_counter()
    staging = Staging(spec.folder)
    shared, sample = shared_tokenizer(config.data, config.seed)
    scanned = _scan(config, spec, work_root, progress, pool)
    return _encode_into(config, scanned, shared, sample, staging, progress, started, pool)


def _encode_into(
    config: Config,
    source: ScannedSource,
    shared: Tokenizer,
    sample: SampleMeta | None,
    staging: Staging,
    progress: bool,
    started: float,
    pool: LocalPool,
) -> PrepareSummary:
    with staging as folder:
        copy = folder / shared.file.name
        shutil.copyfile(shared.file, copy)
        tokenizer = open_tokenizer(shared.kind, folder)
        meta = _encode(config, source, tokenizer, sample, folder, progress, pool)
        staging.commit()
    return PrepareSummary(source.spec.folder, meta, time.perf_counter() - started)
