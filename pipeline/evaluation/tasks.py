"""Zero-shot tasks in their public JSONL formats, chosen by name from a registry.

Every task reduces to "which continuation does the model find most likely", scored by
`scoring.score_requests`, following the GPT-3 paper (section 2.4) and EleutherAI's
lm-evaluation-harness so the numbers are comparable with theirs:

- `lambada` (`{"text": ...}`, e.g. lambada_openai's test set): the target is the last word
  (after the last space), scored as " word" given the text before it, as the harness's
  `lambada_openai` splits it. `acc`: greedy decoding reproduces every token of the word;
  `ppl`: exp of minus the mean per-example log-likelihood of the word (a per-word perplexity,
  as the harness reports it).
- `hellaswag` (`endings`, `label`, and `activity_label`, `ctx_a`, `ctx_b` as the public files
  have them): the query is the harness's, `activity_label + ": " + ctx_a + " " +
  ctx_b.capitalize()`, cleaned of WikiHow "[title]"/"[header]" markers; a file without
  `ctx_a`/`ctx_b` uses `ctx` in their place. Each ending is a continuation after a space.
- `multiple_choice` (`context`, `choices`, `label`): any task of that shape; a space joins
  context and choice unless one side already has whitespace there, or the context is empty.

Multiple-choice tasks report `acc` (highest summed log-likelihood) and `acc_norm`, the
log-likelihood divided by the length in characters of the choice as the task states it,
without the space put before it: the harness's definition (`len(choice)` of `doc_to_choice`,
the target delimiter not counted). Per character rather than per token so the figure does not
depend on the tokenizer. Ties go to the first choice. Requests are tokenized as the harness
does: the context alone, and the continuation as what encoding context + continuation adds.
`gpt3 evaluate --harness lm-eval` runs the harness itself on the same files (`harness.py`),
and tests/test_harness.py checks the two agree item by item.
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
    """The continuations scored, with the space (if any) that joins each to the context."""
    label: int
    where: str
    norm_lengths: tuple[int, ...]
    """`acc_norm`'s divisor per choice: its length in characters without the joining space."""


# --------------------------------------------------------------------------- parsers


def parse_lambada(record: Record) -> Example:
    text = record.string("text")
    context, space, word = text.rpartition(" ")
    if not space or not context.strip() or not word.strip():
        raise record.error("field 'text' needs a context and a last word separated by a space")
    return Example(context, (" " + word,), 0, record.where, (len(word),))


def _clean_hellaswag(text: str) -> str:
    """The harness's preprocessing of WikiHow artifacts in HellaSwag."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def parse_hellaswag(record: Record) -> Example:
    if "ctx_a" in record.fields and "ctx_b" in record.fields:
        ctx_b = record.string("ctx_b", allow_empty=True)
        ctx = record.string("ctx_a") + " " + ctx_b.capitalize()
    else:
        ctx = record.string("ctx")
    activity = record.fields.get("activity_label")
    query = f"{activity}: {ctx}" if isinstance(activity, str) and activity.strip() else ctx
    endings = [_clean_hellaswag(e) for e in record.strings("endings")]
    if any(not e for e in endings):
        raise record.error("an ending is empty after removing bracketed markers")
    label = record.label("label", len(endings))
    continuations = tuple(" " + e for e in endings)
    lengths = tuple(len(e) for e in endings)
    return Example(_clean_hellaswag(query), continuations, label, record.where, lengths)


def parse_multiple_choice(record: Record) -> Example:
    context = record.string("context", allow_empty=True)
    choices = record.strings("choices")
    label = record.label("label", len(choices))
    joined = tuple(
        c if not context or context[-1].isspace() or c[0].isspace() else " " + c for c in choices
    )
    return Example(context, joined, label, record.where, tuple(len(c) for c in choices))


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
        lengths = example.norm_lengths
        norm = [s.loglik / n for s, n in zip(choice_scores, lengths, strict=True)]
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

    As lm-evaluation-harness encodes a pair: whitespace at the end of the context moves to the
    front of each continuation (a word and its leading space form one token, as in running
    text); the continuation's tokens are those that encoding context + continuation adds after
    the context's own tokens. An empty context becomes the end-of-text token, the model's
    "start of document", and the continuation is encoded alone.
    """
    context = example.context.rstrip()
    moved = example.context[len(context) :]
    context_ids = tuple(tokenizer.encode(context))
    requests = []
    for choice in example.choices:
        if context_ids:
            whole = tokenizer.encode(context + moved + choice)
            continuation = tuple(whole[len(context_ids) :])
        else:
            continuation = tuple(tokenizer.encode(moved + choice))
        if not continuation:
            raise DataError(f"{example.where}: a choice encodes to no tokens")
        requests.append(Request(context_ids or (tokenizer.eot_id,), continuation))
    return requests
