"""The kill loop: SIGKILL a training run again and again, resume it each time, lose nothing.

A test harness, not part of the library: it lives under bench/ and is imported as `chaos_loop`
(bench/ on the path: `python bench/chaos.py` puts it there, tests/conftest.py appends it).

`run_chaos` trains one config twice, each run in its own processes (`stages/train.py`, the
command DVC runs):
- a reference run, uninterrupted;
- a chaos run, SIGKILLed `kills` times, each time restarted with `--resume_from_checkpoint
  latest`. When no checkpoint exists yet it is restarted afresh, without the flag. After the
  last kill it is left to finish.
It then checks that both runs end with bitwise identical weights and optimizer state.

Kills come in two kinds, drawn from a seeded RNG. Their exact timing still depends on the
machine, so the loop is repeatable in kind but not to the microsecond:
- `random`: the loop watches the run's `training.log` and picks a progress point: the line
  that starts training, or `step N: loss` for a step N a few steps ahead. It kills a random few
  milliseconds after that line appears. Checkpoints are saved every few steps, so some of these
  kills land inside a checkpoint write.
- `checkpoint-write`: a kill that is certain to land inside checkpoint code. The child runs
  `stages/train.py` behind a Python audit hook (`sys.addaudithook`) that counts the file
  operations in the checkpoints folder (create, rename, hard link, delete) and SIGKILLs its own
  process just before the n-th one, or a moment after it. Those operations are the save's
  write-aside, rename and `latest` steps, and the sweep after a killed writer. No pipeline code
  is patched.

Every child gets one intra-op thread, so the reference and the chaos run do their arithmetic
the same way. The report lists every kill, where it landed, whether it left a half-written
checkpoint behind, and whether a resume had to fall back from `latest` to an older checkpoint.
"""

from __future__ import annotations

from typing import Any

from chaos_loop.child import (
    EVENTS_PER_SAVE,
    FAULT_EVENTS,
    REPO_ROOT,
    STAGE,
    install_fault,
    run_stage_with_fault,
)
from chaos_loop.loop import KILL_WINDOW_S, run_chaos
from chaos_loop.process import child_env, set_args
from chaos_loop.report import ChaosError, ChaosReport, Kill
from chaos_loop.state import has_checkpoint, leftovers

TINY_OVERRIDES: dict[str, Any] = {
    "model.n_layer": 2,
    "model.d_model": 64,
    "model.n_head": 2,
    "model.d_head": 32,
    "model.d_ff": 256,
    "model.n_ctx": 64,
    "training.seq_len": 64,
    "training.micro_batch_size": 4,
    "training.global_batch_size": 8,
    "training.warmup_tokens": 1024,
    "training.device": "cpu",
}
"""A 2-layer model that trains a step in about 10 ms on one CPU thread (the tests' shapes)."""


__all__ = [
    "EVENTS_PER_SAVE",
    "FAULT_EVENTS",
    "KILL_WINDOW_S",
    "REPO_ROOT",
    "STAGE",
    "TINY_OVERRIDES",
    "ChaosError",
    "ChaosReport",
    "Kill",
    "child_env",
    "has_checkpoint",
    "install_fault",
    "leftovers",
    "run_chaos",
    "run_stage_with_fault",
    "set_args",
]
