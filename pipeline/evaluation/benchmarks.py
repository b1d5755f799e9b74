"""Run the zero-shot benchmarks named in params or on the command line.

A benchmark is written `NAME` or `NAME:PATH`: NAME picks the task format from the registry in
`tasks.py`, PATH is a local JSONL file (default `<evaluation.benchmark_dir>/<NAME>.jsonl`).
Nothing is downloaded: the machines this pipeline runs on are often offline, and a file in
the repository (or DVC-tracked) makes the evaluation reproducible.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from pipeline.data.tokenizer import Tokenizer
from pipeline.errors import ConfigError
from pipeline.evaluation.lm_metrics import AutocastFactory
from pipeline.evaluation.scoring import score_requests
from pipeline.evaluation.task_files import read_records
from pipeline.evaluation.tasks import Example, TaskSpec, build_requests, task_spec


@dataclass(frozen=True)
class Benchmark:
    """A task format, its file, and the prefix of its metric names."""

    task: TaskSpec
    path: Path
    prefix: str


def parse_benchmarks(specs: Sequence[str], default_dir: str | Path) -> list[Benchmark]:
    """`["lambada", "multiple_choice:piqa.jsonl"]` -> benchmarks with unique metric prefixes.

    The prefix is the task name; a name used twice gets the file's stem added
    (`multiple_choice_piqa`), so two files of one format keep separate metrics.
    """
    parsed: list[tuple[TaskSpec, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition(":")
        name = name.strip()
        if not name or (sep and not path.strip()):
            raise ConfigError(f"benchmark {spec!r}: expected NAME or NAME:PATH")
        task = task_spec(name)
        parsed.append((task, Path(path.strip()) if sep else Path(default_dir) / f"{name}.jsonl"))
    uses = Counter(task.name for task, _ in parsed)
    benchmarks = []
    for task, path in parsed:
        prefix = task.name if uses[task.name] == 1 else f"{task.name}_{path.stem}"
        benchmarks.append(Benchmark(task, path, prefix))
    prefixes = [b.prefix for b in benchmarks]
    duplicates = sorted({p for p in prefixes if prefixes.count(p) > 1})
    if duplicates:
        raise ConfigError(f"benchmarks listed twice: {', '.join(duplicates)}")
    return benchmarks


def load_examples(benchmark: Benchmark, limit: int | None = None) -> list[Example]:
    """Parse the whole file first, so a bad line is reported before any model time is spent."""
    return [benchmark.task.parse(record) for record in read_records(benchmark.path, limit)]


def run_benchmark(
    benchmark: Benchmark,
    model: nn.Module,
    tokenizer: Tokenizer,
    n_ctx: int,
    batch_size: int = 8,
    autocast: AutocastFactory = contextlib.nullcontext,
    limit: int | None = None,
    examples: list[Example] | None = None,
) -> dict[str, float]:
    """Score one benchmark; metric names are `<prefix>_<metric>` plus `<prefix>_examples`."""
    examples = examples if examples is not None else load_examples(benchmark, limit)
    per_example = [build_requests(example, tokenizer) for example in examples]
    flat = [request for requests in per_example for request in requests]
    scores = score_requests(model, flat, n_ctx, batch_size, autocast)
    grouped, start = [], 0
    for requests in per_example:
        grouped.append(scores[start : start + len(requests)])
        start += len(requests)
    metrics = benchmark.task.aggregate(examples, grouped)
    out = {f"{benchmark.prefix}_{key}": float(value) for key, value in metrics.items()}
    out[f"{benchmark.prefix}_examples"] = float(len(examples))
    return out
