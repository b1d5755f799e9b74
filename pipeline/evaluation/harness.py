"""`gpt3 evaluate --harness lm-eval`: EleutherAI's lm-evaluation-harness on the same model and
the same task files, to check that this project's zero-shot numbers are the harness's.

The harness runs on the Hugging Face export of the model (`pipeline/export/hf.py`), in float32,
offline (`HF_DATASETS_OFFLINE`, `HF_HUB_OFFLINE`). Each benchmark becomes a task YAML that
`include`s the harness's own definition (`lambada_openai`, `hellaswag`: its prompt, its
HellaSwag preprocessing, its metrics) and swaps only the dataset for the local JSONL file
(`dataset_path: json`). The generic `multiple_choice` format has no harness task, so it is
refused. An optional extra: `pip install 'gpt3-pipeline[harness]'`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.config.schema import Config
from pipeline.errors import ConfigError, UserError
from pipeline.evaluation.benchmarks import Benchmark, parse_benchmarks
from pipeline.evaluation.model_source import LoadedModel
from pipeline.evaluation.task_files import read_records

logger = logging.getLogger("pipeline.evaluate")

HARNESS_TASKS = {
    "lambada": ("lambada/lambada_openai.yaml", "test"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
}
"""Our task format -> (the harness's task YAML it includes, the split that YAML evaluates)."""

HARNESS_FIELDS = {"hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label")}
"""Fields the harness's own preprocessing reads (ours falls back to `ctx`; the harness not)."""

METRIC_NAMES = {"perplexity": "ppl", "acc": "acc", "acc_norm": "acc_norm"}
"""The harness's metric name -> ours (`<prefix>_<name>` in eval.json)."""

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class HarnessResult:
    metrics: dict[str, float]
    """Named as `evaluate` names them: `lambada_acc`, `lambada_ppl`, `hellaswag_acc_norm`..."""
    logliks: dict[str, list[list[float]]]
    """Benchmark prefix -> per item (file order), the log-likelihood of each choice."""


def require_lm_eval() -> None:
    """Fail before any model time when the extra is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(
            "--harness lm-eval needs lm-evaluation-harness: pip install 'gpt3-pipeline[harness]'"
        )


@contextmanager
def _offline() -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in OFFLINE}
    os.environ.update(OFFLINE)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _check_fields(benchmark: Benchmark, limit: int | None) -> None:
    needed = HARNESS_FIELDS.get(benchmark.task.name, ())
    for record in read_records(benchmark.path, limit):
        missing = [name for name in needed if name not in record.fields]
        if missing:
            raise record.error(
                f"the harness's {benchmark.task.name} task needs field(s) {', '.join(missing)}"
            )


def _task_yaml(benchmark: Benchmark, harness_tasks: Path, cache_dir: Path) -> tuple[str, str]:
    """(task name, YAML text) of one benchmark: the harness's task on the local file."""
    if benchmark.task.name not in HARNESS_TASKS:
        raise ConfigError(
            f"benchmark {benchmark.prefix}: the harness has no task for the "
            f"{benchmark.task.name} format; --harness runs {', '.join(HARNESS_TASKS)}"
        )
    included, split = HARNESS_TASKS[benchmark.task.name]
    name = f"gpt3_{benchmark.prefix}"
    data_files = {split: str(benchmark.path.resolve())}
    text = "\n".join([
        f"include: {json.dumps(str(harness_tasks / included))}",
        f"task: {name}",
        "tag: []",
        "dataset_path: json",
        "dataset_name: null",
        "dataset_kwargs: " + json.dumps({"data_files": data_files, "cache_dir": str(cache_dir)}),
        "training_split: null",
        "",
    ])
    return name, text


def run_lm_eval(
    loaded: LoadedModel,
    benchmarks: Sequence[Benchmark],
    limit: int | None = None,
    batch_size: int = 8,
) -> HarnessResult:
    """Run the harness on `loaded`'s HF export for each benchmark (its first `limit` items)."""
    require_lm_eval()
    for benchmark in benchmarks:
        _check_fields(benchmark, limit)
    from pipeline.export.hf import export_hf

    device = str(next(loaded.model.parameters()).device)
    with tempfile.TemporaryDirectory(prefix="gpt3-harness-") as work, _offline():
        import lm_eval
        from lm_eval.tasks import TaskManager

        harness_tasks = Path(lm_eval.__file__).parent / "tasks"
        tasks_dir = Path(work) / "tasks"
        tasks_dir.mkdir()
        names = {}
        for benchmark in benchmarks:
            name, text = _task_yaml(benchmark, harness_tasks, Path(work) / "datasets")
            (tasks_dir / f"{name}.yaml").write_text(text)
            names[benchmark.prefix] = name
        hf_dir = export_hf(loaded, Path(work) / "hf_model")
        logger.info("lm-evaluation-harness %s on %s", lm_eval.__version__, ", ".join(names))
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(hf_dir), "dtype": "float32"},
            tasks=list(names.values()),
            task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
            device=device,
            batch_size=batch_size,
            limit=limit,
            bootstrap_iters=0,
            log_samples=True,
        )
    metrics: dict[str, float] = {}
    logliks: dict[str, list[list[float]]] = {}
    for prefix, name in names.items():
        for key, value in results["results"][name].items():
            metric, _, _ = key.partition(",")
            if metric in METRIC_NAMES:
                metrics[f"{prefix}_{METRIC_NAMES[metric]}"] = float(value)
        samples = sorted(results["samples"][name], key=lambda sample: sample["doc_id"])
        logliks[prefix] = [[float(resp[0][0]) for resp in s["resps"]] for s in samples]
        metrics[f"{prefix}_examples"] = float(len(samples))
    return HarnessResult(metrics, logliks)


def harness_metrics(config: Config, loaded: LoadedModel) -> dict[str, float]:
    """The CLI's entry: the benchmarks of `config.evaluation`, scored by the harness."""
    settings = config.evaluation
    benchmarks = parse_benchmarks(settings.benchmarks, settings.benchmark_dir)
    if not benchmarks:
        raise ConfigError("--harness needs benchmarks: --benchmark NAME:PATH")
    result = run_lm_eval(loaded, benchmarks, settings.benchmark_limit, settings.batch_size)
    return result.metrics
