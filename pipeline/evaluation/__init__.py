"""Evaluation of trained models: language-model metrics, zero-shot tasks, samples.

- `model_source`: open a model folder, checkpoint, run folder or MLflow URI as a `LoadedModel`.
- `lm_metrics`: loss, perplexity, bits per byte and next-token accuracy over a token split.
- `scoring`: log-likelihood of continuations, the primitive of every zero-shot task.
- `tasks` / `task_files` / `benchmarks`: LAMBADA, HellaSwag and generic multiple choice from
  local JSONL files, chosen by name from a registry.
- `samples`: generated text from fixed prompts, for people to read.
- `output`: atomic writes of `eval.json` (flat numbers, a DVC metric) and the samples.
- `tracking_hook`: the one place evaluation numbers go to MLflow.
- `run`: `evaluate_run`, the evaluate stage.

Import the submodules directly; this package imports nothing so that `pipeline.export` and
the CLI can use `model_source` without loading the whole evaluation stack.
"""
