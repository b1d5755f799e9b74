"""Build what a training run is made of, from the resolved config: nothing here trains.

Kept apart from the loop so that the distributed strategies can wrap the same parts (the model
is plain PyTorch; DDP, DeepSpeed and compilation wrap it from outside).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config.schema import Config, TrainingConfig
from pipeline.data.prepare import load_meta, open_tokens
from pipeline.errors import ConfigError, DataError
from pipeline.model import GPT, flops_per_token
from pipeline.training.batching import global_batch_sequences
from pipeline.training.precision import MixedPrecision
from pipeline.training.sampler import SequenceSampler
from pipeline.training.schedule import WarmupCosine

logger = logging.getLogger("pipeline.train")


@dataclass
class TrainingComponents:
    """The model and everything around it that a step needs."""

    device: torch.device
    model: GPT
    forward: Callable[..., Any]
    """The model's forward, compiled when training.compile is set."""
    optimizer: torch.optim.Optimizer
    precision: MixedPrecision
    sampler: SequenceSampler
    val_sampler: SequenceSampler
    schedule: WarmupCosine
    vocab_size: int
    tokenizer_id: str
    """Identifies the tokenizer (kind and file hash) so a resume cannot mix vocabularies."""
    data_hash: str
    flops_per_token: float

    def to_device(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Copy a batch to the device; pinned and asynchronous on CUDA."""
        if self.device.type != "cuda":
            return tensors
        return tuple(t.pin_memory().to(self.device, non_blocking=True) for t in tensors)


SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}
"""training.attention_backend -> the name of torch.nn.attention.SDPBackend's member."""


def compiled_forward(model: GPT, training: TrainingConfig) -> Callable[..., Any]:
    """The model's forward, compiled as training.compile/compile_scope say.

    `blocks` compiles each transformer block in place (regional compilation): the blocks are
    identical, so one compilation serves them all and a large model starts in seconds.
    """
    if not training.compile:
        return model
    if training.compile_scope == "blocks":
        for block in model.h:
            block.compile()
        return model
    return torch.compile(model)


def with_attention_backend(forward: Callable[..., Any], backend: str) -> Callable[..., Any]:
    """Run `forward` with only the chosen attention kernel allowed (`auto`: PyTorch's pick)."""
    if backend == "auto":
        return forward
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = getattr(SDPBackend, SDPA_BACKENDS[backend])

    def forward_with_backend(*args: Any, **kwargs: Any) -> Any:
        with sdpa_kernel(chosen):
            return forward(*args, **kwargs)

    return forward_with_backend


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; asking for CUDA without one is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"training.device: {name!r} requested but no CUDA device is available")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from the run's one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def total_tokens(config: Config, batch_tokens: int) -> int:
    """Tokens the run will train on: max_tokens, else max_steps full batches."""
    t = config.training
    candidates = [t.max_tokens] if t.max_tokens is not None else []
    if t.max_steps is not None:
        candidates.append(t.max_steps * batch_tokens)
    return min(candidates)


def build_components(config: Config) -> TrainingComponents:
    """Check the data, then build model, optimizer, precision, samplers and schedule."""
    t = config.training
    meta = load_meta(config.data.prepared_dir)
    vocab_size = meta.vocab_size
    if config.model.vocab_size is not None and config.model.vocab_size != vocab_size:
        raise ConfigError(
            f"model.vocab_size ({config.model.vocab_size}) differs from the prepared data's "
            f"vocabulary ({vocab_size} in {config.data.prepared_dir}/meta.json)"
        )
    seq = config.seq_len
    train_tokens = open_tokens(config.data.prepared_dir, "train", meta)
    val_tokens = open_tokens(config.data.prepared_dir, "val", meta)
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        if len(tokens) <= seq:
            raise DataError(
                f"{config.data.prepared_dir}/{split}.bin has {len(tokens)} tokens, fewer than one "
                f"sequence of {seq} + 1"
            )

    device = resolve_device(t.device)
    if t.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("training.precision: bf16 is not supported on this GPU; use fp16")
    seed_everything(config.seed)
    # Built directly on the device: a 6.7B model initialised on the CPU first costs a minute.
    with torch.device(device):
        model = GPT(config.model, vocab_size)
    model.set_gradient_checkpointing(t.gradient_checkpointing, t.gradient_checkpointing_blocks)
    model.set_loss_chunking(t.loss_chunk_tokens)
    optimizer = torch.optim.AdamW(
        model.param_groups(t.weight_decay),
        lr=t.lr,
        betas=t.betas,
        eps=t.eps,
        fused=device.type == "cuda",
    )
    forward = with_attention_backend(compiled_forward(model, t), t.attention_backend)
    batch_tokens = global_batch_sequences(t, seq) * seq
    schedule = WarmupCosine(
        peak=t.lr,
        warmup_tokens=t.warmup_tokens,
        decay_tokens=t.decay_tokens or total_tokens(config, batch_tokens),
        min_ratio=t.min_lr_ratio,
    )
    return TrainingComponents(
        device=device,
        model=model,
        forward=forward,
        optimizer=optimizer,
        precision=MixedPrecision.create(t.precision, device),
        sampler=SequenceSampler(train_tokens, seq, config.seed),
        val_sampler=SequenceSampler(val_tokens, seq, config.seed),
        schedule=schedule,
        vocab_size=vocab_size,
        tokenizer_id=f"{meta.tokenizer.kind}:{meta.outputs.get(meta.tokenizer.file, '?')}",
        data_hash=meta.data_hash,
        flops_per_token=flops_per_token(config.model, vocab_size, seq),
    )
