"""Damage is loud (issue 18, item 5): one error line and exit 2, never altered numbers.

A flipped byte in `model.safetensors` used to evaluate, generate and export with altered
weights; a truncated `model/config.yaml`, token ids outside the vocabulary, `--set` values
that are not YAML and a seed beyond torch's range gave tracebacks (the seed one after the run
folder existed). All through the real command line, on a real trained tiny model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import set_args, tiny_overrides

from pipeline.cli import cli, run_command
from pipeline.config.loader import load_config
from pipeline.data.prepared import load_meta
from pipeline.model_manifest import write_manifest
from pipeline.training.run import train


def _run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """`gpt3 ARGS` in this process; (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_command(cli, args)
    return exit_info.value.code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("damage") / "run"
    train(load_config(overrides=tiny_overrides(prepared_dir, run_dir, {"training.max_steps": 2})),
          console=False)  # fmt: skip
    assert (run_dir / "model" / "checksums.sha256").is_file()
    return run_dir / "model"


def test_a_flipped_weight_byte_is_refused_by_evaluate_generate_and_export(
    model_dir: Path, prepared_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    damaged = tmp_path / "model"
    shutil.copytree(model_dir, damaged)
    weights = damaged / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight: loads fine, computes different numbers
    weights.write_bytes(bytes(data))
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  sources: {{}}\n  prepared_dir: {prepared_dir}\n")
    commands = {
        "evaluate": ["evaluate", "--model_checkpoint", str(damaged), "--params", str(params)],
        "generate": ["generate", "--model_checkpoint", str(damaged), "--prompt", "ROMEO:"],
        "export": ["export", "--model_checkpoint", str(damaged), "--output", str(tmp_path / "hf")],
    }
    for name, args in commands.items():
        code, err = _run(args, capsys)
        assert code == 2, (name, err)
        line = _one_error_line(err)
        assert "model.safetensors is corrupt or was modified" in line, (name, line)
    assert not (tmp_path / "hf").exists()
    # The intact folder still works (the check refuses damage, not models).
    code, err = _run([*commands["generate"][:2], str(model_dir), "--prompt", "A", "--max_length",
                      "2", "--seed", "1"], capsys)  # fmt: skip
    assert code == 0, err


def test_a_truncated_model_config_is_one_line(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    damaged = tmp_path / "model"
    shutil.copytree(model_dir, damaged)
    config = damaged / "config.yaml"
    config.write_text(config.read_text()[:200])
    write_manifest(damaged)  # the checksum is rewritten too: the parse must still fail cleanly
    code, err = _run(["generate", "--model_checkpoint", str(damaged), "--prompt", "x"], capsys)
    assert code == 2
    assert "config.yaml: not a readable model config" in _one_error_line(err)


def test_token_ids_outside_the_vocabulary_stop_training_with_one_line(
    prepared_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "prepared"
    shutil.copytree(prepared_dir, data)
    meta = load_meta(data)
    shard = data / meta.splits["train"].shards[0].file
    tokens = np.fromfile(shard, dtype="<u2")
    tokens[10::40] = meta.vocab_size + 7  # in every training window
    tokens.tofile(shard)
    run_dir = tmp_path / "run"
    code, err = _run(["train", *set_args(tiny_overrides(data, run_dir))], capsys)
    assert code == 2, err
    line = _one_error_line(err)
    assert f"{shard}: token id {meta.vocab_size + 7} at token " in line
    assert f"outside the vocabulary of {meta.vocab_size}" in line
    assert not (run_dir / "model").exists() and not (run_dir / "checkpoints").exists()


def test_bad_set_and_seed_values_are_one_line_and_write_nothing(
    prepared_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    base = set_args(tiny_overrides(prepared_dir, run_dir, {"training.max_steps": 1}))
    for extra, expected in (
        (["--set", "training.lr=[1,"], "--set 'training.lr=[1,': the value is not YAML"),
        (["--seed", str(2**64)], "seed: Input should be less than or equal to"),
    ):
        code, err = _run(["train", *base, *extra], capsys)
        assert code == 2, err
        assert expected in _one_error_line(err)
        assert list(tmp_path.iterdir()) == [], "something was written"
    code, err = _run(["train", *base, "--seed", str(2**64 - 1)], capsys)  # the largest works
    assert code == 0, err
    assert json.loads((run_dir / "metrics" / "train.json").read_text())
