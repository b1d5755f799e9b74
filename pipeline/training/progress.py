"""What a person watching the run sees: a progress bar on a terminal, log lines otherwise.

Also derives the throughput metrics (tokens/s, MFU, memory), averaged over each log interval.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import torch
from tqdm import tqdm

from pipeline.config.schema import Config
from pipeline.training.throughput import device_peak_tflops, mfu

logger = logging.getLogger("pipeline.train")


class ProgressReporter:
    """tqdm bar (tokens/s, loss, ETA) when stderr is a terminal; INFO lines every log_interval."""

    def __init__(self, config: Config, parts: Any, start_step: int, start_tokens: int = 0) -> None:
        self.config = config
        self.device = parts.device
        self.flops_per_token = parts.flops_per_token
        self.peak = device_peak_tflops(parts.device, config.training.peak_tflops)
        total = config.training.max_steps
        self.bar = (
            tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True)
            if sys.stderr.isatty()
            else None
        )
        self._mark = (start_step, start_tokens, time.perf_counter())
        """(step, tokens_seen, time) at the previous log step (at first: the run's start)."""

    def throughput(self, step: int, tokens_seen: int) -> dict[str, float]:
        """Tokens/s, step time and MFU averaged since the previous log step.

        Measured over the whole interval, so evaluation, checkpoint stalls and tracking are
        included: the figure a run really achieves. The first interval starts when the
        reporter is made (start-up and compilation land in it).
        """
        now = time.perf_counter()
        last_step, last_tokens, last_time = self._mark
        self._mark = (step, tokens_seen, now)
        seconds = max(now - last_time, 1e-9)
        tokens_per_s = (tokens_seen - last_tokens) / seconds
        out = {
            "perf/tokens_per_s": tokens_per_s,
            "perf/step_time_s": seconds / max(step - last_step, 1),
        }
        value = mfu(tokens_per_s, self.flops_per_token, self.peak)
        if value is not None:
            out["perf/mfu"] = value
        if self.device.type == "cuda":
            out["perf/max_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(
                loss=f"{metrics['train/loss']:.4f}",
                tok_s=f"{metrics['perf/tokens_per_s']:.0f}",
                refresh=False,
            )
        if step % self.config.training.log_interval == 0 or step == 1:
            mfu_text = f" mfu {metrics['perf/mfu']:.1%}" if "perf/mfu" in metrics else ""
            if "perf/max_memory_gb" in metrics:
                mfu_text += f" mem {metrics['perf/max_memory_gb']:.1f} GiB"
            logger.info(
                "step %d: loss %.4f lr %.3g grad_norm %.3f tokens/s %.0f%s",
                step,
                metrics["train/loss"],
                metrics["train/lr"],
                metrics["train/grad_norm"],
                metrics["perf/tokens_per_s"],
                mfu_text,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
