"""SLURM: the rendered batch script (fast, no daemons), and a real one-node cluster.

The cluster tests start munge, slurmctld and slurmd from Debian's packages in a temporary
folder (root only: SlurmUser=root) and run the tiny model as a 2-process job, submitted the
way DVC does it (`python stages/train.py` with `distributed.launcher: slurm`). The job is
requeued by SLURM once (`scontrol requeue`: SIGTERM, checkpoint, requeue) and warned once
(`scancel --signal=USR1 --batch`, what `--signal=B:USR1@<s>` delivers before a time limit:
checkpoint, the job requeues itself), and must still end with the weights of an uninterrupted
run, in one MLflow run. A second job fails with a user error and must not come back. And
`dvc repro` itself, in a fresh git + DVC copy of the repo, must wait for its one-process job
and record the outputs of a local run, bit for bit.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO_ROOT, set_args, tiny_overrides
from safetensors.torch import load_file
from test_dvc_pipeline import _init_repo, _project_files, _run
from test_prepare_executors import snapshot, task_bytes_for, write_corpus, write_params

from pipeline.cli import run_command
from pipeline.cli.slurm import slurm as slurm_command
from pipeline.config.layers import deep_merge, dotted_to_nested
from pipeline.config.loader import load_config
from pipeline.config.schema import Config, DistributedConfig
from pipeline.distributed.environment import DistEnv, LaunchFlags
from pipeline.distributed.launch import free_port, plan_relaunch, submits_slurm_job
from pipeline.errors import ConfigError
from pipeline.slurm.environment import JOB_MARKER
from pipeline.slurm.script import CONFIG_END, TRAIN_STAGE, render_script
from pipeline.training.run import train

PYTHON = "/opt/env/bin/python"
"""An interpreter path with no torchrun beside it: the script then uses `python -m`."""

LAUNCHER_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "TORCHELASTIC_RUN_ID",
    "SLURM_JOB_ID", JOB_MARKER, "MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME",
)  # fmt: skip
"""What the submitting processes must not pass on to a job: it would believe itself launched,
inside a job already, or tracked elsewhere."""


def slurm_config(**overrides: object) -> Config:
    """Built-in defaults (not params.yaml) plus dotted overrides, launcher slurm."""
    base = {"training.max_steps": 10, "training.global_batch_size": 8}
    return load_config(overrides={**base, "distributed.launcher": "slurm", **overrides})


def sbatch_options(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if "#SBATCH" in line]


# ------------------------------------------------------------------------- the script itself
def test_script_requests_the_configured_resources(tmp_path: Path) -> None:
    config = slurm_config(
        **{
            "name": "gpt 13B/run",
            "output_dir": "runs/13b",
            "training.device": "cuda",
            "distributed.num_nodes": 4,
            "distributed.gpus_per_node": 8,
            "slurm.partition": "gpu",
            "slurm.account": "proj42",
            "slurm.time_limit": "1-12:00:00",
            "slurm.cpus_per_task": 64,
            "slurm.signal_seconds": 300,
            "slurm.extra_sbatch": ["--qos=high", "#SBATCH --constraint=h100"],
        }
    )
    options = sbatch_options(render_script(config, python=PYTHON, workdir=tmp_path))
    job_dir = tmp_path / "runs/13b/slurm"
    assert options == [
        "--job-name=gpt_13B_run",
        "--nodes=4",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--cpus-per-task=64",
        "--time=1-12:00:00",
        "--partition=gpu",
        "--account=proj42",
        f"--chdir={tmp_path}",
        f"--output={job_dir}/gpt_13B_run-%j.out",
        f"--error={job_dir}/gpt_13B_run-%j.err",
        "--open-mode=append",
        "--requeue",
        "--signal=B:USR1@300",
        "--qos=high",
        "--constraint=h100",
    ]


def test_a_cpu_run_requests_no_gpus_but_still_starts_gpus_per_node_processes(
    tmp_path: Path,
) -> None:
    config = slurm_config(**{"training.device": "cpu", "distributed.gpus_per_node": 2})
    script = render_script(config, python=PYTHON, workdir=tmp_path)
    options = sbatch_options(script)
    assert not any(option.startswith("--gpus") for option in options)
    unset = ("--partition", "--account", "--time", "--cpus")  # the cluster's defaults apply
    assert not any(option.startswith(unset) for option in options), options
    assert f"--output={tmp_path}/experiments/tiny-shakespeare/slurm/" in script
    assert "--nproc_per_node 2" in script


def test_workers_start_with_srun_torchrun_and_a_c10d_rendezvous(tmp_path: Path) -> None:
    config = slurm_config(**{"distributed.num_nodes": 2, "distributed.gpus_per_node": 4})
    script = render_script(config, python=PYTHON, workdir=tmp_path)
    launch = script.split("srun ", 1)[1].split(" &\n", 1)[0].replace("\\\n", "")
    assert " ".join(launch.split()) == (
        f'--kill-on-bad-exit=1 {PYTHON} -m torch.distributed.run --nnodes "$SLURM_NNODES" '
        '--nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint "$head_node:$port" '
        f'--rdzv_id "$SLURM_JOB_ID" {TRAIN_STAGE} --params "$config" '
        '--resume_from_checkpoint "$resume"'
    )
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "port=$((29500 + SLURM_JOB_ID % 1000))" in script
    assert "port=12345" in render_script(slurm_config(**{"slurm.port": 12345}), python=PYTHON)
    # torchrun must survive USR1 and pass it on, and give its workers time to checkpoint.
    assert "export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in script
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120" in script
    assert 'kill -USR1 "$launcher_pid"' in script, "the trap signals srun, which forwards it"
    assert f'export {JOB_MARKER}="$SLURM_JOB_ID"' in script
    beside = Path(sys.executable).with_name("torchrun")
    if beside.is_file():  # a venv's own torchrun is used when it is there
        assert f"srun --kill-on-bad-exit=1 {beside} " in render_script(config)


def test_the_deepspeed_launcher_gets_a_hostfile_of_the_job_nodes(tmp_path: Path) -> None:
    config = slurm_config(**{"slurm.launcher": "deepspeed", "distributed.gpus_per_node": 4})
    script = render_script(config, python=PYTHON, workdir=tmp_path)
    assert (
        'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed \'s/$/ slots=4/\' > "$hostfile"'
        in script
    )
    assert (
        f'setsid {PYTHON} -m deepspeed.launcher.runner --hostfile "$hostfile" --no_ssh_check '
        '--master_addr "$head_node" --master_port "$port"' in script
    )
    assert "srun" not in script and "torch.distributed.run" not in script
    assert 'kill -USR1 -- "-$launcher_pid"' in script, "the launcher's whole process group"
    assert 'while kill -0 -- "-$launcher_pid"' in script, "waits for workers that outlive it"
    two_nodes = slurm_config(**{"slurm.launcher": "deepspeed", "distributed.num_nodes": 2})
    assert "--no_ssh_check" not in render_script(two_nodes, python=PYTHON), "pdsh needs ssh"


def test_the_script_requeues_only_after_a_warning_and_within_the_bound() -> None:
    script = render_script(slurm_config(**{"slurm.max_requeues": 3}), python=PYTHON)
    assert "trap request_checkpoint USR1" in script
    assert "max_requeues=3" in script and 'restarts="${SLURM_RESTART_COUNT:-0}"' in script
    decision = script[script.index('if [ "$code" -eq 0 ]') :]
    assert decision.index("exit 0") < decision.index('if [ "$stop" -eq 1 ]'), "done: no requeue"
    assert 'if [ "$restarts" -lt "$max_requeues" ]' in decision
    assert 'scontrol requeue "$SLURM_JOB_ID"' in decision
    assert "resume=latest  # requeued" in script
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr


def test_the_embedded_config_is_the_whole_config(tmp_path: Path) -> None:
    config = slurm_config(**{"training.lr": 3e-4, "slurm.partition": "gpu", "seed": 7})
    script = render_script(config, python=PYTHON, workdir=tmp_path)
    embedded = script.split(f"<<'{CONFIG_END}'\n", 1)[1].split(f"\n{CONFIG_END}\n", 1)[0]
    path = tmp_path / "config.yaml"
    path.write_text(embedded + "\n")
    assert load_config(params_file=path) == config


def test_resume_and_slurm_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="resumes from 'auto' or 'latest'"):
        render_script(slurm_config(), "experiments/x/checkpoints/step_0000010.pt")
    for key, value, message in [
        ("slurm.time_limit", "2 hours", "not a SLURM time limit"),
        ("slurm.time_limit", 7200, "quote the time limit"),  # unquoted 2:00:00 in YAML
        ("slurm.time_limit", "00:01:00", "signal_seconds .* must be shorter than time_limit"),
        ("slurm.extra_sbatch", ["qos=high"], "not one sbatch option"),
        ("slurm.launcher", "mpirun", "slurm.launcher"),
    ]:
        with pytest.raises(ConfigError, match=message):
            slurm_config(**{key: value})


def test_only_a_plain_process_outside_a_job_submits() -> None:
    slurm = DistributedConfig(launcher="slurm", gpus_per_node=2)
    plain, launched = DistEnv(), DistEnv(0, 0, 2, 2, "torchrun")
    argv = ["stages/train.py", "--resume_from_checkpoint", "auto"]
    assert submits_slurm_job(slurm, plain, {})
    assert plan_relaunch(slurm, LaunchFlags(), plain, argv, {}) is None, "submitted instead"
    assert not submits_slurm_job(slurm, launched, {})
    assert not submits_slurm_job(DistributedConfig(launcher="torchrun"), plain, {})
    for inside in ({JOB_MARKER: "12"}, {"SLURM_JOB_ID": "12"}):
        assert not submits_slurm_job(slurm, plain, inside)
        relaunch = plan_relaunch(slurm, LaunchFlags(), plain, argv, inside)
        assert relaunch is not None and relaunch.launcher == "torchrun", "trains as usual"


def test_slurm_script_prints_and_writes_nothing(
    prepared_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(prepared_dir, run_dir, {"distributed.launcher": "slurm"})
    params = REPO_ROOT / "params.yaml"
    with pytest.raises(SystemExit) as exit_info:
        run_command(slurm_command, ["script", "--params", str(params), *set_args(overrides)])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out == render_script(load_config(params_file=params, overrides=overrides))
    assert not run_dir.exists()


def test_submit_without_sbatch_is_one_clear_error(
    prepared_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_command(slurm_command, ["submit", *set_args(tiny_overrides(prepared_dir, run_dir))])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sbatch not found on PATH") and err.count("\n") == 1, err
    assert not run_dir.exists()


# ---------------------------------------------------------------------- a one-node cluster
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")


@dataclass
class Cluster:
    """A running one-node cluster; `env` is what every SLURM command and job needs."""

    root: Path
    env: dict[str, str]
    daemons: dict[str, subprocess.Popen]

    def command(self, *args: str) -> str:
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{' '.join(args)}: {done.stdout}{done.stderr}"
        return done.stdout

    def check_alive(self) -> None:
        for name, proc in self.daemons.items():
            assert proc.poll() is None, f"{name} exited:\n{self.logs()}"

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:])
            for path in sorted((self.root / "log").glob("*"))
        )


def wait_for(condition: Callable[[], object], what: str, timeout: float, *checks) -> None:
    """Poll `condition` until true; `checks` (callables) fail early, e.g. a process died."""
    deadline = time.monotonic() + timeout
    while not condition():
        for check in checks:
            check()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _cluster_conf(root: Path, host: str) -> str:
    return f"""\
ClusterName=gpt3test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire (5 s, the least) is also how long a requeued job waits before it may start.
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# A short MinJobAge also makes `sbatch --wait` poll every 2 s instead of up to every 32 s.
MinJobAge=2
KillWait=30
InactiveLimit=0
Waittime=0
# One line per ended job (array tasks each): what ran on the cluster, after the job is gone.
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.log
AccountingStorageType=accounting_storage/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """munge + slurmctld + slurmd on this machine, stopped by their process ids at the end."""
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs slurmd as root (SlurmUser=root); run as root")
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = {name: shutil.which(name, path=search) for name in (*DAEMONS, *CLIENTS)}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed "
            "(apt-get install slurmd slurmctld slurm-client munge)"
        )
    root = tmp_path_factory.mktemp("slurm")
    for folder in ("munge", "state", "spool", "log", "run"):
        (root / folder).mkdir(mode=0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    host = socket.gethostname().split(".")[0]  # slurmd finds its NodeName the same way
    conf = root / "slurm.conf"
    conf.write_text(_cluster_conf(root, host))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(SLURM_CONF=str(conf), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    daemons: dict[str, subprocess.Popen] = {}
    cluster = Cluster(root, env, daemons)

    def start(name: str, *args: str) -> None:
        with open(root / "log" / f"{name}.out", "wb") as out:
            daemons[name] = subprocess.Popen(
                [str(found[name]), *args], env=env, stdout=out, stderr=subprocess.STDOUT
            )

    try:
        munge = root / "munge"
        start(
            "munged",
            *("--foreground", "--force", f"--socket={munge}/munge.socket", f"--key-file={key}"),
            *(f"--pid-file={munge}/munged.pid", f"--seed-file={munge}/munged.seed"),
            f"--log-file={root}/log/munged.log",
        )
        wait_for((munge / "munge.socket").exists, "munged's socket", 30, cluster.check_alive)
        start("slurmctld", "-D", "-i")
        start("slurmd", "-D")

        def node_idle() -> bool:
            sinfo = ["sinfo", "-h", "-o", "%T"]
            done = subprocess.run(sinfo, env=env, capture_output=True, text=True, timeout=30)
            return done.stdout.strip() == "idle"

        wait_for(node_idle, "the node to be idle", 60, cluster.check_alive)
        yield cluster
    finally:
        if "slurmctld" in daemons and daemons["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--partition=test"], env=env, timeout=60)
            deadline = time.monotonic() + 60
            while (
                time.monotonic() < deadline
                and subprocess.run(
                    ["squeue", "-h"], env=env, capture_output=True, text=True, timeout=30
                ).stdout.strip()
            ):
                time.sleep(0.2)
        for name in reversed(list(daemons)):
            proc = daemons[name]
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _job_id(output: Path) -> str | None:
    match = re.search(r"submitted SLURM job (\d+)", output.read_text(errors="replace"))
    return match.group(1) if match else None


def _starts(log: Path) -> list[int]:
    """The step each start of the run began from, as training.log reports them."""
    return [int(s) for s in re.findall(r" from step (\d+) to ", log.read_text(errors="replace"))]


@pytest.mark.slow
def test_requeue_and_time_limit_warning_resume_to_the_same_weights(
    cluster: Cluster, prepared_dir: Path, tmp_path: Path
) -> None:
    """DVC's command submits, SLURM requeues, a USR1 warning requeues: one uninterrupted run.

    Beside it, `gpt3 slurm submit --wait` runs a job whose workers fail with a user error
    (nothing to resume from): it must end once, not requeued.
    """
    steps = 200
    extra = {
        "training.max_steps": steps,
        "training.checkpoint_interval": 20,
        "training.eval_interval": 20,
    }
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = {
        **extra,
        "name": "slurm-resume",
        "distributed.launcher": "slurm",
        "distributed.gpus_per_node": 2,
        "distributed.backend": "gloo",
        "slurm.port": free_port(),
        "slurm.max_requeues": 3,
        "tracking.enabled": True,
        "tracking.uri": store,
        "tracking.log_checkpoints": "none",
    }
    run_dir, failing_dir, reference = tmp_path / "run", tmp_path / "failing", tmp_path / "ref"
    submit_out, failing_out = tmp_path / "submit.out", tmp_path / "failing.out"
    stage_command = [  # what `dvc repro` runs for the train stage
        sys.executable,
        str(REPO_ROOT / "stages" / "train.py"),
        "--resume_from_checkpoint",
        "auto",
        *set_args(tiny_overrides(prepared_dir, run_dir, job)),
    ]
    failing_job = {**job, "name": "slurm-failing", "slurm.port": free_port()}
    failing_command = [
        *(sys.executable, "-c", "from pipeline.cli import main; main()"),
        *("slurm", "submit", "--wait", "--resume_from_checkpoint", "latest"),
        *set_args(tiny_overrides(prepared_dir, failing_dir, failing_job)),
    ]
    processes: list[subprocess.Popen] = []
    for command, output in ((stage_command, submit_out), (failing_command, failing_out)):
        with open(output, "wb") as out:
            started = subprocess.Popen(
                command, cwd=tmp_path, env=cluster.env, stdout=out, stderr=subprocess.STDOUT
            )
        processes.append(started)
    stage, failing = processes

    def stage_alive() -> None:
        cluster.check_alive()
        assert stage.poll() is None, submit_out.read_text(errors="replace")

    try:
        # The reference meanwhile: one uninterrupted process, one intra-op thread like a worker.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            config = load_config(overrides=tiny_overrides(prepared_dir, reference, extra))
            train(config, console=False)
        finally:
            torch.set_num_threads(threads)
        wait_for(lambda: _job_id(submit_out), "the job id", 60, stage_alive)
        job_id = _job_id(submit_out)
        assert job_id is not None
        log = run_dir / "logs" / "training.log"
        checkpoints = run_dir / "checkpoints"
        wait_for(lambda: any(checkpoints.glob("step_*.pt")), "a checkpoint", 120, stage_alive)
        cluster.command("scontrol", "requeue", job_id)  # SIGTERM now, the same job again later

        def second_start_trains() -> bool:
            text = log.read_text(errors="replace") if log.exists() else ""
            return len(_starts(log)) == 2 and ": loss " in text.rsplit(" from step ", 1)[1]

        wait_for(second_start_trains, "the requeued job to train", 120, stage_alive)
        cluster.command("scancel", "--signal=USR1", "--batch", job_id)  # the time-limit warning
        assert stage.wait(timeout=180) == 0, submit_out.read_text(errors="replace")
        # torchrun reports a failed worker (here: exit 2) as 1; the job ends with that.
        assert failing.wait(timeout=180) == 1, failing_out.read_text(errors="replace")
    finally:
        for proc in processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    job_out = (run_dir / "slurm" / f"slurm-resume-{job_id}.out").read_text()
    job_err = (run_dir / "slurm" / f"slurm-resume-{job_id}.err").read_text()
    assert re.findall(r"gpt3: job \d+ start (\d+)", job_out) == ["1", "2", "3"], job_out
    assert "gpt3: SIGTERM at" in job_out and "gpt3: USR1 at" in job_out, job_out
    assert f"gpt3: requeueing job {job_id} (requeue 2 of at most 3)" in job_out, job_out
    assert job_out.rstrip().endswith("gpt3: training finished"), job_out
    assert "signal 15 received: checkpoint saved" in job_err, job_err
    assert "signal 10 received: checkpoint saved" in job_err, job_err
    starts = _starts(run_dir / "logs" / "training.log")
    assert len(starts) == 3 and starts[0] == 0 and 0 < starts[1] < starts[2] < steps, starts
    assert (run_dir / "slurm" / "train.sbatch").is_file()

    got = load_file(run_dir / "model" / "model.safetensors")
    want = load_file(reference / "model" / "model.safetensors")
    for key in want:  # the 2-rank DDP tests' tolerance
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
    assert _curve(run_dir) == pytest.approx(_curve(reference), rel=1e-5)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("gpt3-pipeline")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    assert runs[0].info.status == "FINISHED"
    tracking = json.loads((run_dir / "model" / "tracking.json").read_text())
    assert tracking["run_id"] == runs[0].info.run_id

    # The failing job ran once and was not requeued; its workers said why.
    failing_id = _job_id_from_cli(failing_out)
    failing_log = (failing_dir / "slurm" / f"slurm-failing-{failing_id}.out").read_text()
    assert re.findall(r"gpt3: job \d+ start (\d+)", failing_log) == ["1"], failing_log
    assert "requeueing" not in failing_log and "training exited with 1" in failing_log
    failing_err = (failing_dir / "slurm" / f"slurm-failing-{failing_id}.err").read_text()
    assert "cannot resume from 'latest'" in failing_err, failing_err
    config = yaml.safe_load((failing_dir / "slurm" / f"config-{failing_id}.yaml").read_text())
    assert config["distributed"]["launcher"] == "slurm", "the job trains this config itself"


def _job_id_from_cli(output: Path) -> str:
    """`gpt3 slurm submit` prints the job id alone on its first line of stdout (the output
    here is stdout and stderr together: warnings on stderr come first)."""
    lines = output.read_text(errors="replace").splitlines()
    first = next(line for line in lines if not line.startswith("warning: "))
    assert first.isdigit(), first
    return first


def _curve(run_dir: Path) -> dict[int, float]:
    """The train-loss curve rank 0 wrote for DVC (step -> loss)."""
    with (run_dir / "plots" / "train_loss.csv").open() as handle:
        return {int(row["step"]): float(row["train_loss"]) for row in csv.DictReader(handle)}


@pytest.mark.slow
def test_dvc_repro_trains_through_the_cluster_like_a_local_run(
    cluster: Cluster, small_corpus_dir: Path, tmp_path: Path
) -> None:
    """The README's promise: with `launcher: slurm`, `dvc repro` on the login node submits the
    train stage's job, ends when the job does, and records what a local run would have made.

    One process (gpus_per_node 1), so the job's weights are bitwise those of a local run.
    """
    root, name = tmp_path / "project", "slurm-dvc"
    for file in _project_files():  # a fresh clone, as test_dvc_pipeline makes one
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / file, root / file)
    tiny = tiny_overrides(Path(), Path())
    del tiny["data.prepared_dir"], tiny["output_dir"]  # dvc.yaml's paths: in the repo
    settings = {
        **tiny,
        "name": name,
        # the prepared_dir fixture's corpus and tokenizer: a prepare stage of seconds
        "data.sources.main.kind": "files",
        "data.sources.main.inputs": [str(small_corpus_dir / "*.txt")],
        "data.vocab_size": 512,
        "data.val_fraction": 0.2,
        "distributed.launcher": "slurm",
        "distributed.gpus_per_node": 1,
        "slurm.port": free_port(),
    }
    params = yaml.safe_load((root / "params.yaml").read_text())
    params = deep_merge(params, dotted_to_nested(settings))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # The cluster's environment (no launcher or job variables; OMP_NUM_THREADS=1, as the
    # local run below), with this venv first on PATH: dvc runs `python stages/train.py`, and
    # the job uses that interpreter (and the torchrun beside it).
    env = {**cluster.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{cluster.env['PATH']}"}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t")
    env.update(GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    _init_repo(root, env)

    output = tmp_path / "repro.out"
    with open(output, "wb") as out:
        repro = subprocess.Popen(
            ["dvc", "repro", "train"], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT
        )

    def jobs() -> dict[str, str]:
        """Job id -> state, of the jobs slurmctld still knows (MinJobAge: 2 s after the end)."""
        listing = cluster.command("squeue", "-h", "--states=all", "-o", "%i %T")
        return dict(line.split() for line in listing.splitlines())

    def repro_alive() -> None:
        cluster.check_alive()
        assert repro.poll() is None, output.read_text(errors="replace")

    def job_running() -> bool:
        return jobs().get(_job_id(output) or "") == "RUNNING"

    try:
        wait_for(job_running, "the job to run", 120, repro_alive)
        repro_alive()  # the stage waits for the job it submitted
        assert repro.wait(timeout=300) == 0, output.read_text(errors="replace")
    finally:
        if repro.poll() is None:
            repro.kill()
            repro.wait()
    # ... and returned once the job had ended, having trained to the end.
    text = output.read_text(errors="replace")
    job_id = _job_id(output)
    assert job_id is not None and f"SLURM job {job_id} ended with exit code 0" in text, text
    states = jobs()  # COMPLETED, or already purged: nothing of it still pending or running
    assert states.get(job_id, "COMPLETED") == "COMPLETED", states
    run_dir = root / "experiments" / name
    job_out = (run_dir / "slurm" / f"{name}-{job_id}.out").read_text()
    assert job_out.rstrip().endswith("gpt3: training finished"), job_out

    lock = yaml.safe_load((root / "dvc.lock").read_text())
    outs = {out["path"]: out for out in lock["stages"]["train"]["outs"]}
    run = f"experiments/{name}"
    assert sorted(outs) == sorted(
        f"{run}/{out}" for out in ("model", "checkpoints", "plots", "metrics/train.json")
    ), outs
    assert all(out.get("md5") for out in outs.values()), outs
    status = subprocess.run(
        ["dvc", "status", "--json", "train"], cwd=root, env=env, capture_output=True, text=True
    )
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status

    # The same config trained here, without SLURM, beside the repo.
    local = tmp_path / "local"
    _run(
        [
            *(sys.executable, str(root / "stages" / "train.py"), "--resume_from_checkpoint"),
            *("auto", "--output_dir", str(local), "--set", "distributed.launcher=none"),
        ],
        root,
        env,
    )
    model = Path("model") / "model.safetensors"
    assert (run_dir / model).read_bytes() == (local / model).read_bytes()
    assert _curve(run_dir) == _curve(local)


def _completed_jobs(cluster: Cluster) -> list[dict[str, str]]:
    """The cluster's job completion log (jobcomp/filetxt): one record per ended job."""
    log = cluster.root / "log" / "jobcomp.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in text.splitlines() if line]


@pytest.mark.slow
def test_prepare_on_the_cluster_gives_the_bytes_of_a_local_prepare(
    cluster: Cluster, tmp_path: Path
) -> None:
    """`data.executor: datatrove_slurm`: each pass is an array job of one task per input task,
    and the prepared folder is byte for byte what the local process pool makes.

    `gpt3 prepare` runs as a user would on a login node: the cluster's environment, and this
    venv's `gpt3` by its path with the venv taken off PATH (not activated), so the job must find
    DataTrove's `launch_pickled_pipeline` itself. One node: the work dir in tmp_path is shared
    by the job and the test.
    """
    inputs = write_corpus(tmp_path / "corpus")
    task_bytes = task_bytes_for(tmp_path / "corpus")
    venv_bin = Path(sys.executable).parent
    path = [p for p in cluster.env["PATH"].split(os.pathsep) if p and Path(p) != venv_bin]
    env = {**cluster.env, "PATH": os.pathsep.join(path)}
    gpt3 = str(venv_bin / "gpt3")
    outputs: dict[str, dict[str, bytes]] = {}
    for executor in ("local", "datatrove_slurm"):
        root = tmp_path / executor
        settings = {"executor": executor, "num_workers": 2}
        params = write_params(tmp_path / f"{executor}.yaml", inputs, root, task_bytes, **settings)
        done = subprocess.run(
            [gpt3, "prepare", "--params", str(params), "--no-progress"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, f"{executor}:\n{done.stdout}{done.stderr[-4000:]}"
        assert "prepared files: " in done.stdout, done.stdout
        outputs[executor] = snapshot(root / "prepared")
        assert not (root / "work").exists(), "the scratch folder is removed at the end"

    local, on_slurm = outputs["local"], outputs["datatrove_slurm"]
    meta = json.loads(local["meta.json"])
    tasks = len(meta["splits"]["train"]["shards"])
    assert tasks == 5 and len(meta["inputs"]) == 4, meta
    assert sorted(on_slurm) == sorted(local)
    for file, data in local.items():  # meta.json, tokenizer.json and every shard
        assert on_slurm[file] == data, f"{file} differs"

    # The work ran as SLURM array tasks: one completed task per input task in each pass.
    jobs = _completed_jobs(cluster)
    for phase in ("scan", "sample", "encode"):
        ran = [job for job in jobs if job.get("Name") == f"gpt3-prepare-{phase}"]
        assert sorted(int(job["ArrayTaskId"]) for job in ran) == list(range(tasks)), (phase, ran)
        assert {job["JobState"] for job in ran} == {"COMPLETED"}, (phase, ran)
        assert len({job["ArrayJobId"] for job in ran}) == 1, "one array job per pass"
    waits = [job for job in jobs if job.get("Name") == "gpt3-prepare-wait"]
    assert len(waits) == 3, waits
