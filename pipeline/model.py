"""The GPT model: GPT-3's architecture as GPT-2 defined it, in plain single-device PyTorch.

Learned token and position embeddings, pre-LayerNorm blocks of causal self-attention and a GELU
MLP, a final LayerNorm and an output head tied to the token embedding. GPT-3's alternating
locally banded sparse attention is not reproduced: every layer is dense, as in GPT-2.

This module knows nothing of distributed training, mixed precision or tracking: parallelism,
autocast and `torch.compile` wrap the model from outside, so the same module runs on a laptop
CPU and under DeepSpeed. Its state-dict keys are plain (`wte.weight`, `h.0.attn.c_attn.weight`,
...) and follow GPT-2's names so that exporting to Hugging Face is a rename-free mapping
(`Linear` weights must be transposed for GPT-2's `Conv1D`, and the padded vocabulary rows
dropped).

Counting helpers (`count_parameters`, `flops_per_token`) work from the config alone, so the
trainer can state the cost of a 175B run without allocating it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline.chunked_loss import chunked_lm_loss
from pipeline.config.schema import ModelConfig

VOCAB_MULTIPLE = 64
"""Embedding rows are padded to a multiple of this so the output matmul is tensor-core aligned."""

INIT_STD = 0.02
"""GPT-2's standard deviation for every weight matrix and embedding."""


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """The embedding's row count: `vocab_size` rounded up to a multiple of `multiple`."""
    return -(-vocab_size // multiple) * multiple


def _resolved_shape(config: ModelConfig) -> tuple[int, int]:
    """`(d_head, d_ff)` with the schema's defaults applied, for configs built without validation."""
    d_head = config.d_head or config.d_model // config.n_head
    d_ff = config.d_ff or 4 * config.d_model
    return d_head, d_ff


def count_parameters(
    config: ModelConfig,
    vocab_size: int,
    include_position_embedding: bool = True,
    count_padding: bool = False,
) -> int:
    """Parameters of `GPT(config, vocab_size)` computed from shapes alone (no allocation).

    The tied output head adds nothing. Padding rows are left out by default because they carry
    no information; `count_padding=True` gives the number of elements actually allocated.
    """
    d, n_layer = config.d_model, config.n_layer
    d_head, d_ff = _resolved_shape(config)
    inner = config.n_head * d_head
    rows = padded_vocab_size(vocab_size) if count_padding else vocab_size
    per_layer = (
        (2 * d)  # ln_1
        + (d * 3 * inner + 3 * inner)  # attn.c_attn
        + (inner * d + d)  # attn.c_proj
        + (2 * d)  # ln_2
        + (d * d_ff + d_ff)  # mlp.c_fc
        + (d_ff * d + d)  # mlp.c_proj
    )
    total = rows * d + n_layer * per_layer + 2 * d  # wte, blocks, ln_f
    if include_position_embedding:
        total += config.n_ctx * d
    return total


def flops_per_token(config: ModelConfig, vocab_size: int, seq_len: int) -> int:
    """Training FLOPs per token (forward and backward): `6N + 12 * n_layer * d_model * seq_len`.

    N excludes the position embedding (a lookup, not a matmul) but includes the tied token
    embedding, whose matmul is the output head. The second term is attention's score and value
    products (PaLM, appendix B). This is the numerator of MFU.
    """
    n = count_parameters(config, vocab_size, include_position_embedding=False)
    return 6 * n + 12 * config.n_layer * config.d_model * seq_len


@dataclass
class KVCache:
    """Keys and values of every layer, preallocated to `max_len` positions.

    With it, generating a token costs one position of compute instead of the whole prefix.
    Tensors are `(batch, n_head, max_len, d_head)`; positions `[0, start_pos + T)` are valid
    after a forward of `T` tokens at `start_pos`. The caller tracks the position.
    """

    keys: list[Tensor]
    values: list[Tensor]

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> KVCache:
        """Zeroed buffers for `config`'s layers and heads."""
        d_head, _ = _resolved_shape(config)
        shape = (batch_size, config.n_head, max_len, d_head)
        keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        return cls(keys=keys, values=values)

    @property
    def max_len(self) -> int:
        """Positions the cache can hold."""
        return self.keys[0].shape[2]

    def update(self, layer: int, k: Tensor, v: Tensor, start_pos: int) -> tuple[Tensor, Tensor]:
        """Store `k`, `v` at `[start_pos, start_pos + T)` and return the keys/values so far."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to fill up to {end}")
        self.keys[layer][:, :, start_pos:end] = k
        self.values[layer][:, :, start_pos:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through `scaled_dot_product_attention` (flash on GPU)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        d_head, _ = _resolved_shape(config)
        self.layer = layer
        self.n_head = config.n_head
        self.d_head = d_head
        self.inner = config.n_head * d_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.d_model, 3 * self.inner)
        self.c_proj = nn.Linear(self.inner, config.d_model)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, kv_cache: KVCache | None = None, start_pos: int = 0) -> Tensor:
        """Attend causally; with a cache, to every cached position before this chunk too."""
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split(self.inner, dim=2)
        q = q.view(b, t, self.n_head, self.d_head).transpose(1, 2)
        k = k.view(b, t, self.n_head, self.d_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, self.d_head).transpose(1, 2)
        if kv_cache is None:
            dropout_p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            k, v = kv_cache.update(self.layer, k, v, start_pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=_cached_mask(t, start_pos, x))
        y = y.transpose(1, 2).contiguous().view(b, t, self.inner)
        return self.resid_dropout(self.c_proj(y))


def _cached_mask(t: int, start_pos: int, like: Tensor) -> Tensor | None:
    """The mask for `t` queries at `start_pos` over `start_pos + t` cached keys.

    One query may see every cached key, so it needs no mask (the common decoding step). Several
    queries need the causal mask aligned to the bottom right: query `i` sees keys `<= start_pos
    + i`. (`is_causal=True` would align it to the top left, which is wrong once keys outnumber
    queries.)
    """
    if t == 1:
        return None
    q_pos = torch.arange(start_pos, start_pos + t, device=like.device).unsqueeze(1)
    k_pos = torch.arange(start_pos + t, device=like.device).unsqueeze(0)
    return k_pos <= q_pos


class MLP(nn.Module):
    """Position-wise feed-forward: d_model -> d_ff -> d_model with GPT-2's tanh GELU."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        _, d_ff = _resolved_shape(config)
        self.c_fc = nn.Linear(config.d_model, d_ff)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(d_ff, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: `x + attn(ln(x))`, then `x + mlp(ln(x))`."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, kv_cache: KVCache | None = None, start_pos: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, start_pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """A GPT-2/3 decoder. `forward` returns `(logits, loss)` with logits over the true vocabulary.

    `vocab_size` is the tokenizer's real size (the trainer reads it from the prepared data); it
    defaults to `config.vocab_size`. The token embedding has `padded_vocab_size(vocab_size)` rows
    so the output matmul is aligned, but logits are sliced back to `vocab_size`, so a padding
    id is never predicted, never enters the softmax and its row never gets a gradient.
    """

    def __init__(self, config: ModelConfig, vocab_size: int | None = None) -> None:
        super().__init__()
        vocab_size = vocab_size if vocab_size is not None else config.vocab_size
        if vocab_size is None:
            raise ValueError("GPT needs a vocab_size: pass it or set config.vocab_size")
        if config.vocab_size is not None and config.vocab_size != vocab_size:
            raise ValueError(
                f"vocab_size {vocab_size} disagrees with config.vocab_size {config.vocab_size}"
            )
        d_head, d_ff = _resolved_shape(config)
        self.config = config.model_copy(
            update={"vocab_size": vocab_size, "d_head": d_head, "d_ff": d_ff}
        )
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size(vocab_size)
        self.gradient_checkpointing = False
        self.checkpointed_blocks = config.n_layer
        self.loss_chunk_tokens: int | None = None
        """When set, the loss is computed this many tokens at a time (`set_loss_chunking`)."""

        self.wte = nn.Embedding(self.padded_vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.n_ctx, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, self.padded_vocab_size, bias=False)
        self.init_weights()

    def tie_weights(self) -> None:
        """Make the output head use the token embedding's Parameter (one tensor, one gradient).

        `Module.to_empty` (after building on the meta device) replaces the two references with
        two separate tensors; `init_weights` calls this first so the tie is always restored.
        """
        self.lm_head.weight = self.wte.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2's initialisation; public so a model built on the meta device can be filled in
        after `to_empty(device=...)`.

        Every matrix and embedding ~ N(0, 0.02); the two residual output projections of each
        block ~ N(0, 0.02 / sqrt(2 * n_layer)) so the residual stream's variance does not grow
        with depth; biases zero; LayerNorm weight one, bias zero; padding rows zero.
        """
        self.tie_weights()
        for name, module in self.named_modules():
            self.init_module(name, module)

    @torch.no_grad()
    def init_module(self, name: str, module: nn.Module) -> None:
        """Initialise one submodule's own parameters (`name` as `named_modules` gives it).

        `init_weights` is this over `named_modules()` in order, so calling it module by module
        in that order draws the same random numbers: `pipeline.distributed.meta_init` uses it to
        fill a model built on the meta device one module at a time, bitwise as `init_weights`.
        """
        if isinstance(module, nn.Linear):
            residual_std = INIT_STD / math.sqrt(2 * self.config.n_layer)
            std = residual_std if name.endswith("c_proj") else INIT_STD
            if module is not self.lm_head:  # tied: initialised as the embedding
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            if module is self.wte:
                module.weight[self.vocab_size :].zero_()  # padding rows (no random draw)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def set_gradient_checkpointing(self, enabled: bool, blocks: int | None = None) -> None:
        """Recompute blocks' activations in backward: memory for about a third more compute.

        `blocks` limits recomputation to the first N blocks (None: every block), for models
        that need only part of the saving to fit.
        """
        self.gradient_checkpointing = enabled
        self.checkpointed_blocks = len(self.h) if blocks is None else min(blocks, len(self.h))

    def set_loss_chunking(self, tokens: int | None) -> None:
        """Compute the training loss `tokens` at a time, never holding the whole batch's logits
        (`pipeline.chunked_loss`); forward then returns no logits when given targets."""
        self.loss_chunk_tokens = tokens

    def new_kv_cache(
        self,
        batch_size: int = 1,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """A cache on the model's device for up to `max_len` (default `n_ctx`) positions."""
        weight = self.wte.weight
        return KVCache.allocate(
            self.config,
            batch_size=batch_size,
            max_len=max_len or self.config.n_ctx,
            device=weight.device,
            dtype=dtype or weight.dtype,
        )

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        last_only: bool = False,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Logits `(B, T, vocab_size)` for token ids `idx` `(B, T)`, and the loss if `targets`.

        The loss is the mean cross-entropy in fp32 over targets that are not -1. With `kv_cache`,
        `idx` holds the tokens at positions `[start_pos, start_pos + T)` and attends to the
        cached ones before them. `last_only` computes logits for the last position alone
        (`(B, 1, vocab_size)`), which is all that sampling needs.
        """
        _, t = idx.shape
        if last_only and targets is not None:
            raise ValueError("last_only drops positions that targets score: pass one or the other")
        if start_pos + t > self.config.n_ctx:
            raise ValueError(
                f"positions up to {start_pos + t} exceed the model's context n_ctx="
                f"{self.config.n_ctx}"
            )
        pos = torch.arange(start_pos, start_pos + t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        checkpointed = self.gradient_checkpointing and self.training and kv_cache is None
        for i, block in enumerate(self.h):
            if checkpointed and i < self.checkpointed_blocks:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, kv_cache, start_pos)
        x = self.ln_f(x)
        if targets is not None and self.loss_chunk_tokens is not None:
            flat = x.reshape(-1, x.shape[-1])
            loss = chunked_lm_loss(
                flat, self.lm_head.weight, targets.reshape(-1), self.vocab_size,
                self.loss_chunk_tokens,
            )  # fmt: skip
            return None, loss
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)[..., : self.vocab_size]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().reshape(-1, self.vocab_size),
                targets.reshape(-1),
                ignore_index=-1,
            )
        return logits, loss

    def num_parameters(
        self, include_position_embedding: bool = True, count_padding: bool = False
    ) -> int:
        """Parameters of this module, the tied weight once; see `count_parameters`."""
        total = sum(p.numel() for p in self.parameters())
        if not include_position_embedding:
            total -= self.wpe.weight.numel()
        if not count_padding:
            total -= (self.padded_vocab_size - self.vocab_size) * self.config.d_model
        return total

    def param_groups(self, weight_decay: float) -> list[dict[str, object]]:
        """AdamW groups: decay on matrices and embeddings (dim >= 2), none on biases and norms.

        Each trainable parameter appears exactly once (the tied embedding/head included), so
        the groups can go straight to `torch.optim.AdamW`.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
