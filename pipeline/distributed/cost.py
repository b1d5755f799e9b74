"""What a training run costs before it starts: FLOPs, GPU-hours, wall-clock, the Slurm request.

FLOPs per token are `pipeline.model.flops_per_token` (6N + 12 * n_layer * d_model * seq, with N
the parameters without the position embedding), the same numerator the trainer's MFU uses, so
a measured MFU converts them straight into time: GPU-seconds = FLOPs / (MFU x peak). The peak is
the dense bf16 datasheet figure of `pipeline.training.throughput.PEAK_TFLOPS`.

The MFU comes from `bench/measured_mfu.json` (one measured figure per GPU kind and model size;
the file documents its format), taking the entry of the same GPU kind nearest in parameters:
MFU depends on the matmul sizes, so a neighbour's figure is the best guess short of measuring.
Wall-clock assumes that single-GPU figure holds on every GPU of the job; communication makes
multi-node runs slower, which is what the margin on the Slurm time limit and `--mfu` are for.

GPT-3's Table D.1 counts 6N per token and leaves attention out; `Cost.dense_flops` is that
term alone, for comparing with the paper.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.config.schema import ModelConfig
from pipeline.errors import ConfigError
from pipeline.model import flops_per_token
from pipeline.training.throughput import PEAK_TFLOPS

MEASURED_MFU_FILE = Path(__file__).resolve().parents[2] / "bench" / "measured_mfu.json"
"""The checkout's own file, wherever `gpt3 plan` runs from."""
DEFAULT_TIME_MARGIN = 0.2
"""Extra time on top of the estimate: a job killed at its limit loses the work since its last
checkpoint, while a longer limit only waits a little longer in the queue. The measured MFU
includes evaluation, tracking and checkpoint stalls (bench/train.py averages whole log
intervals) but leaves out start-up, compilation and restarts after a failure."""
DEFAULT_CPUS_PER_GPU = 8
"""Data loading reads memory-mapped tokens and needs few cores; 8 per GPU fits common nodes."""
EXTRAPOLATION_FACTOR = 2.0
"""A measured model this many times smaller or larger than the planned one gets a warning."""
PF_DAY = 1e15 * 86_400
"""A petaflop/s-day, the unit of GPT-3's Table D.1."""

_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
_COUNT = re.compile(r"\s*(\d[\d_]*(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*([kKmMbBtT]?)\s*")
_ENTRY_KEYS = (
    "gpu",
    "model",
    "seq_len",
    "micro_batch",
    "tokens_per_s",
    "mfu",
    "source",
    "date",
    "command",
)


def parse_count(text: str) -> float | None:
    """`300e9`, `300B`, `1.5T`, `125M`, `300_000` -> the number; None if it is not one."""
    match = _COUNT.fullmatch(text)
    if match is None:
        return None
    value = float(match.group(1)) * _SUFFIXES[match.group(2).upper()]
    return value if math.isfinite(value) else None


def parse_tokens(text: str) -> int:
    """`--tokens`: a positive whole number of tokens, with an optional K/M/B/T suffix."""
    value = parse_count(text)
    if value is None:
        raise ConfigError(f"--tokens {text!r} is not a token count; write e.g. 300e9 or 300B")
    if value < 1:
        raise ConfigError(f"--tokens {text!r}: need at least one token")
    return round(value)


def short_count(value: float) -> str:
    """300e9 -> `300B`, 1.5e12 -> `1.5T`: the suffixes `parse_count` reads."""
    for suffix in ("T", "B", "M", "K"):
        if value >= _SUFFIXES[suffix]:
            return f"{value / _SUFFIXES[suffix]:.4g}{suffix}"
    return f"{value:.4g}"


def gpu_peak_tflops(gpu: str) -> tuple[str, float]:
    """(the table's spelling of `gpu`, its dense bf16 peak in TFLOP/s); case does not matter."""
    for name, peak in PEAK_TFLOPS.items():
        if name.lower() == gpu.strip().lower():
            return name, peak
    raise ConfigError(f"--gpu {gpu!r}: no peak known; known kinds: {', '.join(PEAK_TFLOPS)}")


@dataclass(frozen=True)
class MeasuredMfu:
    """One entry of `bench/measured_mfu.json` (see the file's `fields` for what each means)."""

    gpu: str
    model: str
    seq_len: int
    micro_batch: int
    tokens_per_s: float
    mfu: float
    source: str
    date: str
    command: str | None
    notes: str | None = None

    def describe(self) -> str:
        """Two lines naming the entry, so the plan says which figure it used."""
        notes = f"{self.notes}; " if self.notes else ""
        return (
            f"{self.gpu} {self.model} at seq {self.seq_len} x micro-batch {self.micro_batch}, "
            f"{self.tokens_per_s:,.0f} tokens/s\n({notes}{self.source}, {self.date})"
        )


def load_measured_mfu(path: Path = MEASURED_MFU_FILE) -> list[MeasuredMfu]:
    """Every entry of the file; a missing, malformed or incomplete file is a ConfigError."""
    if not path.is_file():
        raise ConfigError(f"no measured MFU file {path}: pass --mfu (e.g. 0.45) or --measured_mfu")
    try:
        entries = json.loads(path.read_text())["entries"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{path}: not a measured-MFU file with an 'entries' list ({exc})"
        ) from exc
    result = []
    for index, entry in enumerate(entries):
        where = f"{path}: entries[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} is not an object")
        missing = [key for key in _ENTRY_KEYS if key not in entry]
        unknown = sorted(set(entry) - {*_ENTRY_KEYS, "notes"})
        if missing or unknown:
            raise ConfigError(f"{where}: missing {missing}, unknown {unknown}")
        measured = MeasuredMfu(**entry)
        mfu = measured.mfu
        if not isinstance(mfu, (int, float)) or not 0 < mfu <= 1 or not _size(measured.model):
            raise ConfigError(f"{where}: mfu must be in (0, 1] and model a size like 1.3B")
        if any((e.gpu.lower(), e.model) == (measured.gpu.lower(), measured.model) for e in result):
            raise ConfigError(f"{where}: a second entry for {measured.gpu} {measured.model}")
        result.append(measured)
    return result


def _size(model: object) -> float | None:
    """`1.3B` -> 1.3e9; None for anything that is not a size."""
    return parse_count(model) if isinstance(model, str) else None


def nearest_measured(entries: list[MeasuredMfu], gpu: str, parameters: int) -> MeasuredMfu:
    """The entry for `gpu` whose model size is nearest `parameters` (by ratio, not difference)."""
    same_kind = [entry for entry in entries if entry.gpu.lower() == gpu.lower()]
    if not same_kind:
        kinds = sorted({entry.gpu for entry in entries})
        raise ConfigError(
            f"no measured MFU for {gpu} (measured: {', '.join(kinds) or 'none'}); "
            "pass --mfu (e.g. 0.45)"
        )
    return min(same_kind, key=lambda e: abs(math.log((_size(e.model) or parameters) / parameters)))


def explain_measured(entry: MeasuredMfu, parameters: int) -> str:
    """Which measured figure a plan of `parameters` uses, flagged when it is far from that size."""
    text = f"measured on {entry.describe()}"
    ratio = parameters / (_size(entry.model) or parameters)
    if max(ratio, 1 / ratio) >= EXTRAPOLATION_FACTOR:
        text += (
            f"\n{short_count(parameters)} parameters = {ratio:.3g}x that model: "
            "extrapolated; --mfu sets your own"
        )
    return text


def check_mfu(mfu: float) -> float:
    """`--mfu` is a fraction: 45 (a percentage) or 0 is a mistake, not a figure."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu:g}: a fraction in (0, 1], e.g. 0.45 for 45%")
    return mfu


@dataclass(frozen=True)
class Cost:
    """Training compute and time for `tokens` tokens of `seq_len` on `gpus` GPUs of one kind."""

    tokens: int
    seq_len: int
    total_flops: float
    dense_flops: float
    """The 6N x tokens part (GPT-3 Table D.1's convention); the rest is attention."""
    gpu: str
    peak_tflops: float
    mfu: float
    gpus: int
    gpu_hours: float
    wall_hours: float

    @property
    def attention_flops(self) -> float:
        return self.total_flops - self.dense_flops

    @property
    def pf_days(self) -> float:
        return self.total_flops / PF_DAY


def estimate_cost(
    model: ModelConfig,
    vocab_size: int,
    seq_len: int,
    tokens: int,
    gpu: str,
    gpus: int,
    mfu: float,
) -> Cost:
    """FLOPs from the model's own `flops_per_token`, time from the MFU and the GPU's peak."""
    check_mfu(mfu)
    if gpus < 1 or tokens < 1:
        raise ConfigError(f"need at least one GPU and one token, got {gpus} and {tokens}")
    name, peak = gpu_peak_tflops(gpu)
    total = float(flops_per_token(model, vocab_size, seq_len) * tokens)
    dense = float(flops_per_token(model, vocab_size, 0) * tokens)  # the 6N term alone
    gpu_hours = total / (mfu * peak * 1e12) / 3600
    return Cost(tokens, seq_len, total, dense, name, peak, mfu, gpus, gpu_hours, gpu_hours / gpus)


@dataclass(frozen=True)
class SlurmRequest:
    """The `#SBATCH` resources of one job: one task per node (srun starts torchrun on each)."""

    nodes: int
    gpus_per_node: int
    cpus_per_task: int
    hours: int
    """The time limit in whole hours (estimate plus margin, rounded up)."""

    @property
    def time(self) -> str:
        return slurm_time(self.hours)

    def lines(self) -> list[str]:
        return [
            f"#SBATCH --nodes={self.nodes}",
            "#SBATCH --ntasks-per-node=1",
            f"#SBATCH --gpus-per-node={self.gpus_per_node}",
            f"#SBATCH --cpus-per-task={self.cpus_per_task}",
            f"#SBATCH --time={self.time}",
        ]


def slurm_time(hours: int) -> str:
    """Slurm's time format for whole hours: `HH:MM:SS` under a day, `D-HH:MM:SS` from one."""
    days, rest = divmod(hours, 24)
    return f"{days}-{rest:02d}:00:00" if days else f"{rest:02d}:00:00"


def time_limit_hours(wall_hours: float, margin: float = DEFAULT_TIME_MARGIN) -> int:
    """`wall_hours` plus `margin` (a fraction), rounded up to whole hours, at least one."""
    if margin < 0:
        raise ConfigError(f"--time_margin {margin}: cannot be negative")
    padded = wall_hours * (1 + margin)
    return max(1, math.ceil(round(padded, 6)))  # round: 10.0 * 1.1 must stay 11, not 12


def slurm_request(
    cost: Cost,
    gpus_per_node: int,
    cpus_per_gpu: int = DEFAULT_CPUS_PER_GPU,
    margin: float = DEFAULT_TIME_MARGIN,
) -> SlurmRequest:
    """The job that runs `cost` on `cost.gpus` GPUs in nodes of `gpus_per_node`."""
    if gpus_per_node < 1 or cost.gpus % gpus_per_node:
        raise ConfigError(f"{cost.gpus} GPUs do not split into nodes of {gpus_per_node}")
    if cpus_per_gpu < 1:
        raise ConfigError(f"--cpus_per_gpu {cpus_per_gpu}: need at least one")
    return SlurmRequest(
        nodes=cost.gpus // gpus_per_node,
        gpus_per_node=gpus_per_node,
        cpus_per_task=cpus_per_gpu * gpus_per_node,
        hours=time_limit_hours(cost.wall_hours, margin),
    )


def _duration(hours: float) -> str:
    return f"{hours:,.1f} hours" if hours < 48 else f"{hours / 24:,.1f} days ({hours:,.0f} hours)"


def format_cost(
    cost: Cost, request: SlurmRequest, mfu_from: str, margin: float, memory: str
) -> str:
    """The block `gpt3 plan` prints under the memory table; `mfu_from` says where the MFU came
    from (its further lines are indented under the first)."""
    return "\n".join(
        [
            f"cost of {short_count(cost.tokens)} tokens (sequences of {cost.seq_len}) on "
            f"{cost.gpus} x {cost.gpu} (dense bf16 peak {cost.peak_tflops:g} TFLOP/s):",
            f"  training FLOPs  {cost.total_flops:.3e} = 6N x tokens {cost.dense_flops:.3e} + "
            f"attention {cost.attention_flops:.3e} ({cost.pf_days:.3g} PF-days)",
            f"  MFU             {cost.mfu:.1%} {mfu_from}".replace("\n", "\n" + " " * 18),
            f"  GPU-hours       {cost.gpu_hours:,.{0 if cost.gpu_hours >= 100 else 1}f}",
            f"  wall-clock      {_duration(cost.wall_hours)} on {cost.gpus} GPU(s), if the MFU "
            "holds on every GPU",
            f"  memory per GPU  {memory}",
            f"sbatch request (wall-clock + {margin:.0%}, rounded up to whole hours):",
            *(f"  {line}" for line in request.lines()),
        ]
    )
