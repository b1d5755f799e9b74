"""`kill -9` during `dvc repro`, then `dvc repro` again (issue 18, item 8).

A fresh copy of this repository as a git + DVC repo with a budget cut to seconds: one
uninterrupted `dvc repro`, then `dvc repro --force train` SIGKILLed (the whole process group:
DVC and the training process under it) in the middle of training, then plain `dvc repro`. It
must end with `dvc status` clean and the pipeline's outputs byte for byte those of the
uninterrupted repro. `train.json` is compared without its `perf_*` timings (which differ between
any two runs), and `model/tracking.json` (the MLflow run id) is not compared.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow_support import poll
from test_dvc_pipeline import RUN, _run, project  # noqa: F401 (the fixture)

pytestmark = pytest.mark.slow

STEPS = 20
OUTPUTS = [
    "model/model.safetensors",
    "model/config.yaml",
    "model/checksums.sha256",
    "model/tokenizer.json",
    "model/meta.json",
    "metrics/eval.json",
    "metrics/samples.md",
    "plots/train_loss.csv",
    "plots/val_loss.csv",
]


def _outputs(root: Path) -> dict[str, bytes | dict]:
    found: dict[str, bytes | dict] = {name: (root / RUN / name).read_bytes() for name in OUTPUTS}
    train = json.loads((root / RUN / "metrics/train.json").read_text())
    found["metrics/train.json"] = {k: v for k, v in train.items() if not k.startswith("perf_")}
    return found


@pytest.fixture
def small(project: tuple[Path, dict[str, str]]) -> tuple[Path, dict[str, str]]:  # noqa: F811
    """The DVC test's project with a budget of seconds and a checkpoint every 5 steps."""
    root, env = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["vocab_size"] = 512
    params["training"].update(
        max_steps=STEPS, checkpoint_interval=5, log_interval=1, eval_interval=10,
        global_batch_size=4, micro_batch_size=4,
    )  # fmt: skip
    params["evaluation"].update(max_tokens=2048, sample_max_tokens=8)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "commit", "-qam", "small budget"], root, env)
    return root, env


def test_kill_9_during_dvc_repro_then_repro_again_is_clean_and_identical(
    small: tuple[Path, dict[str, str]],
) -> None:
    root, env = small
    _run(["dvc", "repro"], root, env)
    uninterrupted = _outputs(root)

    log = root / RUN / "logs" / "training.log"
    log.write_text("")
    proc = subprocess.Popen(["dvc", "repro", "--force", "train"], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip

    def mid_training() -> bool:
        assert proc.poll() is None, "dvc repro ended before the kill"
        return "step 7: loss" in log.read_text()

    poll(mid_training, 600, "training to pass step 7")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    steps = sorted((root / RUN / "checkpoints").glob("step_*.pt"))
    assert steps and steps[-1].name < f"step_{STEPS:07d}.pt", "training had finished"
    assert not (root / RUN / "model").exists(), "DVC removes the stage's outputs before it runs"

    output = _run(["dvc", "repro"], root, env)
    assert "Running stage 'train'" in output, output
    assert "resumed from" in log.read_text(), "the second repro did not resume the killed run"
    status = _run(["dvc", "status"], root, env)
    assert "up to date" in status, status
    again = _outputs(root)
    for name, value in uninterrupted.items():
        assert again[name] == value, f"{name} differs from the uninterrupted repro"
