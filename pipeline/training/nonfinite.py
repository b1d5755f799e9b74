"""What the loop does about a step whose gradients are not finite: `training.nonfinite_policy`.

- `skip`: drop that step's update. The step still counts and its batch is consumed.
- `rollback`: restore weights, optimizer, loss scaler, RNG and step/token counters from the
  newest intact checkpoint at or before the current step (normally `latest`), but keep the data
  position where it is, past the bad batch. The batches between that checkpoint and the bad step
  are not replayed either (as in PaLM's restarts, which skip the data around a loss spike).
  Their step numbers are trained again on new data. A run with no such checkpoint saves its
  current state at the start of `fit`, so there is always something to roll back to.
- `abort`: stop at once with a `UserError` (exit code 2 from the CLI). The last checkpoint is
  untouched.

`skip` and `rollback` count every non-finite step in `Progress.nonfinite_steps`, also across
rollbacks and resumes. The run stops with a `UserError` once the count exceeds
`training.max_nonfinite_steps`. fp16 overflow is the loss scaler's job and never reaches here.
The decision is the same on every rank: the gradient norm is computed after the all-reduce.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config.schema import TrainingConfig
from pipeline.errors import UserError
from pipeline.training.loop_state import Progress

logger = logging.getLogger("pipeline.train")


class NonfiniteGuard:
    """Decides what `training.nonfinite_policy` asks for; the trainer carries it out.

    It holds no reference to the trainer, the strategy or the checkpoints: it counts on the
    `Progress` it is given and answers.

    - `wants_rollback_point`: with `rollback`, `fit` must start from a saved state.
    - `handle(progress, grad_norm)` when a step's gradient norm is not finite (the update was
      not applied). Counts it; raises for `abort` or past the limit; warns for `skip`; for
      `rollback` returns the text that describes the bad step, and the trainer rolls back.
    - `rolled_back(...)`: the warning that says what a rollback did.
    """

    def __init__(self, training: TrainingConfig) -> None:
        self.policy = training.nonfinite_policy
        self.limit = training.max_nonfinite_steps

    @property
    def wants_rollback_point(self) -> bool:
        return self.policy == "rollback"

    def handle(self, progress: Progress, grad_norm: float) -> str | None:
        """Count a non-finite step. Abort, or warn and skip (None), or ask for a rollback."""
        progress.nonfinite_steps += 1
        progress.skipped_steps += 1
        where = f"step {progress.step + 1}: non-finite gradient norm ({grad_norm})"
        if self.policy == "abort":
            raise UserError(
                f"{where}; training.nonfinite_policy is abort, so the run stops here (the last "
                "checkpoint is intact; set the policy to skip or rollback to continue past it)"
            )
        if progress.nonfinite_steps > self.limit:
            raise UserError(
                f"{where}; {progress.nonfinite_steps} non-finite steps exceed "
                f"training.max_nonfinite_steps ({self.limit})"
            )
        so_far = f"{progress.nonfinite_steps} non-finite step(s) so far, limit {self.limit}"
        if self.policy == "skip":
            logger.warning("%s; update skipped (%s)", where, so_far)
            return None
        return f"{where}; {so_far}"

    @staticmethod
    def rolled_back(where: str, restored: int, bad_step: int, path: Path, cursor: int) -> None:
        """Say what a rollback did: where it went back to and which steps run again."""
        replayed = (
            f"steps {restored + 1}-{bad_step} run again on new data"
            if bad_step > restored + 1
            else f"step {bad_step} runs again on new data"
        )
        logger.warning(
            "%s; rolled back to step %d from %s; the data position stays past the bad batch "
            "(sequence %d), so %s",
            where,
            restored,
            path,
            cursor,
            replayed,
        )
