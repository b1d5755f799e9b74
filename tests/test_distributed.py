"""DDP on CPU (gloo, 2 ranks): the launch paths, the flag checks, and equality with one process.

The same global batch on 2 ranks must give the single-process loss curve: each rank takes a
disjoint slice of the same seeded permutation, gradients sync once per global batch.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, set_args, tiny_overrides
from safetensors.torch import load_file

from pipeline.cli import run_command
from pipeline.cli.train import train as train_command
from pipeline.config.loader import load_config
from pipeline.config.schema import DistributedConfig
from pipeline.distributed.environment import (
    DistEnv,
    LaunchFlags,
    check_against_launcher,
    read_environment,
)
from pipeline.distributed.launch import free_port, plan_relaunch
from pipeline.distributed.strategy import choose_strategy
from pipeline.errors import ConfigError
from pipeline.training.run import train

TORCHRUN_ENV = {
    "RANK": "0",
    "LOCAL_RANK": "0",
    "WORLD_SIZE": "2",
    "LOCAL_WORLD_SIZE": "2",
    "TORCHELASTIC_RUN_ID": "test",
}


def run_stage(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python stages/train.py ARGS` as its own process (plainly: no launcher variables)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV and k != "LOCAL_SIZE"}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages" / "train.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def curve(run_dir: Path) -> dict[int, float]:
    """The train-loss curve rank 0 wrote for DVC (step -> loss)."""
    with (run_dir / "plots" / "train_loss.csv").open() as handle:
        return {int(row["step"]): float(row["train_loss"]) for row in csv.DictReader(handle)}


def assert_close_curves(got: dict[int, float], want: dict[int, float], rel: float) -> None:
    assert sorted(got) == sorted(want)
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=rel), f"step {step}"


# ------------------------------------------------------------------------------ unit checks
def test_environment_is_read_from_the_launcher_variables() -> None:
    assert not read_environment({}).launched
    env = read_environment({**TORCHRUN_ENV, "RANK": "1", "LOCAL_RANK": "1"})
    assert (env.rank, env.local_rank, env.world_size, env.num_nodes) == (1, 1, 2, 1)
    assert env.launcher == "torchrun"
    deepspeed = read_environment(
        {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_SIZE": "2"}
    )
    assert deepspeed.num_nodes == 2 and deepspeed.launcher == "the deepspeed launcher"
    with pytest.raises(ConfigError, match="LOCAL_RANK not set"):
        read_environment({"RANK": "0", "WORLD_SIZE": "2"})


def test_flags_must_agree_with_the_launcher() -> None:
    env = DistEnv(0, 0, 2, 2, "torchrun")
    default = DistributedConfig()
    check_against_launcher(default, LaunchFlags(), env)  # 1 x 1 = "whatever was started"
    check_against_launcher(default, LaunchFlags(gpus_per_node=2, num_nodes=1), env)
    with pytest.raises(ConfigError, match="--gpus_per_node 4 disagrees with torchrun"):
        check_against_launcher(default, LaunchFlags(gpus_per_node=4), env)
    with pytest.raises(ConfigError, match=r"distributed\.gpus_per_node=3 disagrees"):
        check_against_launcher(DistributedConfig(gpus_per_node=3), LaunchFlags(), env)
    with pytest.raises(ConfigError, match="--local_rank 1 differs from LOCAL_RANK=0"):
        check_against_launcher(default, LaunchFlags(local_rank=1), env)


def test_plain_launch_plans_torchrun_or_deepspeed() -> None:
    plain = DistEnv()
    argv = ["stages/train.py", "--gpus_per_node", "2"]
    assert plan_relaunch(DistributedConfig(), LaunchFlags(), plain, argv, {}) is None
    one_node = plan_relaunch(DistributedConfig(gpus_per_node=2), LaunchFlags(), plain, argv, {})
    assert one_node is not None and one_node.launcher == "torchrun"
    assert "--nproc_per_node=2" in one_node.args and not any(
        a.startswith("--master_port") for a in one_node.args
    ), "one node: torchrun picks a free port itself"
    assert one_node.args[-3:] == tuple(argv)
    two_nodes = DistributedConfig(num_nodes=2)
    with pytest.raises(ConfigError, match="needs --master_addr"):
        plan_relaunch(two_nodes, LaunchFlags(node_rank=1), plain, argv, {})
    with pytest.raises(ConfigError, match=r"--node_rank 2 is outside 0\.\.1"):
        plan_relaunch(two_nodes, LaunchFlags(node_rank=2), plain, argv, {})
    env_vars = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234", "NODE_RANK": "1"}
    node1 = plan_relaunch(two_nodes, LaunchFlags(), plain, argv, env_vars)
    assert node1 is not None
    assert {"--node_rank=1", "--master_addr=10.0.0.1", "--master_port=1234"} <= set(node1.args)
    one_ds = plan_relaunch(
        DistributedConfig(deepspeed_config="z.json"), LaunchFlags(), plain, argv, {}
    )
    assert one_ds is not None and "--nproc_per_node=1" in one_ds.args, "DeepSpeed needs a launcher"
    ds = plan_relaunch(
        DistributedConfig(launcher="deepspeed", gpus_per_node=2), LaunchFlags(), plain, argv, {}
    )
    assert ds is not None and ds.launcher == "deepspeed" and ds.args[:2] == ("--num_gpus", "2")
    assert (
        plan_relaunch(
            DistributedConfig(gpus_per_node=2),
            LaunchFlags(),
            DistEnv(0, 0, 2, 2, "torchrun"),
            argv,
            {},
        )
        is None
    )


def test_strategy_is_chosen_by_name(prepared_dir: Path, tmp_path: Path) -> None:
    def config(**distributed: object):
        extra = {f"distributed.{k}": v for k, v in distributed.items()}
        return load_config(overrides=tiny_overrides(prepared_dir, tmp_path, extra))

    assert choose_strategy(config(), 1) == "single"
    assert choose_strategy(config(), 2) == "ddp"
    assert choose_strategy(config(deepspeed_config="x.json"), 1) == "deepspeed"
    for bad, message in [
        (config(strategy="single"), "cannot train on 2 processes"),
        (config(strategy="ddp", deepspeed_config="x.json"), "contradicts distributed.strategy"),
        (config(strategy="deepspeed"), "needs a DeepSpeed JSON"),
        (config(strategy="ddp", tensor_parallel=2), "tensor_parallel needs distributed.strategy"),
    ]:
        with pytest.raises(ConfigError, match=message):
            choose_strategy(bad, 2)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gpus_per_node", "4"], "--gpus_per_node 4 disagrees with torchrun, which started 2"),
        (["--num_nodes", "2"], "--num_nodes 2 disagrees with torchrun, which started 1 node"),
        (["--distributed_backend", "nccl"], "nccl needs CUDA GPUs"),
    ],
)
def test_flags_that_disagree_with_the_launcher_exit_2(
    prepared_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    message: str,
) -> None:
    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_command(train_command, [*flags, *set_args(tiny_overrides(prepared_dir, run_dir))])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not run_dir.exists(), "nothing may be written before the checks pass"


# ------------------------------------------------------------------------ 2-rank training
@pytest.fixture(scope="module")
def reference(prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-process run every 2-rank run is compared with (8 steps, batch 8 = 2 x 4)."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    train(load_config(overrides=tiny_overrides(prepared_dir, run_dir)), console=False)
    return run_dir


@pytest.fixture(scope="module")
def ddp_run(prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plain-launch path: `stages/train.py --gpus_per_node 2 --distributed_backend gloo`."""
    root = tmp_path_factory.mktemp("ddp")
    run_dir = root / "run"
    args = ["--gpus_per_node", "2", "--distributed_backend", "gloo"]
    proc = run_stage([*args, *set_args(tiny_overrides(prepared_dir, run_dir))], root)
    assert proc.returncode == 0, proc.stdout
    assert "starting workers: torch.distributed.run" in proc.stdout
    return run_dir


def test_plain_launch_ddp_equals_the_single_process_run(ddp_run: Path, reference: Path) -> None:
    assert_close_curves(curve(ddp_run), curve(reference), rel=1e-5)
    got, want = (
        load_file(ddp_run / "model/model.safetensors"),
        load_file(reference / "model/model.safetensors"),
    )
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
    resolved = (ddp_run / "resolved_config.yaml").read_text()
    assert "gpus_per_node: 2" in resolved and "backend: gloo" in resolved
    # Rank 0 alone logs and tracks: each step once, one TensorBoard file.
    log = (ddp_run / "logs" / "training.log").read_text()
    assert log.count("step 8: loss") == 1 and log.count(" parameters) on cpu") == 1
    assert len(list((ddp_run / "logs").glob("tb/*/events.out.tfevents.*"))) == 1
    state = torch.load(ddp_run / "checkpoints" / "latest_checkpoint.pt", weights_only=True)
    assert len(state["rng_ranks"]) == 2, "every rank's RNG state is in the checkpoint"
    assert "module." not in "".join(state["model"]), "weights saved from the unwrapped model"


def test_two_nodes_on_one_machine_train_as_one_job(
    prepared_dir: Path, ddp_run: Path, reference: Path, tmp_path: Path
) -> None:
    """Two launches (node 0 and node 1, one process each) resume the DDP run as one job."""
    run_dir = tmp_path / "nodes"
    port = free_port()
    overrides = set_args(tiny_overrides(prepared_dir, run_dir))
    resume = ["--resume_from_checkpoint", str(ddp_run / "checkpoints" / "step_0000004.pt")]
    common = ["--num_nodes", "2", "--master_addr", "127.0.0.1", "--master_port", str(port)]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    node1 = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "stages/train.py"), *common, "--node_rank", "1",
         *resume, *overrides],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    node0 = run_stage([*common, "--node_rank", "0", *resume, *overrides], tmp_path)
    out1 = node1.communicate(timeout=300)[0]
    assert node0.returncode == 0, node0.stdout
    assert node1.returncode == 0, out1
    assert "resumed from" in (run_dir / "logs" / "training.log").read_text()
    want = {step: loss for step, loss in curve(reference).items() if step > 4}
    assert_close_curves(curve(run_dir), want, rel=1e-5)


def test_the_training_guides_torch_distributed_launch(prepared_dir: Path, tmp_path: Path) -> None:
    """`python3 -m torch.distributed.launch` passes `--local-rank=N`; the rank comes from env."""
    run_dir = tmp_path / "legacy"
    overrides = set_args(tiny_overrides(prepared_dir, run_dir, {"training.max_steps": 2}))
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node", "2",
         f"--master_port={free_port()}", str(REPO_ROOT / "stages/train.py"), *overrides],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout
    assert sorted(curve(run_dir)) == [1, 2]
