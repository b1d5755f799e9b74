"""Step time per parallel layout on CPU (gloo): one device, DDP, FSDP2, TP and FSDP x TP.

    .venv/bin/python bench/strategies.py [--steps 10] [--layouts single,ddp2,fsdp2,tp2,fsdp2xtp2]

`tp2-sp` and `fsdp2xtp2-sp` are the tensor-parallel layouts with sequence parallelism
(`distributed.sequence_parallel`): the same model and batch, the activations between the split
layers sharded by position.

Every layout trains the same model (configs/model_configs/tiny.yaml by default) on the same
global batch; each rank runs one thread. Printed: the median step time over the timed steps
(after 2 warm-up steps), tokens per second, and the ratio to one device. On CPU this measures
the cost of the collectives and the sharding bookkeeping, not what a GPU would gain: what still
needs a GPU to measure is in bench/NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.config.schema import ModelConfig  # noqa: E402
from pipeline.distributed.fsdp import clip_grad_norm  # noqa: E402
from pipeline.distributed.mesh import build_mesh, data_slice  # noqa: E402
from pipeline.distributed.parallelize import build_sharded  # noqa: E402
from pipeline.model import GPT  # noqa: E402

VOCAB = 512
WARMUP = 2


@dataclass(frozen=True)
class Layout:
    name: str
    world_size: int
    kind: str  # single | ddp | sharded
    tensor_parallel: int = 1
    sequence_parallel: bool = False


LAYOUTS = {
    "single": Layout("single", 1, "single"),
    "ddp2": Layout("ddp2", 2, "ddp"),
    "fsdp2": Layout("fsdp2", 2, "sharded"),
    "tp2": Layout("tp2", 2, "sharded", 2),
    "fsdp2xtp2": Layout("fsdp2xtp2", 4, "sharded", 2),
    "tp2-sp": Layout("tp2-sp", 2, "sharded", 2, sequence_parallel=True),
    "fsdp2xtp2-sp": Layout("fsdp2xtp2-sp", 4, "sharded", 2, sequence_parallel=True),
}


def step_times(
    model: torch.nn.Module, plain: GPT, args: argparse.Namespace, rank: int, slices: int
) -> list[float]:
    optimizer = torch.optim.AdamW(plain.param_groups(0.1), lr=1e-3)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    g = torch.Generator().manual_seed(0)
    per = args.batch // slices
    times = []
    for _ in range(WARMUP + args.steps):
        batch = torch.randint(0, VOCAB, (args.batch, args.seq + 1), generator=g)
        mine = batch[rank * per : (rank + 1) * per]
        start = time.perf_counter()
        _, loss = model(mine[:, :-1], mine[:, 1:])
        loss.backward()
        clip_grad_norm(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[WARMUP:]


def _worker(rank: int, layout: Layout, args: argparse.Namespace, init: str, out: str) -> None:
    torch.set_num_threads(1)
    config = ModelConfig(**args.model)
    if layout.world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank,
                                world_size=layout.world_size)  # fmt: skip
    torch.manual_seed(0)
    if layout.kind == "sharded":
        mesh = build_mesh("cpu", layout.world_size, layout.tensor_parallel)
        model = build_sharded(
            config, VOCAB, mesh, torch.device("cpu"), sequence_parallel=layout.sequence_parallel
        )
        piece = data_slice(mesh)
        times = step_times(model, model, args, piece.rank, piece.world_size)
    else:
        plain = GPT(config, VOCAB)
        model = plain
        if layout.kind == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(plain)
        times = step_times(model, plain, args, rank, layout.world_size)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    if layout.world_size > 1:
        dist.destroy_process_group()


def measure(layout: Layout, args: argparse.Namespace) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        out, init = str(Path(tmp, "times.json")), str(Path(tmp, "init"))
        if layout.world_size == 1:
            _worker(0, layout, args, init, out)
        else:
            mp.spawn(_worker, args=(layout, args, init, out), nprocs=layout.world_size)
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8, help="global batch, sequences")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--model_config", default=str(REPO / "configs/model_configs/tiny.yaml"))
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    args = parser.parse_args()
    args.model = yaml.safe_load(Path(args.model_config).read_text())["model"]
    args.model["n_ctx"] = max(args.model.get("n_ctx", args.seq), args.seq)
    tokens = args.batch * args.seq
    print(f"model {args.model['name']}, global batch {args.batch} x {args.seq} tokens, "
          f"median of {args.steps} steps, 1 thread per rank")  # fmt: skip
    print(f"{'layout':<12}{'ranks':>6}{'step s':>10}{'tokens/s':>10}{'vs single':>11}", flush=True)
    base = None
    for name in args.layouts.split(","):  # printed as measured: a slow layout shows the rest
        layout = LAYOUTS[name]
        seconds = statistics.median(measure(layout, args))
        base = seconds if name == "single" else base
        ratio = f"{seconds / base:.2f}x" if base else "-"
        print(
            f"{name:<12}{layout.world_size:>6}{seconds:>10.4f}{tokens / seconds:>10.0f}{ratio:>11}",
            flush=True,
        )


if __name__ == "__main__":
    main()
