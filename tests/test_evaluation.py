"""Evaluation: language-model metrics by hand, zero-shot tasks at 1.0 and at chance, bad files.

The metrics run on a tiny model trained on real data; the task tests use test models whose
answers are known exactly (see eval_support.py) on the JSONL fixtures in tests/fixtures/.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_support import (
    FIXTURES,
    ConstantLM,
    OracleLM,
    mlflow_env,  # noqa: F401  (a fixture, used by name)
    tiny_run,
)

from pipeline.data.prepare import load_meta, open_tokens
from pipeline.data.tokenizer import load_tokenizer
from pipeline.errors import ConfigError, DataError
from pipeline.evaluation.benchmarks import load_examples, parse_benchmarks, run_benchmark
from pipeline.evaluation.lm_metrics import evaluate_tokens, window_starts
from pipeline.evaluation.model_source import load_model
from pipeline.evaluation.run import evaluate_run
from pipeline.evaluation.tasks import build_requests
from pipeline.evaluation.tracking_hook import log_to_tracking
from pipeline.tracking.mlflow_model import TRACKING_FILE


@pytest.fixture(scope="module")
def run_config(tmp_path_factory, prepared_dir):
    return tiny_run(tmp_path_factory, prepared_dir)


@pytest.fixture(scope="module")
def tokenizer(prepared_dir):
    return load_tokenizer(prepared_dir)


def test_windows_cover_every_target_once() -> None:
    for n_targets, seq_len in [(1, 4), (4, 4), (10, 4), (13, 5)]:
        covered = [s + 1 + i for s, n in window_starts(n_targets, seq_len) for i in range(n)]
        assert covered == list(range(1, n_targets + 1))


def test_lm_metrics_match_a_hand_computation(run_config, prepared_dir) -> None:
    model = load_model(Path(run_config.run_dir) / "model").model
    meta = load_meta(prepared_dir)
    val = open_tokens(prepared_dir, "val")
    n, seq_len = 100, 16  # six full windows and a tail of 4; batches of 3 split them unevenly
    got = evaluate_tokens(model, val, seq_len, 3, meta.splits["val"].text_bytes, max_tokens=n)

    nll, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, n, seq_len):
            length = min(seq_len, n - start)
            ids = torch.from_numpy(np.asarray(val[start : start + length + 1], dtype=np.int64))
            logits, _ = model(ids[None, :-1])
            logp = F.log_softmax(logits[0].double(), dim=-1)
            targets = ids[1:]
            nll -= float(logp[torch.arange(length), targets].sum())
            correct += int((logp.argmax(-1) == targets).sum())
    assert got.tokens == n
    assert got.loss == pytest.approx(nll / n, rel=1e-5)
    assert got.accuracy == correct / n
    assert got.perplexity == pytest.approx(math.exp(nll / n), rel=1e-5)
    expected_bytes = meta.splits["val"].text_bytes * n / (len(val) - 1)
    assert got.text_bytes == pytest.approx(expected_bytes)
    assert got.bits_per_byte == pytest.approx(nll / math.log(2) / expected_bytes, rel=1e-5)


def test_evaluate_run_writes_reproducible_metrics_and_samples(run_config, prepared_dir) -> None:
    config = run_config.model_copy(deep=True)
    config.evaluation.max_tokens = 1000
    config.evaluation.benchmarks = [f"multiple_choice:{FIXTURES / 'multiple_choice.jsonl'}"]
    metrics = evaluate_run(config)
    out = Path(config.run_dir) / "metrics"
    saved = json.loads((out / "eval.json").read_text())
    assert saved == pytest.approx(metrics)
    assert all(isinstance(v, float) for v in saved.values()), "eval.json must be flat numbers"
    assert saved["val_tokens"] == 1000 and saved["multiple_choice_examples"] == 4
    # Bits per byte is the loss converted by hand: nats per token -> bits per byte.
    val_bytes = load_meta(prepared_dir).splits["val"].text_bytes
    fraction = 1000 / (len(open_tokens(prepared_dir, "val")) - 1)
    assert saved["val_bytes"] == pytest.approx(val_bytes * fraction)
    by_hand = saved["val_loss"] * saved["val_tokens"] / math.log(2) / saved["val_bytes"]
    assert saved["val_bits_per_byte"] == pytest.approx(by_hand, rel=1e-9)
    assert saved["val_perplexity"] == pytest.approx(math.exp(saved["val_loss"]))
    samples = (out / "samples.md").read_text()
    assert "ROMEO:" in samples and samples.count("## Prompt") == 2
    first = (out / "eval.json").read_bytes()
    evaluate_run(config)
    assert (out / "eval.json").read_bytes() == first, "same model and data, same metrics file"
    assert (out / "samples.md").read_text() == samples


def _task(name: str):
    return parse_benchmarks([f"{name}:{FIXTURES / (name + '.jsonl')}"], "unused")[0]


@pytest.mark.parametrize(
    ("name", "chance"),
    [("lambada", None), ("hellaswag", 0.25), ("multiple_choice", 0.5)],
)
def test_tasks_score_an_oracle_at_one_and_a_constant_model_at_chance(
    name: str, chance: float | None, tokenizer
) -> None:
    benchmark = _task(name)
    examples = load_examples(benchmark)
    requests = [build_requests(e, tokenizer) for e in examples]
    right = [r[e.label] for e, r in zip(examples, requests, strict=True)]
    oracle = OracleLM([(*r.context, *r.continuation) for r in right], tokenizer.vocab_size)
    constant = ConstantLM(tokenizer.vocab_size)

    best = run_benchmark(benchmark, oracle, tokenizer, n_ctx=512, batch_size=3)
    flat = run_benchmark(benchmark, constant, tokenizer, n_ctx=512, batch_size=3)
    assert best[f"{name}_examples"] == flat[f"{name}_examples"] == len(examples) == 4
    assert best[f"{name}_acc"] == 1.0
    if name == "lambada":
        assert best["lambada_ppl"] == pytest.approx(1.0, abs=1e-6)
        assert flat["lambada_acc"] == 0.0
        mean_tokens = sum(len(r.continuation) for r in right) / len(right)
        assert flat["lambada_ppl"] == pytest.approx(tokenizer.vocab_size**mean_tokens, rel=1e-6)
        return
    # The fixtures' choices are permutations of the same words: equal tokens and characters,
    # so a constant model ties everywhere, takes the first choice, and the balanced labels
    # make that exactly chance.
    for example, reqs in zip(examples, requests, strict=True):
        assert len({len(r.continuation) for r in reqs}) == 1, example.where
        assert len({len(c) for c in example.choices}) == 1, example.where
    assert best[f"{name}_acc_norm"] == 1.0
    assert flat[f"{name}_acc"] == chance
    assert flat[f"{name}_acc_norm"] == chance


def test_context_is_cut_from_the_left_to_fit_the_model(tokenizer) -> None:
    benchmark = _task("lambada")
    examples = load_examples(benchmark)
    right = [build_requests(e, tokenizer)[0] for e in examples]
    oracle = OracleLM([(*r.context, *r.continuation) for r in right], tokenizer.vocab_size, 8)
    result = run_benchmark(benchmark, oracle, tokenizer, n_ctx=8, batch_size=2)
    # With 8 positions the oracle no longer sees the whole prefix it knows, so it cannot
    # find its answers; the scorer must still run without exceeding the context.
    assert result["lambada_acc"] == 0.0 and result["lambada_examples"] == 4


BAD_FILES = {
    "not json": (
        "multiple_choice",
        ['{"context": "a", "choices": ["x", "y"], "label": 0}', '{"context": "a", "choices": '],
        2,
        "not valid JSON",
    ),
    "not an object": ("lambada", ['{"text": "a b"}', '["a b"]'], 2, "expected a JSON object"),
    "missing field": (
        "hellaswag",
        ['{"endings": ["a", "b"], "label": 0}'],
        1,
        "missing field 'ctx'",
    ),
    "unlabelled test split": (
        "hellaswag",
        ['{"ctx": "c", "endings": ["a", "b"], "label": ""}'],
        1,
        "integer or a numeric string",
    ),
    "label out of range": (
        "multiple_choice",
        ["", '{"context": "c", "choices": ["a", "b"], "label": 2}'],
        2,
        "outside 0..1",
    ),
    "choices not a list": (
        "multiple_choice",
        ['{"context": "c", "choices": "ab", "label": 0}'],
        1,
        "list of strings",
    ),
    "one word": ("lambada", ['{"text": "word"}'], 1, "last word"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_file_in_the_wrong_shape_names_the_line(case: str, tmp_path: Path) -> None:
    name, lines, line, message = BAD_FILES[case]
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:{line}: .*{message}"):
        load_examples(parse_benchmarks([f"{name}:{path}"], tmp_path)[0])


def test_benchmark_names_come_from_the_registry(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown benchmark 'piqa'; known: lambada, hellaswag"):
        parse_benchmarks(["piqa:x.jsonl"], tmp_path)
    parsed = parse_benchmarks(
        ["lambada", "multiple_choice:a/piqa.jsonl", "multiple_choice:b/arc.jsonl"], tmp_path
    )
    assert parsed[0].path == tmp_path / "lambada.jsonl"
    assert [b.prefix for b in parsed] == ["lambada", "multiple_choice_piqa", "multiple_choice_arc"]
    with pytest.raises(DataError, match="task file not found"):
        load_examples(parsed[0])


@pytest.mark.usefixtures("mlflow_env")
def test_tracking_hook_only_logs_with_a_run_id(run_config, tmp_path: Path) -> None:
    config = run_config.model_copy(deep=True)
    assert not log_to_tracking({"val_loss": 1.0}, config, "abc")  # tracking disabled
    config.tracking.enabled = True
    assert not log_to_tracking({"val_loss": 1.0}, config, None)  # nothing to log to
    config.tracking.uri = "nosuchscheme://nowhere"
    assert not log_to_tracking({"val_loss": 1.0}, config, "abc")  # failure: a warning only

    model_dir = tmp_path / "model"
    shutil.copytree(Path(run_config.run_dir) / "model", model_dir)
    assert load_model(model_dir).tracking_run_id is None
    (model_dir / TRACKING_FILE).write_text(json.dumps({"run_id": "0123abcd"}))
    assert load_model(model_dir).tracking_run_id == "0123abcd"
    checkpoint = Path(run_config.run_dir) / "checkpoints" / "latest_checkpoint.pt"
    assert load_model(checkpoint).tracking_run_id is None  # trained with tracking off
