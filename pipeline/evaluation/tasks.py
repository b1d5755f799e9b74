"""Zero-shot tasks in their public JSONL formats, chosen by name from a registry.

Every task reduces to "which continuation does the model find most likely", scored by
`scoring.score_requests`, following the GPT-3 paper (section 2.4) and EleutherAI's
lm-evaluation-harness so the numbers are comparable with theirs:

- `lambada` (`{"text": ...}`, e.g. lambada_openai's test set): the target is the last word
  (after the last space), scored as " word" given the text before it. `acc`: greedy decoding
  reproduces every token of the word; `ppl`: exp of minus the mean per-example log-likelihood
  of the word (a per-word perplexity, as the harness reports it).
- `hellaswag` (`ctx`, `endings`, `label`; `activity_label` used when present): the query is
  "activity_label: ctx" cleaned as the harness does (WikiHow "[title]" and "[header]" markers
  removed), each ending is a continuation after a space.
- `multiple_choice` (`context`, `choices`, `label`): any task of that shape; a space joins
  context and choice unless one side already has whitespace there, or the context is empty.

Multiple-choice tasks report `acc` (highest summed log-likelihood) and `acc_norm`, the
log-likelihood divided by the continuation's length in characters, which is the harness's
`acc_norm`. Per character rather than per token so the figure does not depend on the tokenizer
and can be compared across models with different vocabularies. Ties go to the first choice.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from pipeline.data.tokenizer import Tokenizer
from pipeline.errors import ConfigError, DataError
from pipeline.evaluation.scoring import Request, Score
from pipeline.evaluation.task_files import Record


@dataclass(frozen=True)
class Example:
    """One item: a context and the candidate continuations (text); `label` is the right one."""

    context: str
    choices: tuple[str, ...]
    label: int
    where: str


# --------------------------------------------------------------------------- parsers


def parse_lambada(record: Record) -> Example:
    text = record.string("text").strip()
    context, space, word = text.rpartition(" ")
    if not space or not context.strip() or not word:
        raise record.error("field 'text' needs a context and a last word separated by a space")
    return Example(context, (" " + word,), 0, record.where)


def _clean_hellaswag(text: str) -> str:
    """The harness's preprocessing of WikiHow artifacts in HellaSwag."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def parse_hellaswag(record: Record) -> Example:
    ctx = record.string("ctx")
    activity = record.fields.get("activity_label")
    query = f"{activity}: {ctx}" if isinstance(activity, str) and activity.strip() else ctx
    endings = [_clean_hellaswag(e) for e in record.strings("endings")]
    if any(not e for e in endings):
        raise record.error("an ending is empty after removing bracketed markers")
    label = record.label("label", len(endings))
    return Example(_clean_hellaswag(query), tuple(" " + e for e in endings), label, record.where)


def parse_multiple_choice(record: Record) -> Example:
    context = record.string("context", allow_empty=True)
    choices = record.strings("choices")
    label = record.label("label", len(choices))
    joined = tuple(
        c if not context or context[-1].isspace() or c[0].isspace() else " " + c for c in choices
    )
    return Example(context, joined, label, record.where)


# --------------------------------------------------------------------------- aggregation


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda j: (values[j], -j))


def aggregate_cloze(examples: Sequence[Example], scores: Sequence[Sequence[Score]]) -> dict:
    """LAMBADA: greedy accuracy and per-word perplexity of the single continuation."""
    logliks = [s[0].loglik for s in scores]
    mean_nll = -sum(logliks) / len(logliks)
    return {
        "acc": sum(s[0].greedy for s in scores) / len(scores),
        "ppl": math.exp(mean_nll) if mean_nll < 700 else math.inf,
    }


def aggregate_choice(examples: Sequence[Example], scores: Sequence[Sequence[Score]]) -> dict:
    """Accuracy by summed log-likelihood and by log-likelihood per character."""
    hits = hits_norm = 0
    for example, choice_scores in zip(examples, scores, strict=True):
        raw = [s.loglik for s in choice_scores]
        norm = [s.loglik / len(c) for s, c in zip(choice_scores, example.choices, strict=True)]
        hits += _argmax(raw) == example.label
        hits_norm += _argmax(norm) == example.label
    return {"acc": hits / len(examples), "acc_norm": hits_norm / len(examples)}


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class TaskSpec:
    """How to read one task's lines and how to turn its scores into metrics."""

    name: str
    parse: Callable[[Record], Example]
    aggregate: Callable[[Sequence[Example], Sequence[Sequence[Score]]], dict[str, float]]
    fields: str
    """The JSONL fields it reads, for help texts and errors."""


TASKS: Mapping[str, TaskSpec] = MappingProxyType({
    "lambada": TaskSpec("lambada", parse_lambada, aggregate_cloze, "text"),
    "hellaswag": TaskSpec("hellaswag", parse_hellaswag, aggregate_choice, "ctx, endings, label"),
    "multiple_choice": TaskSpec(
        "multiple_choice", parse_multiple_choice, aggregate_choice, "context, choices, label"
    ),
})


def task_spec(name: str) -> TaskSpec:
    spec = TASKS.get(name)
    if spec is None:
        raise ConfigError(f"unknown benchmark {name!r}; known: {', '.join(TASKS)}")
    return spec


def build_requests(example: Example, tokenizer: Tokenizer) -> list[Request]:
    """Token requests of an example: one per choice, sharing the encoded context.

    Whitespace at the end of the context moves to the front of each continuation, so a word
    and its leading space form one token as in running text. An empty context becomes the
    end-of-text token, the model's "start of document".
    """
    context = example.context.rstrip()
    moved = example.context[len(context) :]
    context_ids = tuple(tokenizer.encode(context)) or (tokenizer.eot_id,)
    requests = []
    for choice in example.choices:
        continuation = tuple(tokenizer.encode(moved + choice))
        if not continuation:
            raise DataError(f"{example.where}: a choice encodes to no tokens")
        requests.append(Request(context_ids, continuation))
    return requests
