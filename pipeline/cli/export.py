"""`gpt3 export`: write a trained model in another ecosystem's format.

    gpt3 export --format hf --model_checkpoint experiments/tiny/model --output exports/tiny-hf

`--format hf` writes a folder that `transformers.GPT2LMHeadModel.from_pretrained` and
`AutoTokenizer.from_pretrained` load (config.json, model.safetensors, tokenizer files).
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--format", "fmt", default="hf", show_default=True,
              help="Export format (known: hf).")
@click.option("--model_checkpoint", "source", required=True,
              help="Model folder, checkpoint (.pt), run folder, or MLflow URI.")
@click.option("--output", required=True, type=click.Path(file_okay=False),
              help="Folder to write (must be empty or absent unless --force).")
@click.option("--force", is_flag=True, help="Replace a non-empty --output folder.")
@click.option("--params", "params_file", type=click.Path(dir_okay=False),
              help="params.yaml whose tracking.uri finds runs:/ and models:/ URIs (default: "
                   "./params.yaml if present; MLFLOW_TRACKING_URI wins).")
def export(fmt: str, source: str, output: str, force: bool, params_file: str | None) -> int:
    """Export a trained model (e.g. to a Hugging Face transformers folder)."""
    from pipeline.config.loader import load_config
    from pipeline.config.schema import Config
    from pipeline.evaluation.model_source import open_model
    from pipeline.evaluation.tracking_hook import resolve_tracking_uri
    from pipeline.export import exporter_for

    exporter = exporter_for(fmt)  # an unknown format fails before the model is loaded
    if params_file is None and Path("params.yaml").is_file():
        params_file = "params.yaml"
    config = load_config(params_file=params_file) if params_file else Config()
    with open_model(source, "cpu", resolve_tracking_uri(config)) as loaded:  # download removed
        written = exporter(loaded, Path(output), force)
    click.echo(f"exported {loaded.source} as {fmt} to {written}")
    return 0
