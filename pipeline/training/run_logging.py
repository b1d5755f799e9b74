"""Python logging for one run: `logs/training.log` in the run directory, plus the console.

The handlers are attached for the run's lifetime and removed when it ends, so two runs in one
process (tests, sweeps) never write into each other's files.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from pipeline.redact import RedactingFormatter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def run_logging(
    log_file: Path | None, level: str, console: bool = True
) -> Iterator[logging.Logger]:
    """Route the `pipeline` logger to `log_file` (appending, so resumes extend it) and stderr."""
    logger = logging.getLogger("pipeline")
    previous_level = logger.level
    logger.setLevel(level)
    handlers: list[logging.Handler] = []
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    if console:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(RedactingFormatter(FORMAT))  # no password of a URL in the log
        logger.addHandler(handler)
    try:
        yield logger
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(previous_level)
