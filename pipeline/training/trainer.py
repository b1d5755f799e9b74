"""The single-process training loop: data -> model -> loss -> optimizer, with checkpoints.

Everything that makes a step reproducible lives in `state_dict()`: weights, optimizer, loss
scaler, counters, data cursor and RNG states. A run of 2N steps and a run of N steps resumed for N
more therefore see the same batches, draw the same random numbers and end with the same weights.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.checkpoint import CorruptCheckpointError
from pipeline.config.output import public_values
from pipeline.config.schema import Config
from pipeline.distributed.data_parallel import SingleDevice
from pipeline.distributed.strategy import StepResult, Strategy
from pipeline.errors import CheckpointError
from pipeline.rng import capture_rng_state, restore_rng_state
from pipeline.training.batching import global_batch_sequences, plan_batch, ramped_sequences
from pipeline.training.components import TrainingComponents, build_components
from pipeline.training.data_ledger import LEDGER_FILE, DataLedger
from pipeline.training.loop_state import (
    CHECKPOINT_FORMAT,
    Progress,
    check_compatible,
    restore_rank_rng,
)
from pipeline.training.mixture import metric_name
from pipeline.training.nonfinite import NonfiniteGuard
from pipeline.training.progress import ProgressReporter
from pipeline.training.sampler import SequenceSampler, evaluation_windows

logger = logging.getLogger("pipeline.train")

__all__ = ["CHECKPOINT_FORMAT", "Progress", "StopRequested", "TrainResult", "Trainer"]


@dataclass
class TrainResult:
    """What a finished (or preempted) run reports back to its caller."""

    progress: Progress
    preempted: bool
    losses: dict[int, float] = field(default_factory=dict)
    """Train loss of each logged step (every step when log_interval is 1)."""
    val_losses: dict[int, float] = field(default_factory=dict)
    final_checkpoint: Path | None = None


class StopRequested:
    """SIGTERM/SIGINT/SIGUSR1 set a flag; the loop finishes its step, checkpoints and exits.

    SIGUSR1 is what SLURM sends before a time limit or preemption (`--signal=USR1@<s>`).
    A second SIGTERM or SIGINT stops the process at once, without a checkpoint: a step can
    take hours (a GPU recipe on a CPU), and whoever sends it twice does not want to wait.
    The last checkpoint stays intact (checkpoints are written aside and renamed into place).
    "Second" means at least `REPEAT_AFTER_S` after the first: one Ctrl-C or one preemption
    often arrives twice within milliseconds (from the terminal or SLURM to the whole process
    group, and forwarded again by torchrun or our launcher), and must still checkpoint.
    The handler writes with `os.write`: logging is not safe inside a signal handler.
    """

    REPEAT_AFTER_S = 2.0

    def __init__(self) -> None:
        self.signal: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequested:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal, self._first_at = signum, time.monotonic()
            again = "" if signum == signal.SIGUSR1 else "; send it again to stop at once"
            note = f"{name}: finishing this step, then a checkpoint and exit{again}\n"
            os.write(2, note.encode())
        elif signum != signal.SIGUSR1 and time.monotonic() - self._first_at >= self.REPEAT_AFTER_S:
            os.write(2, f"{name} again: stopping now, without a checkpoint\n".encode())
            os._exit(128 + signum)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __bool__(self) -> bool:
        return self.signal is not None


class Trainer:
    """Trains one configured model, on one device or as one rank of a distributed strategy.

    The strategy (single device, DDP, DeepSpeed; see `pipeline.distributed.strategy`) wraps the
    model and owns the parts of a step that differ between layouts: gradient sync, precision and
    the optimizer step, the checkpoint format. The trainer owns the policy around them: the data,
    the learning rate, counters, non-finite steps, logging. Resumable from its own checkpoints.
    """

    def __init__(
        self,
        config: Config,
        components: TrainingComponents | None = None,
        strategy: Strategy | None = None,
    ) -> None:
        self.config = config
        self.parts = components or build_components(config)
        self.strategy: Strategy = strategy or SingleDevice(config=config)
        self.progress = Progress()
        self.run_dir = Path(config.run_dir)
        self.tracking_run_id: str | None = None
        self.last_windows: np.ndarray | None = None
        """Global window ids of the last step's batch (for the data-order ledger)."""
        seq = config.seq_len
        self.full_batch = global_batch_sequences(config.training, seq)
        self.world_size = self.strategy.world_size
        self.rank = self.strategy.rank
        plan_batch(self.full_batch, config.training.micro_batch_size, self.world_size, seq)
        parts = self.parts
        self.wrapped = self.strategy.wrap(parts.model, parts.optimizer, parts.precision)
        """The forward, optimizer and precision the loop uses (the strategy's wrapping)."""
        self.checkpoints = self.strategy.checkpoint_store(
            self.run_dir / "checkpoints", config.training.keep_checkpoints
        )
        self.nonfinite = NonfiniteGuard(config.training)

    # ----------------------------------------------------------------------------- state
    def loop_state_dict(self) -> dict[str, Any]:
        """The trainer's named states; the strategy adds weights, optimizer and scaler."""
        parts = self.parts
        return {
            "format": CHECKPOINT_FORMAT,
            "sampler": parts.sampler.state_dict(),
            "progress": vars(self.progress).copy(),
            "rng": capture_rng_state(),
            "config": public_values(self.config),  # no credentials in checkpoints
            "data": {"vocab_size": parts.vocab_size, "tokenizer": parts.tokenizer_id},
            "tracking": {"run_id": self.tracking_run_id},
        }

    def check_compatible(self, state: dict[str, Any], source: Path) -> None:
        """The check a strategy runs on a checkpoint before restoring anything from it."""
        check_compatible(state, self.config, self.parts.vocab_size, self.parts.tokenizer_id, source)

    def load_loop_state(
        self, state: dict[str, Any], source: Path, keep_position: bool = False
    ) -> None:
        """Restore data position, counters, tracking id and this rank's RNG state.

        `keep_position` (a non-finite rollback): the data position, the skipped/non-finite
        counters and the tracking run id stay as they are; step, tokens and RNG go back.
        """
        parts = self.parts
        try:
            if not keep_position:
                parts.sampler.load_state_dict(state["sampler"])
            progress = Progress(**state["progress"])
            restore_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise CheckpointError(f"{source}: {exc}") from None
        restore_rank_rng(state, self.rank, self.world_size)
        run_id = (state.get("tracking") or {}).get("run_id")
        if keep_position:
            progress.skipped_steps = self.progress.skipped_steps
            progress.nonfinite_steps = self.progress.nonfinite_steps
            run_id = self.tracking_run_id or run_id
        self.progress = progress
        self.tracking_run_id = run_id

    def resume(self, which: str | Path) -> Path:
        state, path = self.strategy.load(which, self.check_compatible)
        self.load_loop_state(state, path)
        logger.info("resumed from %s at step %d", path, self.progress.step)
        return path

    # ------------------------------------------------------------------------------ loop
    def _finished(self) -> bool:
        t = self.config.training
        if t.max_steps is not None and self.progress.step >= t.max_steps:
            return True
        return t.max_tokens is not None and self.progress.tokens_seen >= t.max_tokens

    def _lr(self) -> float:
        return self.parts.schedule(self.progress.tokens_seen)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over the global batch; returns the step's metrics.

        `train/loss` stays a 0-d device tensor: reading it waits for the GPU, so the loop
        converts it only at log steps (`float(...)` works on it anywhere).
        """
        parts, t = self.parts, self.config.training
        quantum = t.micro_batch_size * self.world_size
        sequences = ramped_sequences(
            t, self.full_batch, self.progress.tokens_seen, quantum, self.config.seq_len
        )
        plan = plan_batch(sequences, t.micro_batch_size, self.world_size, self.config.seq_len)
        wrapped = self.wrapped
        lr = self._lr()
        for group in wrapped.optimizer.param_groups:
            group["lr"] = lr

        ids = parts.sampler.global_batch(plan.global_sequences)
        self.last_windows = ids
        mine = ids[self.rank * plan.sequences_per_rank : (self.rank + 1) * plan.sequences_per_rank]
        loss_sum = torch.zeros((), device=parts.device)
        parts.model.train()
        for micro in range(plan.accumulation_steps):
            chunk = mine[micro * plan.micro_batch_size : (micro + 1) * plan.micro_batch_size]
            inputs, targets = parts.to_device(*parts.sampler.gather(chunk))
            with self.strategy.micro_step(last=micro == plan.accumulation_steps - 1):
                with wrapped.precision.autocast():
                    _, loss = wrapped.forward(inputs, targets)
                loss = loss / plan.accumulation_steps
                self.strategy.backward(loss)
            loss_sum += loss.detach()

        loss_sum = self.strategy.reduce_mean(loss_sum)  # the global batch's loss, as on one device
        result = self.strategy.step()
        if self._not_applied(result):  # nonfinite_policy rollback
            return self.train_step()  # the same step again, on the next batch
        self.progress.step += 1
        self.progress.tokens_seen += plan.global_tokens
        return {
            "train/loss": loss_sum,
            "train/lr": lr,
            "train/grad_norm": result.grad_norm,
            "train/loss_scale": wrapped.precision.loss_scale(),
            "train/tokens_seen": float(self.progress.tokens_seen),
            "train/batch_sequences": float(plan.global_sequences),
        }

    def _not_applied(self, result: StepResult) -> bool:
        """Count a step whose update was not applied; True when it was rolled back.

        An fp16 overflow is the loss scaler's business: counted and reported. A non-finite
        gradient goes to training.nonfinite_policy (skip, abort, or roll back here).
        """
        if result.applied:
            return False
        if result.overflow:
            self.progress.skipped_steps += 1
            logger.warning(
                "step %d: fp16 gradient overflow, update skipped, loss scale now %g",
                self.progress.step,
                self.wrapped.precision.loss_scale(),
            )
            return False
        where = self.nonfinite.handle(self.progress, result.grad_norm)
        if where is None:
            return False
        self._roll_back(where)
        return True

    # -------------------------------------------------------------- non-finite rollback
    def _rollback_candidates(self) -> list[Path]:
        """This run's checkpoints at or before the current step, newest first (not verified).

        Not simply `latest`: after a resume from an older checkpoint, `latest` may still
        point past the current step.
        """
        self.strategy.flush_checkpoints()  # a checkpoint still being written counts too
        store, step = self.checkpoints, self.progress.step
        return self.strategy.main_only(
            lambda: [path for saved, path in reversed(store.list_checkpoints()) if saved <= step]
        )

    def _ensure_rollback_point(self) -> None:
        """With nonfinite_policy rollback, save the current state if there is nothing to roll
        back to yet."""
        if not self.nonfinite.wants_rollback_point or self._rollback_candidates():
            return
        self.save_checkpoint()  # collective: every rank got the same answer above
        logger.info(
            "nonfinite_policy rollback: saved the starting state (step %d) to roll back to "
            "until the first checkpoint",
            self.progress.step,
        )

    def _roll_back(self, where: str) -> None:
        """Restore the newest intact checkpoint at or before the current step, keeping the
        data position past the bad batch and the non-finite counters."""
        cursor = self.parts.sampler.cursor
        bad_step = self.progress.step + 1
        self.wrapped.optimizer.zero_grad(set_to_none=True)
        problems = []
        for path in self._rollback_candidates():
            try:
                state, source = self.strategy.load(path, self.check_compatible)
            except CorruptCheckpointError as exc:
                problems.append(str(exc))
                logger.warning("%s; trying an older one", exc)
                continue
            self.load_loop_state(state, source, keep_position=True)
            self.nonfinite.rolled_back(where, self.progress.step, bad_step, source, cursor)
            return
        raise CheckpointError(
            f"{where}; nonfinite_policy rollback found no intact checkpoint at or before step "
            f"{self.progress.step} in {self.checkpoints.directory}"
            + (": " + "; ".join(problems) if problems else "")
        )

    def evaluate(self) -> float:
        """Validation loss: one source's mean, or the sources' means averaged by weight."""
        return self.parts.val_sampler.weighted_mean(self.evaluate_sources())

    def evaluate_sources(self) -> dict[str, float]:
        """Each source's mean validation loss over its fixed windows (no RNG is consumed)."""
        return {
            source.name: self._evaluate_windows(source.sampler)
            for source in self.parts.val_sampler.sources
        }

    @torch.no_grad()
    def _evaluate_windows(self, sampler: SequenceSampler) -> float:
        parts, t = self.parts, self.config.training
        windows = evaluation_windows(sampler.num_windows, t.eval_iters * t.micro_batch_size)
        parts.model.eval()
        total, count = 0.0, 0
        for start in range(0, len(windows), t.micro_batch_size):
            chunk = windows[start : start + t.micro_batch_size]
            inputs, targets = parts.to_device(*sampler.gather(chunk))
            with self.wrapped.precision.autocast():
                _, loss = self.wrapped.forward(inputs, targets)
            total += float(loss) * len(chunk)
            count += len(chunk)
        parts.model.train()
        return total / count

    def _log_validation(self, tracker: Any, step: int, result: TrainResult) -> None:
        """`val/loss` (the weighted mean); a mixture adds `val/<source>_loss` per source."""
        losses = self.evaluate_sources()
        val = self.parts.val_sampler.weighted_mean(losses)
        result.val_losses[step] = val
        metrics = {"val/loss": val}
        detail = ""
        if len(losses) > 1:
            metrics.update({f"val/{metric_name(name)}_loss": v for name, v in losses.items()})
            detail = " (" + ", ".join(f"{name} {v:.4f}" for name, v in losses.items()) + ")"
        tracker.log_metrics(metrics, step)
        logger.info("step %d: val loss %.4f%s", step, val, detail)

    def save_checkpoint(self) -> Path:
        return self.strategy.save(self.loop_state_dict(), self.progress.step)

    def fit(self, tracker: Any, reporter: ProgressReporter | None = None) -> TrainResult:
        """Train until max_steps/max_tokens or a stop signal; checkpoint on the way out.

        Returns only once the last checkpoint is on disk (saves may be written in the
        background while training goes on: `training.async_checkpoint`).
        """
        if reporter is None:
            reporter = (
                ProgressReporter(
                    self.config, self.parts, self.progress.step, self.progress.tokens_seen
                )
                if self.strategy.is_main
                else _QuietReporter()
            )
        result = TrainResult(progress=self.progress, preempted=False)
        try:
            self._loop(tracker, reporter, result)
        except BaseException:
            reporter.close()
            try:  # keep the checkpoint being written; report, not mask, the error in flight
                self.strategy.flush_checkpoints(collective=False)
            except Exception as exc:
                logger.error("the checkpoint being written when training failed is lost: %s", exc)
            raise
        reporter.close()
        self.strategy.flush_checkpoints()
        result.progress = self.progress
        return result

    def _loop(self, tracker: Any, reporter: Any, result: TrainResult) -> None:
        t = self.config.training
        ledger = None
        if t.data_ledger and self.strategy.is_main:
            ledger = DataLedger(self.run_dir / "logs" / LEDGER_FILE, self.progress.step)
        try:
            self._steps(tracker, reporter, result, ledger)
        finally:
            if ledger is not None:
                ledger.close()

    def _steps(
        self, tracker: Any, reporter: Any, result: TrainResult, ledger: DataLedger | None
    ) -> None:
        t = self.config.training
        self._ensure_rollback_point()  # nonfinite_policy rollback: have a checkpoint
        first_step = True
        with StopRequested() as stop:
            logger.info(
                "SIGTERM or Ctrl-C: checkpoint after this step and exit; again (%.0f s or more "
                "later): stop at once",
                StopRequested.REPEAT_AFTER_S,
            )
            while not self._finished():
                metrics = self.train_step()
                step = self.progress.step
                if ledger is not None:
                    ledger.record(step, self.last_windows)
                if first_step:
                    self.strategy.prepare_checkpoint_buffers(self.loop_state_dict())
                    first_step = False
                if step % t.log_interval == 0 or step == 1:
                    metrics["train/loss"] = float(metrics["train/loss"])  # waits for the GPU
                    metrics.update(reporter.throughput(step, self.progress.tokens_seen))
                    if "perf/mfu" in metrics:  # tokens/s is the job's, the peak one device's
                        metrics["perf/mfu"] /= self.world_size
                    metrics.update(self.parts.sampler.data_metrics())  # mixtures only
                    result.losses[step] = metrics["train/loss"]
                    tracker.log_metrics(metrics, step)
                    reporter.update(step, metrics)
                if step % t.eval_interval == 0 or self._finished():
                    self._log_validation(tracker, step, result)
                # A signal may reach the ranks at different steps: stop together.
                stopping = self.strategy.any_rank(bool(stop))
                if step % t.checkpoint_interval == 0 or self._finished() or stopping:
                    started = time.perf_counter()
                    result.final_checkpoint = self.save_checkpoint()
                    stall = time.perf_counter() - started
                    tracker.log_metrics({"perf/checkpoint_stall_s": stall}, step)
                    logger.info("step %d: checkpoint taken, training stalled %.2f s", step, stall)
                if stopping:
                    logger.warning(
                        "signal %s received: checkpoint saved at step %d, exiting",
                        stop.signal or "(on another rank)",
                        step,
                    )
                    result.preempted = True
                    break


class _QuietReporter:
    """What ranks other than 0 report: nothing (rank 0 alone logs and tracks)."""

    def throughput(self, step: int, tokens_seen: int) -> dict[str, float]:
        return {}

    def update(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass
