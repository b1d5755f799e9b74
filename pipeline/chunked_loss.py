"""Output layer and cross-entropy in chunks of tokens, so the full logits never exist.

At 125M with 64 x 1024 tokens per micro-batch the logits alone are 65k x 50304 values: 6.6 GB
in bf16, 13 GB in fp32, about as much as the rest of the activations. This computes the loss
chunk by chunk and, while each chunk's logits are at hand, also their gradients with respect to
the hidden states and the output weight (softmax minus one-hot). Backward then only scales
those by the incoming gradient. Peak memory of the head drops from the whole batch's logits to
one chunk's; the FLOPs are those of the plain head (no recomputation).

Plain PyTorch (an autograd Function); under autocast the matrix products run in the autocast
dtype like the rest of the model, the softmax in fp32 as `F.cross_entropy` does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean over valid targets of cross_entropy(hidden @ weight[:vocab].T, targets)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, vocab: int, chunk: int
    ) -> Tensor:
        dtype = torch.get_autocast_dtype("cuda" if hidden.is_cuda else "cpu")
        compute = dtype if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
        w = weight[:vocab].to(compute)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(vocab, weight.shape[1], dtype=torch.float32, device=weight.device)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        valid_count = (targets != -1).sum()
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(compute)
            t = targets[start : start + chunk]
            logits = (h @ w.T).float()
            valid = t != -1
            safe = t.clamp(min=0)
            log_z = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            loss_sum += torch.where(valid, log_z - picked, 0.0).sum()
            grad_logits = torch.softmax(logits, dim=-1)
            grad_logits.scatter_add_(1, safe[:, None], -torch.ones_like(picked)[:, None])
            grad_logits *= valid[:, None]
            grad_logits = grad_logits.to(compute)
            grad_hidden[start : start + chunk] = (grad_logits @ w).to(hidden.dtype)
            grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight, valid_count)
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        return loss_sum / valid_count.clamp(min=1)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_hidden, grad_weight, valid_count = ctx.saved_tensors
        scale = grad_loss / valid_count.clamp(min=1)
        full = torch.zeros(ctx.weight_shape, dtype=ctx.weight_dtype, device=grad_weight.device)
        full[: grad_weight.shape[0]] = (grad_weight * scale).to(ctx.weight_dtype)
        return (grad_hidden * scale).to(grad_hidden.dtype), full, None, None, None


def chunked_lm_loss(
    hidden: Tensor, weight: Tensor, targets: Tensor, vocab: int, chunk: int
) -> Tensor:
    """Mean cross-entropy of `hidden (N, d) @ weight[:vocab].T` against `targets (N,)` (-1:
    ignored), computed `chunk` tokens at a time. Without gradients (evaluation) only the loss
    is computed."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, vocab, chunk)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        logits = hidden[start : start + chunk] @ weight[:vocab].T
        total += torch.nn.functional.cross_entropy(
            logits.float(), targets[start : start + chunk], ignore_index=-1, reduction="sum"
        )
    return total / (targets != -1).sum().clamp(min=1)
