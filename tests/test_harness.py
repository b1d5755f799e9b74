"""Zero-shot scores equal lm-evaluation-harness's, item by item, on the same model and files.

A tiny model trained on a few Shakespeare plays, and ~20 items built from the same text:
LAMBADA lines (the last word is the target) and HellaSwag items with the public fields
(`activity_label`, `ctx_a`, a lower-case `ctx_b` the harness capitalises, a WikiHow "[title]"
marker, a label as a string) whose endings differ in length, so `acc_norm`'s divisor matters.
The harness (lm-eval 0.4.13, the extra `harness`) runs on the model's HF export, offline.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from eval_support import tiny_run

from pipeline.cli import run_command
from pipeline.cli.evaluate import evaluate
from pipeline.evaluation.benchmarks import load_examples, parse_benchmarks, run_benchmark
from pipeline.evaluation.model_source import load_model
from pipeline.evaluation.scoring import Score, score_requests
from pipeline.evaluation.task_files import Record
from pipeline.evaluation.tasks import Example, aggregate_choice, build_requests, parse_hellaswag

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-eval is not installed (pip install 'gpt3-pipeline[harness]'; CI installs it)",
)
ITEMS = 10
"""Per task: 10 LAMBADA and 10 HellaSwag items."""


def _sentences(corpus: Path) -> list[str]:
    """Sentences of 8 to 30 words from the corpus, in file order."""
    text = " ".join(sorted(corpus.glob("*.txt"))[0].read_text().split())
    return [s for s in re.split(r"(?<=[.!?]) ", text) if 8 <= len(s.split()) <= 30]


@pytest.fixture(scope="module")
def task_files(tmp_path_factory: pytest.TempPathFactory, small_corpus_dir: Path) -> list[str]:
    sentences = _sentences(small_corpus_dir)[200 : 200 + 6 * ITEMS]
    out = tmp_path_factory.mktemp("harness_tasks")
    lambada = out / "lambada.jsonl"
    lambada.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences[:ITEMS]))
    rows = []
    for i in range(ITEMS):
        words = sentences[ITEMS + i].split()
        half = len(words) // 2
        others = [sentences[2 * ITEMS + 3 * i + j].split() for j in range(3)]
        endings = [" ".join(words[half + 1 :])] + [" ".join(o[len(o) // 2 :]) for o in others]
        label = i % 4
        endings.insert(label, endings.pop(0))
        ctx_a = " ".join(words[:half])
        rows.append({
            "activity_label": "Reading a play",
            "ctx_a": ctx_a + (" [title] A scene" if i == 3 else ""),
            "ctx_b": words[half].lower(),
            "ctx": f"{ctx_a} {words[half].lower()}",
            "endings": endings,
            "label": str(label) if i % 2 else label,
        })
    hellaswag = out / "hellaswag.jsonl"
    hellaswag.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return [f"lambada:{lambada}", f"hellaswag:{hellaswag}"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Path:
    return Path(tiny_run(tmp_path_factory, prepared_dir).run_dir) / "model"


def _ours(model_dir: Path, specs: list[str]) -> tuple[dict[str, float], dict[str, list]]:
    """This project's metrics and per-item, per-choice log-likelihoods."""
    loaded = load_model(model_dir, "cpu", None)
    metrics, logliks = {}, {}
    for benchmark in parse_benchmarks(specs, "."):
        examples = load_examples(benchmark)
        n_ctx = loaded.model.config.n_ctx
        metrics.update(run_benchmark(benchmark, loaded.model, loaded.tokenizer, n_ctx))
        per_item = []
        for example in examples:
            requests = build_requests(example, loaded.tokenizer)
            scores = score_requests(loaded.model, requests, loaded.model.config.n_ctx)
            per_item.append([score.loglik for score in scores])
        logliks[benchmark.prefix] = per_item
    return metrics, logliks


def _assert_same_metrics(ours: dict[str, float], theirs: dict[str, float]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, value in ours.items():
        if name.endswith("_ppl"):
            assert math.isclose(value, theirs[name], rel_tol=1e-5), (name, value, theirs[name])
        else:  # accuracies and counts: the same items right, exactly
            assert value == theirs[name], (name, value, theirs[name])


@needs_lm_eval
@pytest.mark.slow
def test_per_item_logliks_and_metrics_equal_the_harness(model_dir, task_files) -> None:
    from pipeline.evaluation.harness import run_lm_eval

    ours, our_logliks = _ours(model_dir, task_files)
    loaded = load_model(model_dir, "cpu", None)
    theirs = run_lm_eval(loaded, parse_benchmarks(task_files, "."))
    for prefix, items in our_logliks.items():
        assert len(items) == ITEMS and len(theirs.logliks[prefix]) == ITEMS
        for number, (mine, harness) in enumerate(zip(items, theirs.logliks[prefix], strict=True)):
            assert len(mine) == len(harness), (prefix, number)
            worst = max(abs(a - b) for a, b in zip(mine, harness, strict=True))
            assert worst < 1e-4, (prefix, number, mine, harness)
    _assert_same_metrics(ours, theirs.metrics)


@needs_lm_eval
@pytest.mark.slow
def test_cli_harness_prints_the_metrics_evaluate_computes(model_dir, task_files, tmp_path) -> None:
    """`gpt3 evaluate --harness lm-eval` in a folder without params.yaml, as a user runs it."""
    ours, _ = _ours(model_dir, task_files)
    args = ["--model_checkpoint", str(model_dir), "--harness", "lm-eval", "--device", "cpu"]
    for spec in task_files:
        args += ["--benchmark", spec]
    done = subprocess.run(
        [sys.executable, "-c", "from pipeline.cli import main; main()", "evaluate", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = {}
    for line in done.stdout.splitlines():
        name, value = line.split()
        printed[name] = float(value)
    assert sorted(printed) == sorted(ours)
    for name, value in printed.items():  # printed with 4 decimals (counts as integers)
        assert math.isclose(value, ours[name], rel_tol=1e-4, abs_tol=5e-5), name
    assert list(tmp_path.iterdir()) == [], "the harness mode writes nothing"


def test_harness_without_the_extra_is_one_line_and_exit_2(monkeypatch, capsys) -> None:
    """Checked before the model is even opened (the path below does not exist)."""
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what find_spec sees when not installed
    args = ["--model_checkpoint", "no/such/model", "--harness", "lm-eval", "--params", "x.yaml"]
    with pytest.raises(SystemExit) as exit_info:
        run_command(evaluate, args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: --harness lm-eval needs lm-evaluation-harness: "
        "pip install 'gpt3-pipeline[harness]'"
    ]


def test_acc_norm_divides_by_the_choice_without_its_leading_space() -> None:
    """The harness's definition, on an item where counting the space flips the answer:
    "ab" scores -2.0 (-1.0 a character; -0.67 counting the space), "abcdefg" -6.5 (-0.93;
    -0.81 counting it)."""
    example = Example("ctx", (" ab", " abcdefg"), 1, "here", (2, 7))
    scores = [[Score(-2.0, False, 1), Score(-6.5, False, 3)]]
    assert aggregate_choice([example], scores) == {"acc": 0.0, "acc_norm": 1.0}
    record = Record({"ctx": "c", "endings": ["ab", "abcdefg"], "label": 1}, "here")
    assert parse_hellaswag(record).norm_lengths == (2, 7)


def test_hellaswag_query_is_built_as_the_harness_builds_it() -> None:
    fields = {
        "activity_label": "Washing a car",
        "ctx_a": "A man sprays water [title] on a car.",
        "ctx_b": "he then",
        "ctx": "not used when ctx_a and ctx_b are there",
        "endings": ["scrubs [header] the wheels.", "drives away."],
        "label": "0",
    }
    example = parse_hellaswag(Record(fields, "here"))
    assert example.context == "Washing a car: A man sprays water. on a car. He then"
    assert example.choices == (" scrubs the wheels.", " drives away.")
    without = {k: v for k, v in fields.items() if k not in ("ctx_a", "ctx_b")}
    assert parse_hellaswag(Record(without, "here")).context == (
        "Washing a car: not used when ctx_a and ctx_b are there"
    )
