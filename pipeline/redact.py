"""Keep credentials in URLs out of everything the pipeline writes or logs.

A tracking URI like `http://user:pass@host` (from `MLFLOW_TRACKING_URI` or `tracking.uri`)
reaches the resolved config, checkpoints, `model/config.yaml`, MLflow params, the sbatch
script and log lines. Each of those goes through `redact` / `redact_values` on the way out,
which turn `scheme://user:pass@host` into `scheme://user:***@host` (and a bare token
`https://token@host` into `https://***@host`; `ssh://user@host` keeps its user name). The
live config keeps the real value, so tracking still authenticates.

A redacted URI cannot authenticate; `has_redacted_secret` lets the tracking code refuse one
(e.g. from a resolved config fed back in) with a clear message instead of failing quietly.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MARK = "***"
_HTTP = {"http://", "https://"}
_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/?#@\s]*)(?::(?P<secret>[^/?#\s]*))?@"
)


def _replace(match: re.Match[str]) -> str:
    scheme, user, secret = match.group("scheme", "user", "secret")
    if secret is None:  # `https://token@host`: over HTTP a lone user part is a token
        token = scheme.lower() in _HTTP and user and user != MARK
        return f"{scheme}{MARK}@" if token else match.group(0)
    return f"{scheme}{user}:{MARK}@"


def redact(text: str) -> str:
    """`text` with the password (or lone token) of every URL replaced by `***`."""
    return _USERINFO.sub(_replace, text) if "@" in text else text


def redact_values(value: Any) -> Any:
    """A copy of a JSON-like structure with every string passed through `redact`."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(item) for item in value)
    return value


def has_redacted_secret(uri: str) -> bool:
    """Does `uri` carry a `***` placeholder where a password or token was?"""
    return any(
        match.group("secret") == MARK
        or (match.group("secret") is None and match.group("user") == MARK)
        for match in _USERINFO.finditer(uri)
    )


class RedactingFormatter(logging.Formatter):
    """A log formatter whose output (message, arguments, traceback) is passed through `redact`."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
