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
from typing import TYPE_CHECKING

from pipeline.checkpoint import CorruptCheckpointError
from pipeline.config.schema import TrainingConfig
from pipeline.errors import CheckpointError, UserError

if TYPE_CHECKING:
    from pipeline.training.trainer import Trainer

logger = logging.getLogger("pipeline.train")


class NonfiniteGuard:
    """Applies `training.nonfinite_policy`. The trainer calls it at three points:

    - `before_training(trainer)` at the start of `fit`: with `rollback`, it makes sure there is a
      checkpoint to roll back to.
    - `handle(trainer, grad_norm)` when a step's gradient norm is not finite. The update has
      not been applied at that point.
    - `roll_back_if_pending(trainer)` after the strategy's step. If it returns True, the trainer
      trains the step again, on the next batch, from the restored state.
    """

    def __init__(self, training: TrainingConfig) -> None:
        self.policy = training.nonfinite_policy
        self.limit = training.max_nonfinite_steps
        self._pending: str | None = None
        """The warning text of a rollback that `handle` decided and the trainer has not done."""

    def before_training(self, trainer: Trainer) -> Path | None:
        """With `rollback`, save the current state if no checkpoint could be rolled back to."""
        if self.policy != "rollback" or self._candidates(trainer):
            return None
        path = trainer.save_checkpoint()  # collective: every rank got the same answer above
        logger.info(
            "nonfinite_policy rollback: saved the starting state (step %d) to roll back to "
            "until the first checkpoint",
            trainer.progress.step,
        )
        return path

    @staticmethod
    def _candidates(trainer: Trainer) -> list[Path]:
        """This run's checkpoints at or before the current step, newest first (not verified).

        Not simply `latest`: after a resume from an older checkpoint, `latest` may still
        point past the current step.
        """
        trainer.strategy.flush_checkpoints()  # a checkpoint still being written counts too
        store, step = trainer.checkpoints, trainer.progress.step
        return trainer.strategy.main_only(
            lambda: [path for saved, path in reversed(store.list_checkpoints()) if saved <= step]
        )

    def handle(self, trainer: Trainer, grad_norm: float) -> None:
        """Count a non-finite step. Abort, or warn and skip, or schedule a rollback."""
        progress = trainer.progress
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
            return
        self._pending = f"{where}; {so_far}"

    def roll_back_if_pending(self, trainer: Trainer) -> bool:
        """Do a rollback that `handle` scheduled; return whether one was done."""
        if self._pending is None:
            return False
        where, self._pending = self._pending, None
        parts = trainer.parts
        cursor = parts.sampler.cursor
        bad_step = trainer.progress.step + 1
        counters = (trainer.progress.nonfinite_steps, trainer.progress.skipped_steps)
        run_id = trainer.tracking_run_id
        parts.optimizer.zero_grad(set_to_none=True)
        path = self._restore(trainer, where)
        parts.sampler.cursor = cursor  # past the bad batch: it is not trained on again
        trainer.progress.nonfinite_steps, trainer.progress.skipped_steps = counters
        trainer.tracking_run_id = run_id or trainer.tracking_run_id
        restored = trainer.progress.step
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
        return True

    def _restore(self, trainer: Trainer, where: str) -> Path:
        """Load the newest intact checkpoint at or before the current step; return its path."""
        problems = []
        for path in self._candidates(trainer):
            try:
                return trainer.strategy.load(trainer, path)
            except CorruptCheckpointError as exc:
                problems.append(str(exc))
                logger.warning("%s; trying an older one", exc)
        raise CheckpointError(
            f"{where}; nonfinite_policy rollback found no intact checkpoint at or before step "
            f"{trainer.progress.step} in {trainer.checkpoints.directory}"
            + (": " + "; ".join(problems) if problems else "")
        )
