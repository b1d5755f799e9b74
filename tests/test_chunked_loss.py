"""The chunked output layer + cross-entropy against PyTorch's own, values and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_overrides

from pipeline.chunked_loss import chunked_lm_loss
from pipeline.config.loader import load_config
from pipeline.training.run import train


def _inputs(seed: int, tokens: int = 37, d: int = 16, padded: int = 24, vocab: int = 21):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, d, generator=generator, dtype=torch.float64)
    weight = torch.randn(padded, d, generator=generator, dtype=torch.float64) * 0.5
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    targets[::5] = -1  # ignored positions
    return hidden, weight, targets, vocab


def _reference(hidden, weight, targets, vocab):
    return F.cross_entropy(hidden @ weight[:vocab].T, targets, ignore_index=-1)


@pytest.mark.parametrize("chunk", [1, 5, 37, 100])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_gradients_equal_the_plain_head(chunk: int, seed: int) -> None:
    hidden, weight, targets, vocab = _inputs(seed)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = _reference(h1, w1, targets, vocab)
    (expected * 3.0).backward()  # a non-unit incoming gradient
    loss = chunked_lm_loss(h2, w2, targets, vocab, chunk)
    (loss * 3.0).backward()
    # The softmax runs in fp32 (as F.cross_entropy after `.float()` in the model): fp32 accuracy.
    torch.testing.assert_close(loss, expected.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(w2.grad[vocab:]) == 0, "padding rows get no gradient"


def test_without_gradients_only_the_loss_is_computed() -> None:
    hidden, weight, targets, vocab = _inputs(2)
    with torch.no_grad():
        loss = chunked_lm_loss(hidden, weight, targets, vocab, 8)
    torch.testing.assert_close(loss, _reference(hidden, weight, targets, vocab).float())


def test_under_bf16_autocast_it_stays_within_bf16_noise() -> None:
    hidden, weight, targets, vocab = _inputs(3)
    hidden, weight = hidden.float(), weight.float()
    reference = _reference(hidden.double(), weight.double(), targets, vocab)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_lm_loss(h, w, targets, vocab, 8)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32
    assert abs(loss.item() - reference.item()) / reference.item() < 1e-2
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    _reference(h64, w64, targets, vocab).backward()
    for got, expected in ((h.grad, h64.grad), (w.grad, w64.grad)):
        error = (got.double() - expected).norm() / expected.norm()
        assert error < 2e-2, f"gradient off by {error:.2e} (bf16 noise is ~1e-2)"


def test_training_with_a_chunked_loss_follows_the_plain_one(
    prepared_dir: Path, tmp_path: Path
) -> None:
    plain = train(
        load_config(overrides=tiny_overrides(prepared_dir, tmp_path / "plain")), console=False
    )
    extra = {"training.loss_chunk_tokens": 100}
    chunked = train(
        load_config(overrides=tiny_overrides(prepared_dir, tmp_path / "chunked", extra)),
        console=False,
    )
    for step, loss in plain.losses.items():
        assert chunked.losses[step] == pytest.approx(loss, rel=1e-4)
    for step, loss in plain.val_losses.items():
        assert chunked.val_losses[step] == pytest.approx(loss, rel=1e-4)
