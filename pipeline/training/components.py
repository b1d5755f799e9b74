"""Build what a training run is made of, from the resolved config: nothing here trains.

Kept apart from the loop so that the distributed strategies can wrap the same parts (the model
is plain PyTorch; DDP, DeepSpeed and compilation wrap it from outside, in the strategy's `wrap`,
with `compiled_forward` and `with_attention_backend` from here).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config.schema import Config, TrainingConfig
from pipeline.data.prepared import PreparedMeta, load_meta, open_stream
from pipeline.data.sources import SourceSpec, check_same_vocabulary, data_sources, tokenizer_id
from pipeline.errors import ConfigError, DataError
from pipeline.model import GPT, flops_per_token
from pipeline.training.batching import global_batch_sequences
from pipeline.training.device import resolve_device
from pipeline.training.mixture import MixtureSampler
from pipeline.training.precision import MixedPrecision
from pipeline.training.schedule import WarmupCosine

logger = logging.getLogger("pipeline.train")


@dataclass
class TrainingComponents:
    """The model and everything around it that a step needs."""

    device: torch.device
    model: GPT
    """The plain model; the strategy wraps (and compiles) it into the forward the loop calls."""
    optimizer: torch.optim.Optimizer
    precision: MixedPrecision
    sampler: MixtureSampler
    """Training order over the sources (one source: today's `SequenceSampler` order exactly)."""
    val_sampler: MixtureSampler
    """Each source's val split; evaluation takes fixed windows of each and weights the losses."""
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


def mixture_data_hash(specs: list[SourceSpec], metas: list[PreparedMeta]) -> str:
    """One source: its data_hash (unchanged); a mixture: sha256 over (name, weight, hash)."""
    if len(specs) == 1:
        return metas[0].data_hash
    parts = [
        [spec.name, spec.weight, meta.data_hash] for spec, meta in zip(specs, metas, strict=True)
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def build_samplers(
    specs: list[SourceSpec], metas: list[PreparedMeta], seq_len: int, seed: int
) -> tuple[MixtureSampler, MixtureSampler]:
    """Train and val samplers over the sources' splits; a split too short is a DataError."""
    splits = {}
    for split in ("train", "val"):
        named = []
        for spec, meta in zip(specs, metas, strict=True):
            tokens = open_stream(spec.folder, split, meta)
            if len(tokens) <= seq_len:
                raise DataError(
                    f"{spec.folder}: the {split} split has {len(tokens)} tokens, fewer than one "
                    f"sequence of {seq_len} + 1"
                )
            named.append((spec.name, spec.weight, tokens))
        splits[split] = MixtureSampler.from_tokens(named, seq_len, seed)
    return splits["train"], splits["val"]


def warn_if_gpu_recipe_on_cpu(config: Config, device: torch.device, vocab_size: int) -> None:
    """Say up front, before the model is built, when `training.device` left the choice to the
    machine (`auto`) and it fell back to the CPU: a GPU recipe's step can take hours there,
    with no output until it ends. A config that says `device: cpu` chose it and is not warned."""
    t = config.training
    if device.type != "cpu" or t.device == "cpu":
        return
    seq = config.seq_len
    step_tokens = global_batch_sequences(t, seq) * seq
    step_flops = flops_per_token(config.model, vocab_size, seq) * step_tokens
    logger.warning(
        "warning: training on the CPU (training.device %s, no CUDA device here): model %s, "
        "%s tokens = %.1e FLOPs per optimizer step, which a GPU recipe sizes for GPUs; on a CPU "
        "use --training_config configs/training_configs/cpu_debug.yaml",
        t.device,
        config.model.name,
        f"{step_tokens:,}",
        step_flops,
    )


def build_model(
    config: Config, vocab_size: int, device: torch.device
) -> tuple[GPT, list[dict[str, object]]]:
    """The GPT as the strategy expects it, and its AdamW parameter groups.

    Built directly on the device: a 6.7B model initialised on the CPU first costs a minute.
    fsdp builds on the meta device; its strategy materialises each rank's shards with these
    same values (pipeline.distributed.meta_init). DeepSpeed ZeRO-3 builds under
    `deepspeed.zero.Init` with these same values (pipeline.distributed.zero_init). In those
    two no rank ever holds the whole model. The caller has seeded the generators first.
    """
    from pipeline.distributed import zero_init

    weight_decay = config.training.weight_decay
    if zero_init.builds_partitioned(config):
        model = zero_init.build_partitioned(config, vocab_size, device)
        return model, zero_init.decay_groups(model, weight_decay)
    sharded = config.distributed.strategy == "fsdp"
    with torch.device("meta" if sharded else device):
        model = GPT(config.model, vocab_size)
    return model, model.param_groups(weight_decay)


def build_components(config: Config) -> TrainingComponents:
    """Check the data, then build model, optimizer, precision, samplers and schedule."""
    t = config.training
    specs = data_sources(config.data)
    metas = [load_meta(spec.folder) for spec in specs]
    check_same_vocabulary(specs, metas)
    meta = metas[0]
    vocab_size = meta.vocab_size
    if config.model.vocab_size is not None and config.model.vocab_size != vocab_size:
        raise ConfigError(
            f"model.vocab_size ({config.model.vocab_size}) differs from the prepared data's "
            f"vocabulary ({vocab_size} in {specs[0].folder}/meta.json)"
        )
    seq = config.seq_len
    sampler, val_sampler = build_samplers(specs, metas, seq, config.seed)

    device = resolve_device(t.device)
    warn_if_gpu_recipe_on_cpu(config, device, vocab_size)
    if t.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("training.precision: bf16 is not supported on this GPU; use fp16")
    seed_everything(config.seed)
    model, param_groups = build_model(config, vocab_size, device)
    model.set_gradient_checkpointing(t.gradient_checkpointing, t.gradient_checkpointing_blocks)
    model.set_loss_chunking(t.loss_chunk_tokens)
    optimizer = torch.optim.AdamW(
        param_groups,
        lr=t.lr,
        betas=t.betas,
        eps=t.eps,
        fused=device.type == "cuda",
    )
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
        optimizer=optimizer,
        precision=MixedPrecision.create(t.precision, device),
        sampler=sampler,
        val_sampler=val_sampler,
        schedule=schedule,
        vocab_size=vocab_size,
        tokenizer_id=tokenizer_id(meta),
        data_hash=mixture_data_hash(specs, metas),
        flops_per_token=flops_per_token(config.model, vocab_size, seq),
    )
