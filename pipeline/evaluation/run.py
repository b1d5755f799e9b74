"""The evaluate stage: a trained model -> metrics/eval.json, metrics/samples.md, MLflow.

Order, chosen so a mistake costs no model time and leaves nothing half-written: benchmark
files are parsed and the validation data opened first, then the model runs (validation
metrics, benchmarks, samples), then `eval.json` and `samples.md` are written atomically and
the same numbers go to the training run's MLflow record when it has one.

`eval.json` holds only numbers that the same model, data and config reproduce exactly (no
timings), so `dvc repro --force` twice gives identical metrics on the same machine.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline.config.schema import Config
from pipeline.data.prepare import load_meta, open_stream
from pipeline.data.sources import check_same_vocabulary, data_sources
from pipeline.errors import DataError
from pipeline.evaluation.benchmarks import load_examples, parse_benchmarks, run_benchmark
from pipeline.evaluation.lm_metrics import LMMetrics, evaluate_tokens, mixture_metrics
from pipeline.evaluation.model_source import LoadedModel, open_model
from pipeline.evaluation.output import write_metrics
from pipeline.evaluation.samples import generate_samples, write_samples
from pipeline.evaluation.tracking_hook import log_to_tracking, resolve_tracking_uri
from pipeline.hashing import file_sha256
from pipeline.training.precision import MixedPrecision

logger = logging.getLogger("pipeline.evaluate")

METRICS_FILE = "eval.json"
SAMPLES_FILE = "samples.md"


def metrics_dir(config: Config) -> Path:
    """`<run_dir>/metrics`, shared with the trainer's `train.json`."""
    return Path(config.run_dir) / "metrics"


def default_source(config: Config) -> Path:
    """The model folder the train stage exports: `<run_dir>/model`."""
    return Path(config.run_dir) / "model"


def evaluate_run(
    config: Config,
    source: str | Path | LoadedModel | None = None,
    out_dir: Path | None = None,
    track: bool = True,
) -> dict[str, float]:
    """Evaluate a model and write `eval.json` and `samples.md`; return the numbers.

    `config` supplies the evaluation settings, the validation data (`data.prepared_dir`),
    device, precision and tracking; `source` the model (a model folder, checkpoint, run folder
    or MLflow URI; default `<run_dir>/model`). The files go to `out_dir`, by default
    `<run_dir>/metrics` (the pipeline stage's place); with `track` the numbers are also added
    to the training run's MLflow record. Ad-hoc evaluations pass both (see `placement`).
    """
    if isinstance(source, LoadedModel):
        return _evaluate_loaded(config, source, out_dir, track)
    where = source or default_source(config)
    with open_model(where, config.training.device, resolve_tracking_uri(config)) as loaded:
        return _evaluate_loaded(config, loaded, out_dir, track)


def _evaluate_loaded(
    config: Config, loaded: LoadedModel, out_dir: Path | None, track: bool
) -> dict[str, float]:
    """`evaluate_run` on a model already open."""
    settings = config.evaluation
    benchmarks = parse_benchmarks(settings.benchmarks, settings.benchmark_dir)
    examples = {b.prefix: load_examples(b, settings.benchmark_limit) for b in benchmarks}
    sources = data_sources(config.data)
    metas = [load_meta(source.folder) for source in sources]
    meta = metas[0]

    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    check_same_vocabulary(sources, metas)  # a mixture's sources share one tokenizer
    if (meta.vocab_size, meta.eot_id) != (tokenizer.vocab_size, tokenizer.eot_id):
        raise DataError(
            f"{sources[0].folder}: its vocabulary ({meta.vocab_size} tokens, end-of-text "
            f"{meta.eot_id}) is not the model's ({tokenizer.vocab_size}, {tokenizer.eot_id} in "
            f"{loaded.source}); evaluate on data prepared with the model's tokenizer"
        )
    data_tokenizer = meta.outputs.get(meta.tokenizer.file)
    if tokenizer.file.is_file() and data_tokenizer not in (None, file_sha256(tokenizer.file)):
        raise DataError(
            f"{sources[0].folder}: prepared with another tokenizer of the same size than the "
            f"model's ({tokenizer.file}); evaluate on data prepared with the model's tokenizer"
        )
    autocast = MixedPrecision.create(config.training.precision, device).autocast
    n_ctx = model.config.n_ctx
    seq_len = min(loaded.config.seq_len, n_ctx)

    per_source: dict[str, LMMetrics] = {}
    for source, source_meta in zip(sources, metas, strict=True):
        started = time.perf_counter()
        lm = evaluate_tokens(
            model, open_stream(source.folder, "val", source_meta), seq_len, settings.batch_size,
            source_meta.splits["val"].text_bytes, settings.max_tokens, autocast,
        )
        seconds = time.perf_counter() - started
        logger.info(
            "validation%s: loss %.4f, ppl %.2f, %.4f bits/byte, acc %.4f over %d tokens "
            "(%.0f tokens/s)", f" ({source.name})" if len(sources) > 1 else "", lm.loss,
            lm.perplexity, lm.bits_per_byte, lm.accuracy, lm.tokens,
            lm.tokens / max(seconds, 1e-9),
        )
        per_source[source.name] = lm
    metrics = mixture_metrics(per_source, {s.name: s.weight for s in sources})
    for benchmark in benchmarks:
        started = time.perf_counter()
        result = run_benchmark(
            benchmark, model, tokenizer, n_ctx, settings.batch_size, autocast,
            examples=examples[benchmark.prefix],
        )
        logger.info("%s: %s (%.1f s)", benchmark.prefix, result, time.perf_counter() - started)
        metrics.update(result)

    samples = generate_samples(model, tokenizer, settings, config.seed)
    out = out_dir or metrics_dir(config)
    write_samples(out / SAMPLES_FILE, samples, settings, loaded.source)
    write_metrics(out / METRICS_FILE, metrics)
    if track:
        log_to_tracking(metrics, config, loaded.tracking_run_id)
    return metrics
