"""Error types that separate a user's mistake from a bug.

The library raises `UserError` (and subclasses) for anything a user can fix: bad config, missing
or corrupt files, a checkpoint that does not match. The CLI turns these into one clear message and
exit code 2; any other exception is a programming error and keeps its traceback.
"""

from __future__ import annotations

USER_ERROR_EXIT_CODE = 2
"""Exit code for bad input: config, files, checkpoints."""

PREEMPTED_EXIT_CODE = 143
"""Exit code after a SIGTERM/SIGINT that was answered with a checkpoint (128 + SIGTERM)."""


class UserError(Exception):
    """A problem with the user's input that the user can fix; the message says what and where."""


class ConfigError(UserError):
    """The configuration is invalid: the message names every bad key and the file it came from."""


class DataError(UserError):
    """Input or prepared data is missing, empty, or malformed."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, or does not match the configured model or tokenizer."""
