"""Measured per-rank peak memory of FSDP2 (x TP) on CPU ranks against `gpt3 plan`'s figure.

    python bench/fsdp_memory.py [--world_size 2] [--tensor_parallel 1] [--d_model 768]
                                [--n_layer 4] [--precision fp32|bf16]

Starts `world_size` gloo ranks. Each builds the GPT the way the FSDP strategy does
(`pipeline.distributed.parallelize.build_sharded`: on the meta device, tensor parallelism over
the mesh's `tp` axis, `fully_shard` per block and root over `dp`, then only the rank's shards
materialised), then runs two AdamW steps. The PyTorch profiler records every CPU tensor
allocation and free on the rank; the running sum of those is the rank's live tensor memory,
and its maximum in each phase is the measured peak. The planner's prediction for the same shape
(`pipeline.distributed.planner_fsdp` with the precision's byte sizes, activations at 4 bytes
when fp32) is printed beside it, one JSON line per rank and phase.

Why the profiler and not RSS: glibc keeps freed memory in its heap, so RSS rises but does not
fall with tensors; the profiler's allocation events are exact for tensors (gloo's own buffers,
a few KiB, are outside them).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config.schema import ModelConfig
from pipeline.distributed.planner import activation_bytes
from pipeline.distributed.planner_fsdp import (
    BF16_FP32_REDUCE,
    FP32,
    fsdp_build_bytes,
    fsdp_state_bytes,
    fsdp_working_bytes,
    param_split,
)

VOCAB = 1024


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_config(d_model: int, n_layer: int) -> ModelConfig:
    """A GPT-3-shaped model (d_ff = 4 d, heads of 64) small enough for two CPU ranks."""
    return ModelConfig(
        name=f"bench-{d_model}x{n_layer}",
        n_layer=n_layer,
        d_model=d_model,
        n_head=d_model // 64,
        d_ff=4 * d_model,
        n_ctx=128,
        dropout=0.0,
    )


def predicted(args: argparse.Namespace) -> dict[str, int]:
    """The planner's figures for this shape on `world_size` FSDP ranks (TP 1)."""
    config = model_config(args.d_model, args.n_layer)
    split = param_split(config, VOCAB)
    precision = FP32 if args.precision == "fp32" else BF16_FP32_REDUCE
    t = args.tensor_parallel
    dp = args.world_size // t
    states, _ = fsdp_state_bytes(split, t, dp, offload=False)
    working = fsdp_working_bytes(split, t, precision)
    acts = activation_bytes(
        config, VOCAB, args.micro_batch, args.seq_len, checkpointing=False, tensor_parallel=t
    )
    acts = acts * 2 if args.precision == "fp32" else acts  # the formula counts 16-bit activations
    return {
        "build": fsdp_build_bytes(split, t, dp),
        "states": states,
        "working": working,
        "activations": acts,
        "step": states + working + acts,
    }


def _rank(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.world_size)
    from torch.profiler import ProfilerActivity, profile

    from pipeline.distributed.mesh import build_mesh
    from pipeline.distributed.parallelize import build_sharded

    mesh = build_mesh("cpu", args.world_size, args.tensor_parallel)
    config = model_config(args.d_model, args.n_layer)
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (args.micro_batch, args.seq_len + 1))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.profiler.record_function("build"):
            torch.manual_seed(0)
            model = build_sharded(config, VOCAB, mesh, torch.device("cpu"), args.precision)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for step in range(2):
            with torch.profiler.record_function(f"step{step + 1}"):
                _, loss = model(tokens[:, :-1], tokens[:, 1:])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    windows = {
        e.name(): (e.start_ns(), e.end_ns())
        for e in prof.profiler.kineto_results.events()
        if e.name() in ("build", "step1", "step2")
    }
    memory = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    peaks = dict.fromkeys(windows, 0)
    live = 0
    for start, nbytes in memory:
        live += nbytes
        for phase, (begin, end) in windows.items():
            if begin <= start <= end:
                peaks[phase] = max(peaks[phase], live)
    with open(f"{out}.{rank}", "w") as handle:
        json.dump(peaks, handle)
    dist.destroy_process_group()


def measure(args: argparse.Namespace, out: str) -> list[dict[str, int]]:
    """Per-rank measured peaks ({phase: bytes}) of `args`' shape."""
    port = _free_port()
    mp.spawn(_rank, args=(args, port, out), nprocs=args.world_size, join=True)
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(args.world_size)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world_size", type=int, default=2)
    parser.add_argument("--tensor_parallel", type=int, default=1)
    parser.add_argument("--d_model", type=int, default=768)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--micro_batch", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    args = parse_args(argv)
    expected = predicted(args)
    with tempfile.TemporaryDirectory() as tmp:
        ranks = measure(args, str(Path(tmp) / "peaks"))
    mib = 2**20
    for rank, peaks in enumerate(ranks):
        for phase, planner in (("build", "build"), ("step1", "step"), ("step2", "step")):
            print(
                json.dumps(
                    {
                        "shape": model_config(args.d_model, args.n_layer).name,
                        "precision": args.precision,
                        "world_size": args.world_size,
                        "tensor_parallel": args.tensor_parallel,
                        "rank": rank,
                        "phase": phase,
                        "measured_mib": round(peaks[phase] / mib, 1),
                        "planner_mib": round(expected[planner] / mib, 1),
                        "ratio": round(peaks[phase] / expected[planner], 3),
                    }
                )
            )
    parts = {key: round(value / mib, 1) for key, value in expected.items()}
    print(json.dumps({"planner_parts_mib": parts}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
