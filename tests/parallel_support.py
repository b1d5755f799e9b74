"""A small training loop run by spawned gloo ranks, for the FSDP / tensor-parallel tests and bench.

Every layout trains the same tiny GPT on the same global batches: each data-parallel slice takes
its contiguous part of the global batch (as the trainer's DDP path does), the ranks of one
tensor-parallel group share a slice. The loss reported for a step is the mean over the slices,
which is the global batch's mean loss, so it compares directly with one device's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from pipeline.checkpoint.dcp_store import ModelState, OptimizerState
from pipeline.config.schema import ModelConfig
from pipeline.distributed import tensor_parallel
from pipeline.distributed.fsdp import clip_grad_norm
from pipeline.distributed.mesh import build_mesh, data_slice
from pipeline.distributed.parallelize import build_sharded, parallelize
from pipeline.model import GPT

TINY = ModelConfig(name="t", n_layer=2, d_model=64, n_head=4, d_head=16, d_ff=128, n_ctx=32)
VOCAB = 500  # padded to 512 rows: splits over 2 and 4 tensor-parallel ranks


@dataclass
class Job:
    """What every rank of one spawned run does."""

    world_size: int = 1
    ddp: bool = False
    """DistributedDataParallel over every rank instead of FSDP (tensor_parallel stays 1)."""
    tensor_parallel: int = 1
    sequence_parallel: bool = False
    """Split the activations between the tensor-parallel layers by position too."""
    steps: int = 30
    global_batch: int = 8
    seq_len: int = 32
    seed: int = 1234
    meta_init: bool = True
    """Build on the meta device and materialize the shards (else build whole, then shard)."""
    compare_init: bool = False
    """Rank 0 checks the sharded model's full weights against `GPT(config)` bitwise."""
    model: dict = field(default_factory=lambda: TINY.model_dump())
    gradient_checkpointing: bool = False
    """Recompute each block's activations in backward (inside FSDP's hooks)."""
    first_step: int = 0
    """Train on the global batches from this step on (a resumed run)."""
    load_dir: str | None = None
    """Restore model and optimizer from this DCP checkpoint before training."""
    save_dir: str | None = None
    """Save model and optimizer to this DCP checkpoint after training."""


def batches(job: Job) -> list[torch.Tensor]:
    """The run's global batches of token ids, the same for every layout."""
    g = torch.Generator().manual_seed(job.seed + 1)
    steps = torch.arange(job.seq_len + 1)
    out = []
    for _ in range(job.first_step + job.steps):  # learnable: each token follows from the last
        start = torch.randint(0, VOCAB, (job.global_batch, 1), generator=g)
        out.append((start + 7 * steps) % VOCAB)
    return out[job.first_step :]


def full_state(model: GPT) -> dict[str, torch.Tensor]:
    """Every parameter whole (DTensors gathered), keyed as the plain model's state dict."""
    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
    }


def checkpoint_states(model: GPT, optimizer: torch.optim.Optimizer) -> dict:
    """What the FSDP strategy writes through DCP: model and optimizer, q/k/v as views."""
    return tensor_parallel.checkpoint_states(
        {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer)}
    )


def train(
    model: GPT, job: Job, rank: int, slices: int, forward: torch.nn.Module | None = None
) -> dict[str, list[float]]:
    """`job.steps` AdamW steps with clipping; per-step global loss, grad norm and step time.

    `forward` (default: `model`) is what computes the loss, e.g. a DDP wrapper of `model`.
    Loads `job.load_dir` first and saves `job.save_dir` after, when set (DCP, any layout)."""
    forward = forward or model
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=3e-3)
    if job.load_dir is not None:
        dcp.load(checkpoint_states(model, optimizer), checkpoint_id=job.load_dir)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out: dict[str, list[float]] = {"loss": [], "grad_norm": [], "seconds": []}
    for batch in batches(job):
        per = job.global_batch // slices
        mine = batch[rank * per : (rank + 1) * per]
        start = time.perf_counter()
        _, loss = forward(mine[:, :-1], mine[:, 1:])
        loss.backward()
        norm = clip_grad_norm(params, 1.0) if slices > 1 or _sharded(model) else None
        if norm is None:
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out["seconds"].append(time.perf_counter() - start)
        reported = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(reported)
            reported /= dist.get_world_size()  # tensor-parallel ranks hold the same loss
        out["loss"].append(float(reported))
        out["grad_norm"].append(float(norm))
    if job.save_dir is not None:
        dcp.save(checkpoint_states(model, optimizer), checkpoint_id=job.save_dir)
    return out


def _sharded(model: GPT) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def single(job: Job) -> dict[str, list[float]]:
    """One process, today's build: the reference run."""
    torch.manual_seed(job.seed)
    model = GPT(ModelConfig(**job.model), VOCAB)
    return train(model, job, 0, 1)


def run_layout(job: Job, rank: int) -> dict:
    """Build, lay out and train `job`'s model on this rank (inside an initialised group)."""
    if job.ddp:
        torch.manual_seed(job.seed)
        model = GPT(ModelConfig(**job.model), VOCAB)
        return train(model, job, rank, job.world_size, DistributedDataParallel(model))
    mesh = build_mesh("cpu", job.world_size, job.tensor_parallel)
    config = ModelConfig(**job.model)
    torch.manual_seed(job.seed)
    if job.meta_init:
        model = build_sharded(
            config, VOCAB, mesh, torch.device("cpu"), sequence_parallel=job.sequence_parallel
        )
    else:
        model = parallelize(GPT(config, VOCAB), mesh, sequence_parallel=job.sequence_parallel)
    model.set_gradient_checkpointing(job.gradient_checkpointing)
    result: dict = {}
    if job.compare_init:
        got = full_state(model)
        if rank == 0:
            torch.manual_seed(job.seed)
            want = GPT(config, VOCAB).state_dict()
            result["init_equal"] = {k: torch.equal(got[k], want[k]) for k in got}
            result["tied"] = model.lm_head.weight is model.wte.weight
    piece = data_slice(mesh)
    result.update(train(model, job, piece.rank, piece.world_size))
    return result


def _worker(rank: int, jobs: list[Job], init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=jobs[0].world_size
    )
    try:
        results = [run_layout(job, rank) for job in jobs]
        if rank == 0:
            Path(out_dir, "result.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def spawn(jobs: list[Job], tmp: Path) -> list[dict]:
    """Run `jobs` one after the other on the same spawned gloo ranks (one start-up for all:
    they must share a world size); rank 0's results in order."""
    if len({job.world_size for job in jobs}) != 1:
        raise ValueError("jobs spawned together must share a world size")
    tmp.mkdir(parents=True, exist_ok=True)
    init_file = tmp / "rendezvous"
    init_file.unlink(missing_ok=True)
    mp.spawn(_worker, args=(jobs, str(init_file), str(tmp)), nprocs=jobs[0].world_size, join=True)
    return json.loads((tmp / "result.json").read_text())
