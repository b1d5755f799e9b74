"""DDP, FSDP2, tensor parallelism and both, on CPU with gloo: the same losses as one device
(issue 19, items 3, 4, 6 and 8), sequence parallelism included.

Each layout trains the tiny GPT for 30 fp32 AdamW steps with gradient clipping on the same
global batches (each data-parallel slice its contiguous part, as DDP does); the per-step global
loss and gradient norm must equal the single-process run's within 1e-5 relative. Every sharded
model is built on the meta device and materialized: its full weights must be today's bitwise.
Layouts of one world size share one spawn (start-up dominates the time on CPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from parallel_support import TINY, VOCAB, Job, single, spawn

from pipeline.config.loader import load_config
from pipeline.distributed.mesh import build_mesh
from pipeline.distributed.strategy import choose_strategy
from pipeline.distributed.tensor_parallel import (
    check_sequence_parallel,
    check_tensor_parallel,
    sequence_split_check,
)
from pipeline.errors import ConfigError
from pipeline.model import GPT

STEPS = 30
REL = 1e-5
SEQUENCE_PARALLEL = {"tensor_parallel": 2, "sequence_parallel": True}


@pytest.fixture(scope="module")
def reference() -> dict[str, list[float]]:
    return single(Job(steps=STEPS))


def assert_same_curve(got: dict, want: dict, rel: float = REL, steps: int = STEPS) -> None:
    for key in ("loss", "grad_norm"):
        assert len(got[key]) == steps and len(want[key]) == STEPS
        for step, (a, b) in enumerate(zip(got[key], want[key][:steps], strict=True)):
            assert abs(a - b) <= rel * abs(b), f"{key} at step {step}: {a} vs {b}"


def test_the_reference_run_learns(reference: dict) -> None:
    """The comparison means something: the loss moves well away from its start."""
    assert reference["loss"][-1] < 0.7 * reference["loss"][0]


def test_fsdp_and_tensor_parallel_on_two_ranks_equal_one_device(
    reference: dict, tmp_path: Path
) -> None:
    ddp, fsdp, tp, sp, recomputed, sp_recomputed = spawn(
        [
            Job(world_size=2, ddp=True, steps=STEPS),
            Job(world_size=2, tensor_parallel=1, steps=STEPS, compare_init=True),
            Job(world_size=2, tensor_parallel=2, steps=STEPS, compare_init=True),
            Job(world_size=2, steps=STEPS, compare_init=True, **SEQUENCE_PARALLEL),
            Job(world_size=2, steps=10, compare_init=True, gradient_checkpointing=True),
            Job(world_size=2, steps=5, gradient_checkpointing=True, **SEQUENCE_PARALLEL),
        ],
        tmp_path,
    )
    for result in (fsdp, tp, sp, recomputed):
        assert all(result["init_equal"].values()), result["init_equal"]
        assert result["tied"]
    assert_same_curve(ddp, reference)
    assert_same_curve(fsdp, reference)
    assert_same_curve(tp, reference)
    assert_same_curve(sp, reference)  # sequence parallel: norm gradients summed over the group
    assert_same_curve(recomputed, reference, steps=10)  # activation checkpointing inside FSDP
    assert_same_curve(sp_recomputed, reference, steps=5)  # recomputation repeats the gathers


def test_fsdp_by_tensor_parallel_two_by_two_equals_one_device(
    reference: dict, tmp_path: Path
) -> None:
    both, both_sp, ddp = spawn(
        [
            Job(world_size=4, tensor_parallel=2, steps=STEPS, compare_init=True),
            Job(world_size=4, steps=STEPS, **SEQUENCE_PARALLEL),
            Job(world_size=4, ddp=True, steps=STEPS),
        ],
        tmp_path,
    )
    assert all(both["init_equal"].values()), both["init_equal"]
    assert_same_curve(ddp, reference)
    assert_same_curve(both, reference)
    assert_same_curve(both_sp, reference)


def test_a_model_that_does_not_split_is_refused() -> None:
    with torch.device("meta"):
        model = GPT(TINY.model_copy(update={"n_head": 2, "d_head": 32}), VOCAB)
    with pytest.raises(ConfigError, match="n_head 2 is not a multiple"):
        check_tensor_parallel(model, 4)
    model.set_loss_chunking(128)
    with pytest.raises(ConfigError, match="loss_chunk_tokens"):
        check_tensor_parallel(model, 2)


def test_sequence_parallel_refuses_a_length_it_cannot_split_and_generation() -> None:
    with pytest.raises(ConfigError, match=r"sequence length 30 .* not a multiple of .*4"):
        check_sequence_parallel(30, 4)
    check_sequence_parallel(32, 4)
    check = sequence_split_check(2)
    check(None, (torch.zeros(2, 8, dtype=torch.long),), {})  # a training forward passes
    with pytest.raises(ValueError, match="multiple of 2, got 7"):
        check(None, (torch.zeros(2, 7, dtype=torch.long),), {})
    with pytest.raises(ValueError, match="does not generate"):
        check(None, (torch.zeros(1, 8, dtype=torch.long),), {"last_only": True})


@pytest.mark.parametrize(
    ("distributed", "accepted"),
    [
        ({"strategy": "fsdp", "tensor_parallel": 2, "sequence_parallel": True}, True),
        ({"strategy": "fsdp", "tensor_parallel": 1, "sequence_parallel": True}, False),
        ({"strategy": "ddp", "tensor_parallel": 2, "sequence_parallel": True}, False),
    ],
)
def test_sequence_parallel_needs_fsdp_with_tensor_parallel(
    distributed: dict, accepted: bool, tmp_path: Path
) -> None:
    params = tmp_path / "params.yaml"
    training = {"max_steps": 10, "global_batch_size": 4}
    params.write_text(yaml.safe_dump({"training": training, "distributed": distributed}))
    if accepted:
        assert load_config(params_file=params).distributed.sequence_parallel
        return
    with pytest.raises(ConfigError, match=r"distributed\.sequence_parallel.*needs strategy fsdp"):
        load_config(params_file=params)


def test_a_tensor_parallel_launch_checks_dropout_and_the_sequence_split(tmp_path: Path) -> None:
    """Before any worker starts (`choose_strategy`, which `plan_launch` calls): dropout under TP
    alone would repeat one attention-dropout mask on every rank's heads, and sequence
    parallelism needs a length it can split. The config itself still loads (a model trained
    that way stays readable for evaluation and export)."""
    params = tmp_path / "params.yaml"
    distributed = {"strategy": "fsdp", "tensor_parallel": 2}
    values = {"model": {"dropout": 0.1}, "distributed": distributed}
    params.write_text(yaml.safe_dump(values))
    config = load_config(params_file=params)
    with pytest.raises(ConfigError, match=r"model\.dropout 0\.1 with distributed\.tensor_parallel"):
        choose_strategy(config, 2)
    values["distributed"] = {**distributed, "sequence_parallel": True}
    params.write_text(yaml.safe_dump(values))
    assert choose_strategy(load_config(params_file=params), 2) == "fsdp"
    values["distributed"] = {**distributed, "tensor_parallel": 3, "sequence_parallel": True}
    values["training"] = {"seq_len": 256, "max_steps": 10, "global_batch_size": 4}
    params.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match=r"sequence length 256 .* not a multiple of .*3"):
        choose_strategy(load_config(params_file=params), 3)


def test_a_tensor_parallel_degree_that_does_not_divide_the_ranks_is_refused() -> None:
    with pytest.raises(ConfigError, match="tensor_parallel 3 does not divide the 4"):
        build_mesh("cpu", 4, 3)


def test_a_single_device_optimizer_state_is_keyed_by_parameter_name() -> None:
    """Resuming FSDP from a one-file checkpoint: positions map to the right parameters."""
    from pipeline.distributed.fsdp_strategy import keyed_by_name

    torch.manual_seed(0)
    model = GPT(TINY, VOCAB)
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=1e-3)
    _, loss = model(torch.randint(0, VOCAB, (2, 8)), torch.randint(0, VOCAB, (2, 8)))
    loss.backward()
    optimizer.step()
    named = keyed_by_name(optimizer.state_dict(), model)
    params = dict(model.named_parameters())
    assert set(named["state"]) == set(params)
    for name, state in named["state"].items():
        assert torch.equal(state["exp_avg"], optimizer.state[params[name]]["exp_avg"]), name
    assert [g["weight_decay"] for g in named["param_groups"]] == [0.1, 0.0]
    with pytest.raises(ValueError, match="covers"):
        keyed_by_name(optimizer.state_dict(), GPT(TINY.model_copy(update={"n_layer": 1}), VOCAB))
