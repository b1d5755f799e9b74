"""The DeepSpeed strategy: `deepspeed.initialize` around the plain model, ZeRO sharding from
the JSON, the project's config filling its "auto" values (see `deepspeed_config`).

The engine owns precision (bf16/fp16 casts, dynamic loss scaling), gradient clipping and the
optimizer step; the trainer still owns the data, the micro-batch loop (marking the last micro-
batch as the accumulation boundary, so the batch ramp works), the learning rate (set every step
from the token-based schedule) and the loop state, which travels as DeepSpeed client state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint import deepspeed_safe_load
from pipeline.checkpoint.deepspeed_store import DeepSpeedCheckpoints, inspect_tag_dir
from pipeline.config.schema import Config
from pipeline.distributed.comm import Collective
from pipeline.distributed.data_parallel import CollectiveStrategy, seed_rank
from pipeline.distributed.deepspeed_config import read_deepspeed_json, resolve_deepspeed_config
from pipeline.distributed.strategy import CompatibilityCheck, StepResult, Wrapped
from pipeline.distributed.zero_init import decay_groups
from pipeline.errors import ConfigError
from pipeline.model import GPT
from pipeline.training.components import with_attention_backend

logger = logging.getLogger("pipeline.train")


@dataclass
class EnginePrecision:
    """The loop's precision hooks when DeepSpeed owns precision: no autocast, no scaling here."""

    engine: Any
    name: str
    scaler: None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def loss_scale(self) -> float:
        return float(getattr(self.engine.optimizer, "loss_scale", 1.0) or 1.0)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """The loss scaler is part of DeepSpeed's own checkpoint."""


class DeepSpeedStrategy(CollectiveStrategy):
    """ZeRO data parallelism through a DeepSpeed engine."""

    name = "deepspeed"

    def __init__(self, comm: Collective | None = None, *, config: Config) -> None:
        super().__init__(comm, config=config)
        self.engine: Any = None
        self.store: DeepSpeedCheckpoints | None = None
        self.ds_config: dict[str, Any] = {}

    def wrap(self, model: GPT, optimizer: torch.optim.Optimizer, precision: Any) -> Wrapped:
        """`deepspeed.initialize` around the model; the engine's optimizer and precision."""
        import deepspeed

        config = self.config
        t = config.training
        if t.compile:
            raise ConfigError("training.compile is not supported with DeepSpeed here; drop it")
        path = config.distributed.deepspeed_config
        assert path is not None, "choose_strategy guarantees a DeepSpeed config"
        cuda = next(model.parameters()).device.type == "cuda"
        self.ds_config = resolve_deepspeed_config(
            read_deepspeed_json(path), config, self.world_size, path, cuda
        )
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # the trainer reports progress
        seed_rank(config.seed, self.rank)
        own_optimizer = "optimizer" in self.ds_config
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=None if own_optimizer else optimizer,
            model_parameters=decay_groups(model, t.weight_decay) if own_optimizer else None,
            config=self.ds_config,
        )
        deepspeed_safe_load.install(self.engine)  # no pickled code runs on resume
        if self.is_main:
            resolved = Path(config.run_dir) / "deepspeed_config.json"
            resolved.write_text(json.dumps(self.ds_config, indent=2, sort_keys=True) + "\n")
        return Wrapped(
            forward=with_attention_backend(self.engine, t.attention_backend),
            optimizer=self.engine.optimizer,  # param_groups: where the trainer sets the lr
            precision=EnginePrecision(self.engine, t.precision),
        )

    def checkpoint_store(self, directory: Path, keep: int) -> DeepSpeedCheckpoints:
        self.store = DeepSpeedCheckpoints(directory, keep, self.comm)
        return self.store

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        """Only the last micro-batch is a boundary: ZeRO reduces and the engine steps there."""
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already divided by its accumulation steps (which the batch ramp varies).
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> StepResult:
        """Clip and update through the engine. A step the engine skipped is an fp16 overflow
        (its loss scaler) or, in bf16/fp32, a non-finite gradient for the trainer's policy."""
        skipped = self.engine.skipped_steps
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else math.nan
        if self.engine.skipped_steps == skipped:
            return StepResult(grad_norm, applied=True)
        return StepResult(
            grad_norm, applied=False, overflow=self.config.training.precision == "fp16"
        )

    def save(self, loop_state: dict[str, Any], step: int) -> Path:
        assert self.store is not None, "checkpoint_store() first"
        return self.store.save(self.engine, self.with_rank_rng(loop_state, always=True), step)

    def prepare_checkpoint_buffers(self, loop_state: dict[str, Any]) -> None:
        """DeepSpeed writes its checkpoints itself, synchronously."""

    def flush_checkpoints(self, collective: bool = True) -> None:
        """Nothing is written in the background."""

    def load(self, which: str | Path, check: CompatibilityCheck) -> tuple[dict[str, Any], Path]:
        """Rank 0 picks and checks the checkpoint (shape, tokenizer) before any rank loads it."""
        store = self.store
        assert store is not None, "checkpoint_store() first"

        def choose() -> Path:
            tag_dir = store.resolve(which)
            check(inspect_tag_dir(tag_dir), tag_dir)  # every file read weights-only, rank 0 first
            return tag_dir

        tag_dir = self.main_only(choose)
        return store.restore(self.engine, tag_dir), tag_dir

    def close(self) -> None:
        """Unhook the engine (hooks, buffers) while its process groups still exist."""
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None

    def export_model(self, model: GPT) -> GPT | None:
        """The fp32 master weights gathered from the ZeRO partitions into a plain model on rank 0.

        Every rank takes part (each gather is a collective); in bf16/fp16 the engine's module
        holds 16-bit copies, so exporting it directly would lose the master precision.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        full: dict[str, torch.Tensor] = {}
        for name, param in model.named_parameters():
            value = safe_get_full_fp32_param(param)
            if value is None:
                if param.dtype != torch.float32:
                    raise RuntimeError(f"no fp32 master copy of {name} ({param.dtype})")
                value = param.detach()  # fp32 without ZeRO: the module holds the masters
            if self.is_main:
                full[name] = value.detach().float().cpu()
        if not self.is_main:
            return None
        plain = GPT(model.config, model.vocab_size)
        missing, unexpected = plain.load_state_dict(full, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise RuntimeError(f"export mismatch: missing {missing}, unexpected {unexpected}")
        plain.tie_weights()
        return plain
