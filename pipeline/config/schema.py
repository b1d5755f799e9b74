"""The typed configuration: one pydantic model per `params.yaml` section.

Every section forbids unknown keys, so a typo is an error rather than a silently ignored
setting. Cross-field checks live in `model_validator`s next to the fields they relate, so the
whole resolved config is checked once, up front, before anything is written.
"""

from __future__ import annotations

import ntpath
import posixpath
from typing import Literal

from pydantic import Field, model_validator

# Re-exported: the rest of the project imports every section and the base from here.
from pipeline.config.schema_base import CrossFieldError, Section
from pipeline.config.schema_cluster import SlurmConfig, StorageConfig
from pipeline.config.schema_data import DataConfig

Precision = Literal["fp32", "fp16", "bf16"]


class ModelConfig(Section):
    """GPT shape. `d_model = n_head * d_head`; `vocab_size` comes from the prepared data."""

    config: str | None = None
    """Only in params.yaml: the model config file this section's other keys override."""
    name: str = "custom"
    n_layer: int = Field(default=4, ge=1)
    d_model: int = Field(default=128, ge=1)
    n_head: int = Field(default=4, ge=1)
    d_head: int | None = Field(default=None, ge=1)
    """Width of one attention head; defaults to d_model / n_head."""
    d_ff: int | None = Field(default=None, ge=1)
    """MLP width; defaults to 4 * d_model as in GPT-2/3."""
    n_ctx: int = Field(default=256, ge=1)
    """Longest context the position embedding covers."""
    vocab_size: int | None = Field(default=None, ge=2)
    """Tokens in the vocabulary; None takes it from the prepared data's meta.json."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    paper_params: int | None = None
    """The parameter count the paper reports for this shape (informational)."""

    @model_validator(mode="after")
    def _shape_is_consistent(self) -> ModelConfig:
        if self.d_model % self.n_head != 0:
            raise CrossFieldError(
                f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})",
                "d_model",
                "n_head",
            )
        if self.d_head is None:
            self.d_head = self.d_model // self.n_head
        elif self.d_head * self.n_head != self.d_model:
            raise CrossFieldError(
                f"n_head * d_head ({self.n_head} * {self.d_head}) "
                f"must equal d_model ({self.d_model})",
                "n_head",
                "d_head",
                "d_model",
            )
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        return self


class BatchRampConfig(Section):
    """GPT-3's linear batch-size ramp: from `start_tokens` up to the full batch."""

    start_tokens: int = Field(ge=1)
    """Global batch (tokens) at the start of training."""
    ramp_tokens: int = Field(ge=1)
    """Tokens of training over which the batch grows linearly to the full size."""


class TrainingConfig(Section):
    """Optimiser, schedule, batch, precision, logging and checkpointing of the train stage."""

    config: str | None = None
    """Only in params.yaml: the training config file this section's other keys override."""
    lr: float = Field(default=6e-4, gt=0.0)
    """Peak learning rate, reached after warm-up."""
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    """Cosine decay ends at this fraction of the peak (GPT-3: 10%)."""
    warmup_tokens: int = Field(default=0, ge=0)
    decay_tokens: int | None = Field(default=None, ge=1)
    """Tokens over which the cosine decays; None decays over the whole run."""
    max_steps: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    """Stop after this many tokens (GPT-3: 300B); the first of max_steps/max_tokens wins."""
    global_batch_tokens: int | None = Field(default=None, ge=1)
    """Global batch in tokens; divided by seq_len gives sequences per optimizer step."""
    global_batch_size: int | None = Field(default=None, ge=1)
    """Global batch in sequences; an alternative to global_batch_tokens (this one wins)."""
    micro_batch_size: int = Field(default=8, ge=1)
    """Sequences per forward pass on one device; accumulation makes up the rest."""
    seq_len: int | None = Field(default=None, ge=1)
    """Training sequence length; None uses the model's n_ctx."""
    batch_ramp: BatchRampConfig | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0.0)
    weight_decay: float = Field(default=0.1, ge=0.0)
    grad_clip: float | None = Field(default=1.0, gt=0.0)
    precision: Precision = "fp32"
    compile: bool = False
    compile_scope: Literal["model", "blocks"] = "model"
    """`model` compiles the whole forward and loss (fastest steps); `blocks` compiles each
    transformer block on its own (identical blocks share one compilation: much faster start)."""
    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    """Scaled-dot-product attention kernel; `auto` lets PyTorch choose."""
    loss_chunk_tokens: int | None = Field(default=None, ge=1)
    """Compute the output layer and loss this many tokens at a time, so the whole batch's
    logits never sit in memory (None: all at once)."""
    gradient_checkpointing: bool = False
    gradient_checkpointing_blocks: int | None = Field(default=None, ge=1)
    """With gradient_checkpointing: recompute only the first N blocks (None: all). Fewer
    recomputed blocks cost less compute and more activation memory."""
    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_interval: int = Field(default=10, ge=1)
    data_ledger: bool = False
    """Write `logs/data_order.jsonl`: the windows each step consumed (an audit of the data
    order across kills and resumes; see `pipeline.training.data_ledger`)."""
    eval_interval: int = Field(default=100, ge=1)
    eval_iters: int = Field(default=10, ge=1)
    checkpoint_interval: int = Field(default=100, ge=1)
    keep_checkpoints: int = Field(default=3, ge=1)
    async_checkpoint: bool = True
    """Copy the state to host memory and write the file in the background, so a save stalls
    training only for the copy (same atomic files and exact resume as a blocking save)."""
    nonfinite_policy: Literal["skip", "rollback", "abort"] = "skip"
    max_nonfinite_steps: int = Field(default=10, ge=0)
    peak_tflops: float | None = Field(default=None, gt=0.0)
    """Device peak for MFU; None looks the device up in a table of known GPUs."""

    @model_validator(mode="after")
    def _schedule_is_consistent(self) -> TrainingConfig:
        problems: list[CrossFieldError] = []
        if self.max_steps is None and self.max_tokens is None:
            problems.append(
                CrossFieldError(
                    "set max_steps or max_tokens so training has an end", "max_steps", "max_tokens"
                )
            )
        if self.global_batch_tokens is None and self.global_batch_size is None:
            problems.append(
                CrossFieldError(
                    "set global_batch_tokens or global_batch_size",
                    "global_batch_tokens",
                    "global_batch_size",
                )
            )
        lo, hi = self.betas
        if not (0.0 <= lo < 1.0 and 0.0 <= hi < 1.0):
            problems.append(CrossFieldError(f"betas must lie in [0, 1), got {self.betas}", "betas"))
        if problems:
            raise CrossFieldError.combine(problems)
        return self


class EvaluationConfig(Section):
    """What the evaluate stage measures."""

    max_tokens: int | None = Field(default=None, ge=1)
    """Token budget on the validation split; None evaluates all of it."""
    batch_size: int = Field(default=8, ge=1)
    benchmarks: list[str] = Field(default_factory=list)
    """Zero-shot task files: `lambada:PATH`, `hellaswag:PATH`, `multiple_choice:PATH`."""
    benchmark_dir: str = "data/benchmarks"
    """Where a benchmark given by NAME alone is read from: `<benchmark_dir>/<NAME>.jsonl`."""
    benchmark_limit: int | None = Field(default=None, ge=1)
    """Score only the first N examples of each benchmark (quick checks); None scores all."""
    sample_prompts: list[str] = Field(default_factory=lambda: ["ROMEO:", "To be, or not"])
    sample_max_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.8, ge=0.0)
    top_k: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=0.95, gt=0.0, le=1.0)


class TrackingConfig(Section):
    """MLflow tracking; `MLFLOW_TRACKING_URI` in the environment wins over `uri`."""

    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "gpt3-pipeline"
    log_checkpoints: Literal["none", "latest", "every"] = "latest"
    system_metrics: bool = False
    queue_size: int = Field(default=10_000, ge=1)
    """Metric batches kept while the server is unreachable; older ones are dropped and reported."""
    request_timeout_s: float = Field(default=10.0, gt=0.0)
    """One MLflow HTTP request's timeout (MLFLOW_HTTP_REQUEST_TIMEOUT unless set). Requests are
    sent from a background thread, so this bounds how fast an outage is noticed, not a step."""
    flush_timeout_s: float = Field(default=120.0, ge=0.0)
    """At the end of a run, how long to keep retrying an unreachable server before reporting
    what was not sent."""


class RegistryConfig(Section):
    """Model-registry promotion."""

    model_name: str = "gpt3-tiny"
    metric: str = "val_loss"
    greater_is_better: bool = False
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"


class DistributedConfig(Section):
    """How training is launched across processes and machines."""

    launcher: Literal["none", "torchrun", "deepspeed", "slurm"] = "none"
    strategy: Literal["auto", "single", "ddp", "deepspeed", "fsdp"] = "auto"
    backend: Literal["nccl", "gloo"] | None = None
    """None picks nccl on GPUs and gloo on CPU."""
    num_nodes: int = Field(default=1, ge=1)
    gpus_per_node: int = Field(default=1, ge=1)
    deepspeed_config: str | None = None
    tensor_parallel: int = Field(default=1, ge=1)
    """fsdp only: ranks that split each layer (heads, MLP, vocabulary); the rest shard the
    data axis. Must divide the world size."""
    cpu_offload: bool = False
    """fsdp only: keep the sharded parameters, gradients and optimizer step on the host."""
    sequence_parallel: bool = False
    """fsdp with tensor_parallel > 1 only: split the activations between the tensor-parallel
    layers (LayerNorms, dropout, residual adds) by sequence position too, so each rank stores
    1/tensor_parallel of them instead of all (Megatron's sequence parallelism). The sequence
    length must be a multiple of tensor_parallel. Checkpoints do not depend on it."""

    @model_validator(mode="after")
    def _sequence_parallel_needs_tensor_parallel(self) -> DistributedConfig:
        """Sequence parallelism splits what tensor parallelism replicates: nothing without it."""
        if self.sequence_parallel and (self.strategy != "fsdp" or self.tensor_parallel < 2):
            raise CrossFieldError(
                "sequence_parallel needs strategy fsdp and tensor_parallel > 1 (got strategy "
                f"{self.strategy}, tensor_parallel {self.tensor_parallel})",
                "sequence_parallel",
                "strategy",
                "tensor_parallel",
            )
        return self


SEED_MAX = 2**64 - 1
"""`torch.manual_seed`'s largest seed: a larger one would fail after the run folder exists."""


class Config(Section):
    """The whole resolved configuration, as saved to `resolved_config.yaml`."""

    seed: int = Field(default=1337, ge=0, le=SEED_MAX)
    """The one seed: data split, initialisation, sampling order and dropout all derive from it."""
    name: str = "tiny-shakespeare"
    """Experiment name: outputs go to `<output_root>/<name>/`."""
    output_root: str = "experiments"
    output_dir: str | None = None
    """Overrides `<output_root>/<name>` when set (the `--output_dir` flag)."""
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(
        default_factory=lambda: TrainingConfig(max_steps=100, global_batch_size=8)
    )
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @model_validator(mode="after")
    def _training_fits_model(self) -> Config:
        seq = self.training.seq_len
        if seq is not None and seq > self.model.n_ctx:
            raise CrossFieldError(
                f"training.seq_len ({seq}) exceeds model.n_ctx ({self.model.n_ctx})",
                "training.seq_len",
                "model.n_ctx",
            )
        return self

    @model_validator(mode="after")
    def _run_dir_is_confined(self) -> Config:
        """`<output_root>/<name>` stays inside output_root; a relative root stays in the project.

        `name` is then one folder name (no separator, not `.` or `..`), so `--set name=../x`
        cannot put a run (or delete a model folder) elsewhere. An absolute output_root or
        output_dir is an explicit choice and taken as given.
        """
        problems = []
        if self.output_dir is None and not _one_folder_name(self.name):
            problems.append(
                CrossFieldError(
                    f"name {self.name!r} must be one folder name (no '/' or '\\', not '.' or "
                    "'..'): runs go to <output_root>/<name>; use output_dir for another place",
                    "name",
                )
            )
        for key in ("output_root", "output_dir"):
            value = getattr(self, key)
            if value and _climbs_out(value):
                problems.append(
                    CrossFieldError(
                        f"{key} {value!r} climbs out of the project with '..'; give an "
                        "absolute path to write elsewhere",
                        key,
                    )
                )
        if problems:
            raise CrossFieldError.combine(problems)
        return self

    @property
    def run_dir(self) -> str:
        """The experiment directory: `output_dir`, else `<output_root>/<name>`."""
        return self.output_dir or f"{self.output_root}/{self.name}"

    @property
    def seq_len(self) -> int:
        """Training sequence length after defaulting to the model's context."""
        return self.training.seq_len or self.model.n_ctx


def _one_folder_name(name: str) -> bool:
    """Is `name` a single path component that stays where it is put?"""
    return bool(name.strip()) and name not in (".", "..") and not set(name) & {"/", "\\", "\0"}


def _climbs_out(path: str) -> bool:
    """Does a relative path lead above the working directory (`../x`, `a/../../x`)?"""
    if posixpath.isabs(path) or ntpath.isabs(path):
        return False
    return posixpath.normpath(path.replace("\\", "/")).split("/")[0] == ".."
