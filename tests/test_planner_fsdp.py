"""`gpt3 plan` for FSDP2 and FSDP2 x tensor parallelism: parameter split, memory, the layouts it
recommends for 13B and 175B, DeepSpeed's own estimators, and a measured CPU peak."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import REPO_ROOT

from pipeline.cli.plan import plan as plan_command
from pipeline.config.loader import load_config
from pipeline.config.schema import ModelConfig
from pipeline.distributed.planner import GIB, activation_bytes, make_plan, verdict
from pipeline.distributed.planner_advice import recommend
from pipeline.distributed.planner_fsdp import (
    fsdp_state_bytes,
    param_split,
    shard_params,
    tensor_parallel_degrees,
)
from pipeline.model import GPT, count_parameters

VOCAB = 50257
LARGE = "configs/training_configs/large_scale.yaml"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)  # model sizes are looked up in configs/model_configs


def _config(size: str):
    return load_config(model_size=size, training_config=LARGE)


def _plan(size: str, gpus: int):
    config = _config(size)
    global_batch = config.training.global_batch_tokens // 2048
    return make_plan(config.model, VOCAB, gpus, min(gpus, 8), 4, 2048, global_batch)


def _row(plan, name: str):
    return next(row for row in plan.rows if row.setup.name == name)


def test_param_split_matches_the_model_built_on_the_meta_device() -> None:
    """Every parameter of a real GPT lands in exactly one class, with the tensor-parallel
    placement `pipeline.distributed.tensor_parallel` gives it."""
    model_config = ModelConfig(n_layer=3, d_model=96, n_head=6, d_head=16, d_ff=320, n_ctx=64)
    with torch.device("meta"):
        model = GPT(model_config, 1000)
    split_names = ("attn.c_attn", "attn.c_proj.weight", "mlp.c_fc", "mlp.c_proj.weight")
    split = replicated = root = 0
    for name, param in model.named_parameters():  # the tied head appears once
        if name.startswith("h."):
            if any(part in name for part in split_names):
                split += param.numel()
            else:
                replicated += param.numel()
        else:
            root += param.numel()
    counted = param_split(model_config, 1000)
    assert counted.n_layer * counted.block_split == split
    assert counted.n_layer * counted.block_replicated == replicated
    assert counted.root_split + counted.root_replicated == root
    assert counted.total == count_parameters(model_config, 1000, count_padding=True)
    assert counted.local(2) < counted.total and counted.local(1) == counted.total
    assert param_split(model_config, 1000, vocab_parallel=False).root_split == 0


def test_fsdp_states_shard_over_every_gpu_of_the_data_and_tensor_axes() -> None:
    split = param_split(_config("13B").model, VOCAB)
    alone = shard_params(split, 1, 16)
    assert alone == pytest.approx(split.total / 16, rel=1e-6)
    # TP 8 x FSDP 2: the split weights over all 16 GPUs, norms and biases over the 2 dp ranks.
    assert shard_params(split, 8, 2) == pytest.approx(alone, rel=0.01)
    assert shard_params(split, 8, 2) > alone
    gpu, host = fsdp_state_bytes(split, 1, 16, offload=True)
    assert gpu == 0 and host == 16 * alone


def test_tensor_parallel_activations_split_the_attention_and_mlp_parts() -> None:
    model = _config("13B").model
    whole = activation_bytes(model, VOCAB, 4, 2048, checkpointing=False)
    assert activation_bytes(model, VOCAB, 4, 2048, False, tensor_parallel=1) == whole
    tp8 = activation_bytes(model, VOCAB, 4, 2048, False, tensor_parallel=8)
    everything = activation_bytes(
        model, VOCAB, 4, 2048, False, tensor_parallel=8, sequence_parallel=True, loss_parallel=True
    )
    assert everything == pytest.approx(whole / 8, rel=1e-6)
    assert everything < tp8 < whole / 2  # without: LayerNorm inputs and logits stay whole
    ckpt = activation_bytes(model, VOCAB, 4, 2048, True, tensor_parallel=8)
    assert ckpt < tp8 / 3


def test_sequence_parallel_as_the_trainer_applies_it_splits_what_tp_replicates() -> None:
    """`distributed.sequence_parallel` (logits still gathered for the loss): each layer's
    LayerNorm / dropout / residual activations, and a checkpointed layer's input, are divided
    by t; the attention and MLP parts and the logits are unchanged."""
    model = _config("13B").model
    s, b, h, t = 2048, 4, model.d_model, 8
    replicated = (10 if model.dropout > 0 else 8) * s * b * h
    for ckpt, per_layer in ((False, replicated), (True, 2 * s * b * h)):
        tp = activation_bytes(model, VOCAB, b, s, ckpt, tensor_parallel=t)
        sp = activation_bytes(model, VOCAB, b, s, ckpt, tensor_parallel=t, sequence_parallel=True)
        assert tp - sp == model.n_layer * (per_layer - per_layer // t) + (
            replicated - replicated // t if ckpt else 0  # the one layer live while recomputed
        )


def test_tensor_parallel_degrees_stay_within_a_node_and_divide_the_heads() -> None:
    model = _config("175B").model  # 96 heads
    assert tensor_parallel_degrees(model, 1024, 8) == [1, 2, 4, 8]
    assert tensor_parallel_degrees(model, 4, 4) == [1, 2, 4]
    odd = ModelConfig(n_layer=2, d_model=120, n_head=6, d_ff=480)
    assert tensor_parallel_degrees(odd, 16, 8) == [1, 2]


def test_175b_on_1024_h100s_fits_as_tp8_within_nodes_x_fsdp_across_them() -> None:
    """The issue's case: before, every setup said `no (build)`. Built on the meta device the
    FSDP rows need a few GiB to build (650 for a whole fp32 replica); the global batch (1536
    sequences of 2048) splits over 128 data-parallel ranks at micro-batch 4, not over 256, 512
    or 1024."""
    plan = _plan("175B", 1024)
    tp8 = _row(plan, "FSDP x TP 8")
    assert tp8.build < 10 * GIB and tp8.data_parallel == 128 and plan.accumulation(tp8) == 3
    assert verdict(tp8, 80 * GIB, None) == "ckpt"
    for name in ("FSDP", "FSDP x TP 2", "FSDP x TP 4"):
        assert verdict(_row(plan, name), 80 * GIB, None) == "ckpt"
        assert plan.accumulation(_row(plan, name)) is None
    advice = recommend(plan, 80 * GIB, None)
    assert advice.row is tp8 and advice.fit == "ckpt"
    text = "\n".join(advice.lines)
    assert "TP 8 within each node x FSDP over 128 data-parallel ranks" in text
    assert "1536 sequences is not a multiple of 1024 data-parallel ranks" in text
    assert "512 data-parallel ranks x micro-batch 4 (micro-batch 3 would split it)" in text
    assert advice.lines[0] == "recommended: FSDP x TP 8, with gradient checkpointing"
    assert "ZeRO-1: 675.7 GiB per GPU even with gradient checkpointing" in text


def test_13b_layouts_prefer_no_recomputation_then_the_least_tensor_parallelism() -> None:
    on_16 = recommend(_plan("13B", 16), 80 * GIB, None)
    assert on_16.row is not None and on_16.row.setup.name == "FSDP" and on_16.fit == "yes"
    assert any("ZeRO-1: fits only with gradient checkpointing" in line for line in on_16.lines)
    on_8 = recommend(_plan("13B", 8), 80 * GIB, None)
    assert on_8.row is not None and on_8.row.setup.name == "FSDP x TP 2" and on_8.fit == "yes"
    nothing = recommend(_plan("175B", 8), 80 * GIB, None)
    assert nothing.row is None and nothing.lines[0].startswith("recommended: nothing fits")
    assert len(nothing.lines) == 1 + len(_plan("175B", 8).rows)


def _deepspeed_table(function, *args) -> dict[str, tuple[float, float]]:
    """DeepSpeed's printed `_all_cold` table: options -> (GiB per CPU, GiB per GPU)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        function(*args)
    rows = re.findall(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.+)$", printed.getvalue(), re.M)
    return {
        options.replace("OffloadDeviceEnum.", ""): (float(c), float(g)) for c, g, options in rows
    }


@pytest.mark.parametrize(("size", "gpus"), [("13B", 16), ("175B", 1024)])
def test_planner_agrees_with_deepspeeds_own_estimators(size: str, gpus: int) -> None:
    """The ZeRO rows are DeepSpeed's printed figures; FSDP's sharded states are ZeRO-3's
    sharded term at 16 instead of 18 bytes per parameter (FSDP2 keeps no separate 16-bit
    parameter shard: it casts the fp32 master as it gathers), and its offloaded host memory
    DeepSpeed's zero.Init figure without the 1.5 buffer factor."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    plan = _plan(size, gpus)
    nodes = gpus // 8
    zero3 = _deepspeed_table(
        estimate_zero3_model_states_mem_needs_all_cold,
        plan.parameters,
        plan.largest_layer,
        8,
        nodes,
    )
    zero2 = _deepspeed_table(
        estimate_zero2_model_states_mem_needs_all_cold, plan.parameters, 8, nodes
    )
    assert _row(plan, "ZeRO-2").model_states / GIB == pytest.approx(
        zero2["offload_optimizer=none"][1], abs=0.01
    )
    zero3_gpu = zero3["offload_param=none, offload_optimizer=none, zero_init=1"][1]
    assert _row(plan, "ZeRO-3").model_states / GIB == pytest.approx(zero3_gpu, abs=0.01)
    assert _row(plan, "ZeRO-3").host_per_node / GIB == pytest.approx(
        zero3["offload_param=none, offload_optimizer=none, zero_init=0"][0], abs=0.01
    )

    split = param_split(plan.model, VOCAB)
    fsdp_states, _ = fsdp_state_bytes(split, 1, gpus, offload=False)
    deepspeed_sharded = zero3_gpu * GIB - 4 * plan.largest_layer  # 18 bytes x P / N
    assert fsdp_states == pytest.approx(deepspeed_sharded * 16 / 18, rel=0.002)
    offloaded = _row(plan, "FSDP + CPU offload").host_per_node
    deepspeed_host = zero3["offload_param=cpu, offload_optimizer=cpu, zero_init=1"][0] * GIB
    assert offloaded == pytest.approx(deepspeed_host * 16 / (18 * 1.5), rel=0.002)


def test_gpt3_plan_command_marks_fsdp_x_tp_and_refuses_unplanned_degrees() -> None:
    runner = CliRunner()
    result = runner.invoke(
        plan_command, ["--model_size", "175B", "--gpus", "1024", "--gpu", "H100"]
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert re.search(r"^FSDP x TP 8 .* 3  ckpt$", out, re.M)
    assert "  layout  TP 8 within each node x FSDP over 128 data-parallel ranks" in out
    assert "  batch   micro-batch 4 x 128 ranks x 3 accumulation step(s) = 1536" in out
    assert re.search(r"memory per GPU +\d+\.\d GiB, FSDP x TP 8 with gradient checkpointing", out)
    split = runner.invoke(
        plan_command,
        ["--model_size", "175B", "--gpus", "1024", "--gpu", "H100", "--sequence_parallel"],
    )
    assert split.exit_code == 0, split.output
    # Sequence parallelism splits what TP replicates: TP 8 now fits without recomputation.
    assert re.search(r"^FSDP x TP 8 .* 3  yes$", split.output, re.M)
    assert "TP 8 within each node x FSDP over 128 data-parallel ranks" in split.output
    assert "ranks (128 node(s) of 8), sequence parallel" in split.output
    marked = runner.invoke(
        plan_command, ["--model_size", "13B", "--gpus", "16", "--tensor_parallel", "4"]
    )
    chosen = [line for line in marked.output.splitlines() if "<- chosen" in line]
    assert len(chosen) == 1 and chosen[0].startswith("FSDP x TP 4 ")
    bad = runner.invoke(
        plan_command, ["--model_size", "13B", "--gpus", "16", "--fsdp", "--zero", "3"]
    )
    assert bad.exit_code != 0 and "name different setups" in str(bad.exception)
    odd = runner.invoke(
        plan_command, ["--model_size", "13B", "--gpus", "16", "--tensor_parallel", "3"]
    )
    assert odd.exit_code != 0 and "FSDP x TP 3 is not planned" in str(odd.exception)


@pytest.mark.slow
def test_planner_predicts_the_measured_fsdp_peak_on_two_cpu_ranks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/fsdp_memory.py on 2 gloo ranks: the model built by the FSDP strategy's own
    `build_sharded`, two AdamW steps, every tensor allocation counted by the profiler. The
    steady-state peak (step 2) and the build peak are the planner's within 25%: on CPU the
    number of reduce-scatter buffers still pending when the peak is reached depends on gloo's
    timing (it moves the peak by whole blocks), which a GPU's streams bound."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))  # spawned ranks import it by name
    bench = importlib.import_module("fsdp_memory")
    args = bench.parse_args(["--d_model", "512", "--n_layer", "3", "--seq_len", "64"])
    expected = bench.predicted(args)
    for peaks in bench.measure(args, str(tmp_path / "peaks")):
        assert peaks["step2"] / expected["step"] == pytest.approx(1.0, abs=0.25)
        assert peaks["build"] / expected["build"] == pytest.approx(1.0, abs=0.25)
        assert peaks["step1"] < peaks["step2"]  # AdamW's moments appear in the first update
