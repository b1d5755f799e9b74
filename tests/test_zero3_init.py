"""ZeRO-3 builds the GPT under `deepspeed.zero.Init` with today's weights (issue 19, item 8).

Real DeepSpeed on the CPU over gloo, in spawned ranks (as tests/parallel_support.py spawns
them): on one rank the gathered weights are bitwise those of `GPT(config)` for the same seed
(fp32; in bf16 those weights rounded), and the generator is left where today's build leaves it;
on two ranks each rank holds half of every parameter and the gathered weights are the same again,
so the build is deterministic for a seed whatever the world size. Training through the trainer
under ZeRO-3 is tested in test_deepspeed.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_overrides

from pipeline.config.loader import load_config
from pipeline.config.schema import Config
from pipeline.distributed.zero_init import build_partitioned, builds_partitioned, decay_groups
from pipeline.errors import ConfigError
from pipeline.model import GPT
from pipeline.training.components import seed_everything

VOCAB = 500
ZERO3 = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 3, "overlap_comm": False},
}


def _write_json(tmp: Path, stage: int = 3) -> None:
    """The DeepSpeed JSON, written before any rank starts (ranks only read it)."""
    zero = {**ZERO3["zero_optimization"], "stage": stage}
    (tmp / f"zero{stage}.json").write_text(json.dumps({**ZERO3, "zero_optimization": zero}))


def _config(tmp: Path, precision: str = "fp32", stage: int = 3) -> Config:
    ds_json = tmp / f"zero{stage}.json"
    extra = {"distributed.deepspeed_config": str(ds_json), "training.precision": precision}
    return load_config(overrides=tiny_overrides(tmp / "prepared", tmp / "run", extra))


def _full_weights(model: GPT) -> dict[str, torch.Tensor]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {name: p.detach().clone() for name, p in model.named_parameters()}


def _check(tmp: Path, precision: str, seed: int, rank: int, world: int) -> dict:
    """Build under zero.Init, gather, compare with today's build (rank 0 reports)."""
    config = _config(tmp, precision)
    seed_everything(seed)
    model = build_partitioned(config, VOCAB, torch.device("cpu"))
    generator_after = torch.get_rng_state()
    held = {
        name: (p.numel(), p.ds_tensor.numel(), p.ds_numel) for name, p in model.named_parameters()
    }
    got = _full_weights(model)
    seed_everything(seed)
    today = GPT(config.model, VOCAB)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    want = {name: p.detach().to(dtype) for name, p in today.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    today_names = {id(p): n for n, p in today.named_parameters()}
    return {
        "keys_equal": list(got) == list(want),
        "bitwise": {k: torch.equal(got[k], want[k]) for k in want},
        "dtype": str(next(iter(got.values())).dtype),
        "generator_as_today": torch.equal(generator_after, torch.get_rng_state()),
        "tied": model.lm_head.weight is model.wte.weight,
        "held": held,
        "groups": [sorted(names[id(p)] for p in g["params"]) for g in decay_groups(model, 0.1)],
        "today_groups": [
            sorted(today_names[id(p)] for p in g["params"]) for g in today.param_groups(0.1)
        ],
        "digest": float(sum(v.double().sum() * (i + 1) for i, v in enumerate(got.values()))),
        "world": world,
        "rank": rank,
    }


def _worker(rank: int, world: int, cases: list[tuple[str, int]], tmp: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    init = f"file://{tmp}/rendezvous"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        results = [_check(Path(tmp), precision, seed, rank, world) for precision, seed in cases]
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _spawn(world: int, cases: list[tuple[str, int]], tmp: Path) -> list[list[dict]]:
    """Every rank's results, rank by rank."""
    _write_json(tmp)
    mp.spawn(_worker, args=(world, cases, str(tmp)), nprocs=world, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]


def _assert_todays_weights(result: dict) -> None:
    assert result["keys_equal"]
    assert all(result["bitwise"].values()), [k for k, ok in result["bitwise"].items() if not ok]
    assert result["tied"] and result["generator_as_today"]
    assert result["groups"] == result["today_groups"]


def test_one_rank_gathers_todays_weights_bitwise(tmp_path: Path) -> None:
    (rank0,) = _spawn(1, [("fp32", 0), ("fp32", 7), ("bf16", 0)], tmp_path)
    fp32_seed0, fp32_seed7, bf16 = rank0
    for result in (fp32_seed0, fp32_seed7, bf16):
        _assert_todays_weights(result)
    assert fp32_seed0["dtype"] == "torch.float32" and bf16["dtype"] == "torch.bfloat16"
    assert fp32_seed0["digest"] != fp32_seed7["digest"]


def test_two_ranks_hold_halves_and_build_deterministically(tmp_path: Path) -> None:
    ranks = _spawn(2, [("fp32", 0), ("fp32", 0)], tmp_path)
    for first, again in ranks:
        _assert_todays_weights(first)  # every rank: today's weights, so the same on each
        assert first["digest"] == again["digest"]
        for name, (local, partition, full) in first["held"].items():
            assert local == 0, f"{name}: a whole parameter is held outside its partition"
            assert partition == -(-full // 2), name  # ceil: DeepSpeed pads the last partition
    assert ranks[0][0]["digest"] == ranks[1][0]["digest"]


def test_stage3_is_detected_and_needs_the_jobs_process_group(tmp_path: Path) -> None:
    _write_json(tmp_path, 3)
    _write_json(tmp_path, 2)
    assert builds_partitioned(_config(tmp_path, stage=3))
    assert not builds_partitioned(_config(tmp_path, stage=2))
    assert not dist.is_initialized()
    config = _config(tmp_path, stage=3)
    with pytest.raises(ConfigError, match=r"zero3\.json: ZeRO stage 3 builds the model"):
        build_partitioned(config, VOCAB, torch.device("cpu"))
