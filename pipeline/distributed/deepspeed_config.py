"""A DeepSpeed JSON made consistent with the project's config: one source of truth.

The JSON says how to shard and offload (ZeRO stage, offload devices, buckets). What the project's
config already says (batch, micro-batch, clipping, precision, optimizer hyper-parameters) fills
the JSON's `"auto"` values; an explicit JSON value that says something else is a contradiction,
reported with every other one in a single ConfigError, never silently overridden either way:

    train_batch_size                 the global batch in sequences (training.global_batch_*)
    train_micro_batch_size_per_gpu   training.micro_batch_size
    gradient_accumulation_steps      global batch / (micro-batch x world size)
    gradient_clipping                training.grad_clip (0 = off)
    fp16.enabled / bf16.enabled      training.precision (--fp16 / --bf16); an absent section is
                                     added for the chosen one (fp16 with dynamic loss scaling)
    optimizer.params                 lr, betas, eps, weight_decay from training.*
    zero_optimization buckets        Hugging Face's conventions from d_model

The learning rate is then set by the trainer every step (token-based warm-up and cosine, saved
with the run), so a JSON `scheduler` section is a contradiction too.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from pipeline.config.schema import Config
from pipeline.errors import ConfigError
from pipeline.training.batching import global_batch_sequences, plan_batch

AUTO = "auto"
OPTIMIZER_TYPES = {"adam", "adamw"}


def read_deepspeed_json(path: str | Path) -> dict[str, Any]:
    """Parse the JSON file; a missing or malformed file is a ConfigError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed_config {path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"--deepspeed_config {path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"--deepspeed_config {path}: not UTF-8 text (byte {exc.start}): not a JSON file"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return data


class _Resolver:
    """Fills `auto` values and collects contradictions for one JSON."""

    def __init__(self, data: dict[str, Any], source: str) -> None:
        self.data = copy.deepcopy(data)
        self.source = source
        self.problems: list[str] = []

    def section(self, key: str) -> dict[str, Any] | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, dict):
            self.problems.append(f"{key} must be a JSON object in {self.source}")
            return None
        return value

    def settle(self, container: dict[str, Any], key: str, value: Any, where: str, why: str) -> None:
        current = container.get(key, AUTO)
        if current == AUTO:
            container[key] = value
        elif not _same(current, value):
            self.problems.append(
                f"{where}={current!r} in {self.source} contradicts {why}={value!r}"
            )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def resolve_deepspeed_config(
    data: dict[str, Any], config: Config, world_size: int, source: str, cuda: bool
) -> dict[str, Any]:
    """The JSON with every `auto` filled from `config`; contradictions raise one ConfigError."""
    t = config.training
    seq = config.seq_len
    plan = plan_batch(global_batch_sequences(t, seq), t.micro_batch_size, world_size, seq)
    r = _Resolver(data, source)
    d = r.data
    r.settle(
        d,
        "train_batch_size",
        plan.global_sequences,
        "train_batch_size",
        "the project's global batch (sequences)",
    )
    r.settle(
        d,
        "train_micro_batch_size_per_gpu",
        t.micro_batch_size,
        "train_micro_batch_size_per_gpu",
        "training.micro_batch_size",
    )
    r.settle(
        d,
        "gradient_accumulation_steps",
        plan.accumulation_steps,
        "gradient_accumulation_steps",
        f"global batch / (micro-batch x {world_size} ranks)",
    )
    r.settle(d, "gradient_clipping", t.grad_clip or 0.0, "gradient_clipping", "training.grad_clip")
    _precision(r, t.precision, cuda)
    _optimizer(r, config)
    _zero(r, config)
    if "scheduler" in d:
        r.problems.append(
            f"scheduler in {source}: the learning rate follows the training config (token-based "
            "warm-up and cosine decay, resumed with the run); remove the section"
        )
    checkpoint = r.section("checkpoint") or {}
    if checkpoint.get("load_universal"):
        r.problems.append(
            f"checkpoint.load_universal in {source}: DeepSpeed reads universal checkpoints with "
            "torch.load(weights_only=False), which runs code a file carries; remove it"
        )
    leftovers = sorted(_auto_keys(d))
    if leftovers:
        r.problems.append(f"{', '.join(leftovers)} in {source}: 'auto' has no project value here")
    if r.problems:
        raise ConfigError("DeepSpeed config: " + "; ".join(r.problems))
    d.setdefault("steps_per_print", 2**31 - 1)  # the trainer reports progress itself
    return d


def _precision(r: _Resolver, precision: str, cuda: bool) -> None:
    for name in ("fp16", "bf16"):
        section = r.section(name)
        wanted = precision == name
        if section is None:
            if wanted and name not in r.data:
                r.data[name] = {"enabled": True}  # fp16: loss_scale 0 = dynamic (the default)
            continue
        enabled = section.get("enabled", AUTO)
        if enabled == AUTO:
            section["enabled"] = wanted
        elif enabled is not wanted:
            r.problems.append(
                f"{name}.enabled={json.dumps(enabled)} in {r.source} contradicts "
                f"training.precision={precision} (--{precision} or the training config)"
            )
    amp = r.section("amp")
    if amp and amp.get("enabled"):
        r.problems.append(f"amp in {r.source}: use the fp16/bf16 sections (training.precision)")
    if precision == "fp16" and not cuda:
        r.problems.append("DeepSpeed has no fp16 on the CPU: use --bf16 or fp32 there")


def _optimizer(r: _Resolver, config: Config) -> None:
    section = r.section("optimizer")
    if section is None:
        return
    kind = str(section.get("type", "")).lower()
    if kind not in OPTIMIZER_TYPES:
        r.problems.append(
            f"optimizer.type={section.get('type')!r} in {r.source}: the recipe is AdamW "
            "(use Adam or AdamW, or drop the section to use the project's optimizer)"
        )
    params = section.setdefault("params", {})
    t = config.training
    for key, value, why in (
        ("lr", t.lr, "training.lr"),
        ("betas", list(t.betas), "training.betas"),
        ("eps", t.eps, "training.eps"),
        ("weight_decay", t.weight_decay, "training.weight_decay"),
    ):
        r.settle(params, key, value, f"optimizer.params.{key}", why)


def _zero(r: _Resolver, config: Config) -> None:
    section = r.section("zero_optimization")
    if section is None:
        return
    d_model = config.model.d_model
    for key, value in (
        ("reduce_bucket_size", d_model * d_model),
        ("stage3_prefetch_bucket_size", int(0.9 * d_model * d_model)),
        ("stage3_param_persistence_threshold", 10 * d_model),
    ):
        if section.get(key) == AUTO:
            section[key] = value
    stage = section.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        r.problems.append(f"zero_optimization.stage={stage!r} in {r.source}: expected 0 to 3")


def _auto_keys(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, dict):
        return [k for key, item in value.items() for k in _auto_keys(item, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if value == AUTO else []
