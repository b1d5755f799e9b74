"""Autoregressive text generation with temperature, top-k and top-p sampling and a KV cache.

Works on token ids only (tokenizing is the caller's job) and on any model that behaves like
`pipeline.model.GPT` (see `Generative`). With the cache, the prompt is run once and every new
token costs one position; without it, every step recomputes the whole (cropped) context, which
is the reference the cache must reproduce exactly.

Context limit: the position embedding covers `n_ctx` positions. Once prompt plus generated text
exceed `n_ctx`, each step runs the model uncached over the last `n_ctx` tokens (a sliding
window shifts every position, so cached keys cannot be reused). Generation therefore never stops
early and matches uncached generation token for token; it is just slower past `n_ctx`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from pipeline.config.schema import ModelConfig


class Generative(Protocol):
    """What generation needs from a model: its config, a cache factory and a cached forward."""

    config: ModelConfig
    training: bool

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def train(self, mode: bool = True) -> Any: ...

    def new_kv_cache(self, batch_size: int = 1) -> Any: ...

    def __call__(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        kv_cache: Any = None,
        start_pos: int = 0,
        last_only: bool = False,
    ) -> tuple[Tensor, Tensor | None]: ...


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to -inf every logit outside the top `top_k` and outside the top-`top_p` nucleus.

    The nucleus is the smallest set of most likely tokens whose probabilities sum to at least
    `top_p`; the most likely token always survives, so `top_p` near 0 means greedy. Works over
    the last dimension of any shape; ties at the k-th value are all kept.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_token(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """One token id from the 1-D `logits` of the next position; temperature 0 is argmax."""
    if temperature == 0.0:
        return int(torch.argmax(logits))
    scaled = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _check_arguments(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")


@torch.inference_mode()
def iter_generate(
    model: Generative,
    prompt_ids: Sequence[int] | Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eot_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield new token ids one at a time (for streaming); see `generate` for the arguments.

    The model is put in eval mode while generating and given back its mode afterwards.
    """
    _check_arguments(max_new_tokens, temperature, top_k, top_p)
    tokens = prompt_ids.tolist() if isinstance(prompt_ids, Tensor) else [int(t) for t in prompt_ids]
    if not tokens:
        raise ValueError("the prompt must hold at least one token")
    device = next(model.parameters()).device
    n_ctx = model.config.n_ctx
    rng = torch.Generator(device=device)
    if seed is None:
        rng.seed()
    else:
        rng.manual_seed(seed)

    was_training = model.training
    model.train(False)
    try:
        cache = model.new_kv_cache(batch_size=1) if use_cache else None
        cached = 0  # tokens[:cached] sit in the cache at positions [0, cached)
        for _ in range(max_new_tokens):
            if cache is not None and len(tokens) <= n_ctx:
                idx = torch.tensor([tokens[cached:]], dtype=torch.long, device=device)
                logits, _ = model(idx, kv_cache=cache, start_pos=cached, last_only=True)
                cached = len(tokens)
            else:
                idx = torch.tensor([tokens[-n_ctx:]], dtype=torch.long, device=device)
                logits, _ = model(idx, last_only=True)
            token = sample_token(logits[0, -1], temperature, top_k, top_p, rng)
            if eot_id is not None and token == eot_id:
                return
            tokens.append(token)
            yield token
    finally:
        model.train(was_training)


def generate(
    model: Generative,
    prompt_ids: Sequence[int] | Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eot_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> list[int]:
    """The new token ids (the prompt not included) that `model` continues `prompt_ids` with.

    - `temperature`: 0 is greedy (then `top_k`, `top_p` and `seed` do not matter).
    - `top_k`, `top_p`: keep the k most likely tokens, then the nucleus of mass `top_p`.
    - `eot_id`: stop when it is sampled; it is not included in the result.
    - `seed`: a private `torch.Generator` on the model's device, so the same seed gives the
      same tokens and the global RNG is untouched; None draws a fresh seed.
    - `use_cache`: a KV cache makes each token cost one position; off is the slow reference.
    """
    return list(
        iter_generate(
            model,
            prompt_ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eot_id=eot_id,
            seed=seed,
            use_cache=use_cache,
        )
    )
