"""Generated text from fixed prompts, written beside the metrics for a person to read.

Numbers say whether a model improved; a few samples say whether it writes anything sensible.
Each prompt gets its own seed (`seed + index`), so a sample is reproducible on its own and does
not change when a prompt is added after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from pipeline.config.schema import EvaluationConfig
from pipeline.data.tokenizer import Tokenizer
from pipeline.evaluation.output import write_text_atomic
from pipeline.generation import generate


@dataclass(frozen=True)
class Sample:
    prompt: str
    completion: str
    seed: int
    tokens: int
    """New tokens generated (fewer than asked when the model ended the text)."""


def generate_samples(
    model: nn.Module, tokenizer: Tokenizer, settings: EvaluationConfig, seed: int
) -> list[Sample]:
    """One completion per `settings.sample_prompts` entry, with the sampling settings given."""
    samples = []
    for index, prompt in enumerate(settings.sample_prompts):
        ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
        new = generate(
            model,  # type: ignore[arg-type]  # a GPT: see pipeline.generation.Generative
            ids,
            settings.sample_max_tokens,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            eot_id=tokenizer.eot_id,
            seed=seed + index,
        )
        samples.append(Sample(prompt, tokenizer.decode(new), seed + index, len(new)))
    return samples


def render_samples(samples: Sequence[Sample], settings: EvaluationConfig, source: str) -> str:
    """Markdown: the settings once, then each prompt in bold followed by its completion."""
    lines = [
        "# Samples",
        "",
        f"Model: `{source}`; temperature {settings.temperature}, top_k {settings.top_k}, "
        f"top_p {settings.top_p}, up to {settings.sample_max_tokens} new tokens.",
        "",
    ]
    for sample in samples:
        lines += [
            f"## Prompt {sample.prompt!r} (seed {sample.seed}, {sample.tokens} tokens)",
            "",
            "```text",
            (sample.prompt + sample.completion).replace("```", "'''"),
            "```",
            "",
        ]
    return "\n".join(lines)


def write_samples(
    path: Path, samples: Sequence[Sample], settings: EvaluationConfig, source: str
) -> Path:
    write_text_atomic(path, render_samples(samples, settings, source))
    return path
