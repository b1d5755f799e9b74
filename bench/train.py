"""Training throughput of the project's own `train` command, with everything switched on.

    python bench/train.py                          # CPU: tiny and a short 125M case
    python bench/train.py --shapes 125M,350M,1.3B  # GPU cases by name (see CASES)
    python bench/train.py --list                   # the cases and their settings

Each case runs `stages/train.py` (the command DVC runs) in its own process on synthetic
random tokens (vocabulary 50304 for GPT-3 shapes, as the reference figures use), with
TensorBoard, `training.log`, DVC metrics, MLflow tracking (SQLite) and checkpointing on.
Throughput comes from the run's own log lines: tokens/s averaged over whole log intervals,
so evaluation, checkpoint stalls and tracking are inside the figure. The first
`warmup_logs` intervals (start-up, compilation) are left out. Once enough intervals are
logged the bench kills the run: it measures, it does not need the model (and a 6.7B
checkpoint would not fit the GPU machine's disk).

Per case it prints tokens/s, MFU, step time, peak GPU memory (and the planner's prediction
for it), peak host memory, the worst checkpoint stall, and the ratio to the reference row of
the GPU it runs on (`../shared/gpu/README.md`). Results are also appended, one JSON object per
case, to `--out` (default bench/results.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from synthetic_data import synthetic_prepared  # noqa: E402  (bench/, beside this file)

# Reference trainer (../shared/gpu/README.md): tokens/s by GPU kind and GPT-3 shape.
REFERENCE_TOKENS_PER_S = {
    "H100": {"125M": 458e3, "350M": 169e3, "1.3B": 58.9e3},
    "H200": {"125M": 493e3, "350M": 178e3, "1.3B": 60.9e3, "2.7B": 25.6e3, "6.7B": 10.5e3},
}


@dataclass(frozen=True)
class Case:
    """One measured configuration of the train command."""

    name: str
    model: str
    seq: int
    micro_batch: int
    precision: str = "bf16"
    log_interval: int = 10
    logs: int = 5
    """Log intervals measured after warm-up."""
    warmup_logs: int = 2
    checkpoint_interval: int = 1_000_000
    """Steps between checkpoints; the default means none while measuring."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Further `--set KEY=VALUE` overrides."""
    reference: str | None = None
    """Reference row (model name) this case compares against."""
    cuda: bool = True


COMPILED = {"training.compile": True}
BLOCKS = {"training.compile": True, "training.compile_scope": "blocks"}
CKPT = {"training.gradient_checkpointing": True}

CASES = [
    Case(
        "tiny-cpu",
        "tiny",
        128,
        16,
        "fp32",
        log_interval=5,
        logs=4,
        warmup_logs=1,
        checkpoint_interval=10,
        cuda=False,
    ),
    Case(
        "125M-cpu",
        "125M",
        128,
        4,
        "fp32",
        log_interval=2,
        logs=2,
        warmup_logs=1,
        checkpoint_interval=4,
        cuda=False,
    ),
    Case(
        "125M",
        "125M",
        1024,
        16,
        log_interval=20,
        logs=5,
        checkpoint_interval=50,
        settings=COMPILED,
        reference="125M",
    ),
    Case(
        "350M",
        "350M",
        2048,
        8,
        log_interval=10,
        logs=5,
        checkpoint_interval=40,
        settings=COMPILED,
        reference="350M",
    ),
    Case(
        "1.3B",
        "1.3B",
        2048,
        8,
        log_interval=5,
        logs=8,
        checkpoint_interval=20,
        settings=COMPILED,
        reference="1.3B",
    ),
    Case(
        "350M-fp16",
        "350M",
        2048,
        8,
        "fp16",
        log_interval=10,
        logs=5,
        settings=COMPILED,
        reference="350M",
    ),
    Case(
        "2.7B-ckpt",
        "2.7B",
        2048,
        8,
        log_interval=4,
        logs=3,
        settings={**BLOCKS, **CKPT},
        reference="2.7B",
    ),
    Case(
        "6.7B-ckpt",
        "6.7B",
        2048,
        4,
        log_interval=3,
        logs=3,
        settings={**BLOCKS, **CKPT},
        reference="6.7B",
    ),
    Case(
        "125M-mb32", "125M", 1024, 32, log_interval=10, logs=5, settings=COMPILED, reference="125M"
    ),
    Case(
        "1.3B-cudnn",
        "1.3B",
        2048,
        8,
        log_interval=5,
        logs=5,
        settings={**COMPILED, "training.attention_backend": "cudnn"},
        reference="1.3B",
    ),
    Case(
        "2.7B-ckpt20",
        "2.7B",
        2048,
        8,
        log_interval=4,
        logs=3,
        settings={**BLOCKS, **CKPT, "training.gradient_checkpointing_blocks": 20},
        reference="2.7B",
    ),
]
CASES += [
    Case("125M-mb64", "125M", 1024, 64, log_interval=10, logs=5, settings=COMPILED,
         reference="125M"),
    Case("1.3B-mb16", "1.3B", 2048, 16, log_interval=4, logs=5, settings=COMPILED,
         reference="1.3B"),
    Case("125M-mb64-chunk", "125M", 1024, 64, log_interval=10, logs=5,
         settings={**COMPILED, "training.loss_chunk_tokens": 8192}, reference="125M"),
    Case("1.3B-mb16-chunk", "1.3B", 2048, 16, log_interval=4, logs=5,
         settings={**COMPILED, "training.loss_chunk_tokens": 8192}, reference="1.3B"),
    Case("125M-mb64-ckpt", "125M", 1024, 64, log_interval=10, logs=5, checkpoint_interval=100,
         settings=COMPILED, reference="125M"),
    Case("1.3B-mb16-ckpt", "1.3B", 2048, 16, log_interval=4, logs=10, checkpoint_interval=12,
         settings=COMPILED, reference="1.3B"),
]  # fmt: skip
BY_NAME = {case.name: case for case in CASES}

STEP_LINE = re.compile(
    r"step (\d+): loss \S+ .*tokens/s (\d+)(?: mfu ([\d.]+)%)?(?: mem ([\d.]+))?"
)
STALL_LINE = re.compile(r"step (\d+): checkpoint taken, training stalled ([\d.]+) s")


def gpu_kind() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((kind for kind in ("H200", "H100") if kind in name), name)


def predicted_gpu_gib(case: Case, vocab: int) -> float | None:
    """The planner's single-GPU peak (DDP row: fp32 weights + grads + Adam, plus activations)."""
    from pipeline.config.loader import load_config
    from pipeline.distributed.planner import activation_bytes
    from pipeline.model import count_parameters

    config = load_config(
        model_size=case.model,
        overrides={"training.max_steps": 1, "training.global_batch_size": case.micro_batch},
    )
    params = count_parameters(config.model, vocab)
    ckpt = bool(case.settings.get("training.gradient_checkpointing"))
    layers = case.settings.get("training.gradient_checkpointing_blocks")
    acts = activation_bytes(config.model, vocab, case.micro_batch, case.seq, ckpt, layers)
    return (16 * params + acts) / 2**30


def peak_rss_gib(pid: int) -> float:
    """VmHWM of a live process (peak resident memory), in GiB; 0 when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def run_case(case: Case, work: Path, deadline: float, log_dir: Path) -> dict[str, Any]:
    """Start the train command, follow its log, kill it once the intervals are in."""
    vocab = 4096 if case.model == "tiny" else 50304
    steps = case.log_interval * (case.logs + case.warmup_logs)
    prepared = work / f"data-{vocab}"
    if not (prepared / "meta.json").exists():
        synthetic_prepared(prepared, vocab, 4_000_000)
    run_dir = work / case.name
    settings = {
        "data.prepared_dir": str(prepared),
        "training.precision": case.precision,
        "training.micro_batch_size": case.micro_batch,
        "training.global_batch_size": case.micro_batch,
        "training.global_batch_tokens": None,
        "training.seq_len": case.seq,
        "training.max_steps": steps + case.log_interval,
        "training.log_interval": case.log_interval,
        "training.eval_interval": 1_000_000,
        "training.checkpoint_interval": case.checkpoint_interval,
        "training.keep_checkpoints": 1,
        "tracking.enabled": True,
        "tracking.uri": f"sqlite:///{work / 'mlflow.db'}",
        "tracking.log_checkpoints": "none",
        **case.settings,
    }
    command = [
        sys.executable,
        str(ROOT / "stages" / "train.py"),
        "--model_size",
        case.model,
        "--output_dir",
        str(run_dir),
    ]
    for key, value in settings.items():
        command += ["--set", f"{key}={'null' if value is None else value}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log_path = log_dir / f"{case.name}.log"
    started = time.perf_counter()
    rates: list[tuple[int, float, float | None, float | None]] = []
    stalls: list[float] = []
    host_peak = 0.0
    status = "ok"
    with (
        log_path.open("w") as log,
        subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        ) as child,
    ):
        assert child.stdout is not None
        for line in child.stdout:
            log.write(line)
            host_peak = max(host_peak, peak_rss_gib(child.pid))
            if (match := STEP_LINE.search(line)) is not None:
                step, tps, mfu_pct, mem = match.groups()
                rates.append(
                    (int(step), float(tps), mfu_pct and float(mfu_pct), mem and float(mem))
                )
            elif (match := STALL_LINE.search(line)) is not None and int(match.group(1)) > 0:
                stalls.append(float(match.group(2)))
            if len([r for r in rates if r[0] > case.log_interval * case.warmup_logs]) >= case.logs:
                break
            if time.perf_counter() > deadline:
                status = "deadline"
                break
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        if status == "ok" and child.returncode not in (0, -signal.SIGKILL):
            status = f"exit {child.returncode}"
    measured = [r for r in rates if r[0] > case.log_interval * case.warmup_logs]
    result: dict[str, Any] = {
        "case": case.name,
        **asdict(case),
        "status": status,
        "seconds": round(time.perf_counter() - started, 1),
        "log": str(log_path),
    }
    if measured:
        tokens_per_s = len(measured) / sum(1 / r[1] for r in measured)  # equal tokens per interval
        mfus = [r[2] for r in measured if r[2] is not None]
        mems = [r[3] for r in measured if r[3] is not None]
        tokens_per_step = case.micro_batch * case.seq
        result.update(
            tokens_per_s=round(tokens_per_s),
            mfu=round(statistics.mean(mfus) / 100, 4) if mfus else None,
            step_ms=round(1000 * tokens_per_step / tokens_per_s, 1),
            peak_gpu_gib=max(mems) if mems else None,
            predicted_gpu_gib=round(predicted_gpu_gib(case, vocab) or 0, 1),
            peak_host_gib=round(host_peak, 1),
            worst_checkpoint_stall_s=max(stalls) if stalls else None,
            checkpoint_stalls_s=stalls,
            intervals=[r[1] for r in measured],
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", help="comma-separated case names (default: by device)")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.jsonl")
    parser.add_argument("--logs", type=Path, default=None, help="folder for each run's output")
    parser.add_argument("--budget_s", type=float, default=3600, help="stop starting cases after")
    args = parser.parse_args()
    if args.list:
        for case in CASES:
            print(case)
        return
    kind = gpu_kind()
    default = [c.name for c in CASES if c.cuda == bool(kind)]
    names = args.shapes.split(",") if args.shapes else default
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(BY_NAME)}")
    deadline = time.perf_counter() + args.budget_s
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        logs = args.logs or Path(tmp) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for name in names:
            if time.perf_counter() > deadline:
                print(f"{name}: skipped (budget spent)", flush=True)
                continue
            result = run_case(BY_NAME[name], Path(tmp), deadline, logs)
            result["gpu"] = kind or "cpu"
            result["date"] = time.strftime("%Y-%m-%d")
            references = REFERENCE_TOKENS_PER_S.get(kind or "", {})
            reference = references.get(result.get("reference") or "")
            if reference and result.get("tokens_per_s"):
                result["vs_reference"] = round(result["tokens_per_s"] / reference, 3)
            rows.append(result)
            with args.out.open("a") as out:
                out.write(json.dumps(result) + "\n")
            print(format_row(result), flush=True)
    print("\n" + "\n".join(format_row(r) for r in rows))


def format_row(r: dict[str, Any]) -> str:
    if "tokens_per_s" not in r:
        return f"{r['case']:>12} [{r['gpu']}]: {r['status']} after {r['seconds']} s ({r['log']})"
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
    gpu = f"{r['peak_gpu_gib']:.1f}" if r.get("peak_gpu_gib") is not None else "-"
    stall = r.get("worst_checkpoint_stall_s")
    return (
        f"{r['case']:>12} [{r['gpu']}] {r['precision']} {r['seq']}x{r['micro_batch']}: "
        f"{r['tokens_per_s']:>9,} tok/s  MFU {mfu:>6}  {r['step_ms']:>7.1f} ms/step  "
        f"GPU {gpu} GiB (plan {r['predicted_gpu_gib']})  host {r['peak_host_gib']} GiB  "
        f"ckpt stall {stall if stall is not None else '-'} s  "
        f"x ref {r.get('vs_reference', '-')}  [{r['status']}]"
    )


if __name__ == "__main__":
    main()
