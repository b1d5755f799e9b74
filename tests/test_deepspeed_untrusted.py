"""A DeepSpeed checkpoint is data, never code: a planted pickle payload is refused, not run.

The attacker of issue 18 rewrites one file of a real 2-rank ZeRO-2 checkpoint (model states,
client state, either rank's optimizer shard) and its line in `checksums.sha256`, then waits
for `--resume_from_checkpoint`. Every kind is refused by rank 0's weights-only read, the
per-rank loader DeepSpeed calls refuses the shards too, and the real 2-rank resume ends with
one error line per rank, exit 2, and the payload never ran.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, tiny_overrides
from test_deepspeed import ZERO2, _plain_env, _sets

from pipeline.checkpoint.deepspeed_safe_load import SafeCheckpointEngine, allowed_globals
from pipeline.checkpoint.deepspeed_store import MANIFEST, inspect_tag_dir, verify_tag_dir
from pipeline.errors import CheckpointError

STEPS = {"training.max_steps": 2, "training.checkpoint_interval": 2, "training.eval_interval": 2}


class Payload:
    """Unpickling this runs `exec`, which writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _train(run_dir: Path, prepared: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO_ROOT / "stages" / "train.py"), "--deepspeed_config",
               ZERO2, "--gpus_per_node", "2", "--distributed_backend", "gloo", *extra,
               *_sets(tiny_overrides(prepared, run_dir, STEPS))]  # fmt: skip
    return subprocess.run(
        command, cwd=run_dir.parent, env=_plain_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=600,
    )  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`step_0000002` of a real 2-rank ZeRO-2 fp32 run: two optimizer shards."""
    run_dir = tmp_path_factory.mktemp("ds-untrusted") / "run"
    proc = _train(run_dir, prepared_dir)
    assert proc.returncode == 0, proc.stdout[-4000:]
    tag = run_dir / "checkpoints" / "step_0000002"
    assert len(list(tag.glob("*optim_states.pt"))) == 2
    return tag


def _plant(tag: Path, kind: str, marker: Path) -> Path:
    """Put a payload into one file of `tag`, fix its manifest line as an attacker would."""
    names = {
        "model states": "mp_rank_00_model_states.pt",
        "client state": "mp_rank_00_model_states.pt",
        "rank 0 optimizer shard": "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "rank 1 optimizer shard": "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }
    path = tag / names[kind]
    with torch.serialization.safe_globals(allowed_globals()):
        state = torch.load(path, weights_only=True)
    if kind == "model states":
        state["ds_version"] = Payload(marker)
    elif kind == "client state":
        state["trainer"]["progress"] = Payload(marker)
    else:
        state["optimizer_state_dict"]["loss_scaler"] = Payload(marker)
    torch.save(state, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    lines = (tag / MANIFEST).read_text().splitlines()
    fixed = [
        f"{digest}  {path.name}" if line.endswith(f"  {path.name}") else line for line in lines
    ]
    (tag / MANIFEST).write_text("\n".join(fixed) + "\n")
    verify_tag_dir(tag)  # the checksum file vouches for the payload: it proves nothing
    return path


KINDS = ["model states", "client state", "rank 0 optimizer shard", "rank 1 optimizer shard"]


def test_a_payload_in_any_file_is_refused_by_rank_0_and_by_deepspeeds_loader(
    checkpoint: Path, tmp_path: Path
) -> None:
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "payload-ran"
    for index, kind in enumerate(KINDS):
        tag = tmp_path / f"copy{index}" / checkpoint.name
        shutil.copytree(checkpoint, tag)
        inspect_tag_dir(tag)  # the untouched copy is a good checkpoint
        planted = _plant(tag, kind, marker)
        with pytest.raises(
            CheckpointError, match=r"refusing DeepSpeed checkpoint file .*: it holds exec,"
        ):
            inspect_tag_dir(tag)
        if "shard" in kind:  # what each rank's engine.load_checkpoint calls for its own shard
            with pytest.raises(CheckpointError, match="refusing"):
                SafeCheckpointEngine(TorchCheckpointEngine()).load(str(planted), "cpu")
        assert not marker.exists(), f"the payload in the {kind} ran"


def test_an_unlisted_file_in_the_folder_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    tag = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, tag)
    shutil.copy(tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt")  # fmt: skip
    with pytest.raises(CheckpointError, match="does not list: zero_pp_rank_2"):
        verify_tag_dir(tag)


def test_resuming_a_planted_rank_1_shard_exits_2_without_running_it(
    checkpoint: Path, prepared_dir: Path, tmp_path: Path
) -> None:
    """The issue's attack end to end: 2 ranks, `--resume_from_checkpoint <folder>`."""
    marker = tmp_path / "payload-ran"
    tag = tmp_path / "attacked" / checkpoint.name
    shutil.copytree(checkpoint, tag)
    _plant(tag, "rank 1 optimizer shard", marker)
    run_dir = tmp_path / "resumed"
    proc = _train(run_dir, prepared_dir, "--resume_from_checkpoint", str(tag))
    assert proc.returncode == 2, proc.stdout[-4000:]
    errors = [line for line in proc.stdout.splitlines() if "error: refusing DeepSpeed" in line]
    assert errors and all("zero_pp_rank_1" in line and "it holds exec," in line for line in errors)
    assert "Traceback" not in proc.stdout, proc.stdout[-4000:]
    assert not marker.exists(), "the payload ran"
    assert not (run_dir / "model").exists() and not os.path.exists(
        run_dir / "checkpoints" / "latest"
    )


def test_universal_checkpoint_loading_is_refused(prepared_dir: Path, tmp_path: Path) -> None:
    """DeepSpeed loads universal checkpoints with weights_only=False, past any engine."""
    from pipeline.config.loader import load_config
    from pipeline.distributed.deepspeed_config import resolve_deepspeed_config
    from pipeline.errors import ConfigError

    config = load_config(overrides=tiny_overrides(prepared_dir, tmp_path))
    with pytest.raises(ConfigError, match=r"checkpoint\.load_universal in my\.json"):
        resolve_deepspeed_config({"checkpoint": {"load_universal": True}}, config, 1, "my.json",
                                 cuda=False)  # fmt: skip
