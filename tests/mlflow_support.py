"""A real `mlflow server` for tests, and the polling helper the server tests wait with.

Shared by the tracking tests (a server that dies and comes back) and the team-server test
(one server, artifacts proxied). The server is the team setup the README describes: a SQLite
database, artifacts in `--artifacts-destination`, served through the server's HTTP proxy.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def poll(condition: Callable[[], object], deadline_s: float, what: str) -> object:
    """Call `condition` until it returns something truthy; fail after `deadline_s`."""
    end = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline_s:.0f} s waiting for {what}")
        time.sleep(0.2)  # polling cadence, not synchronisation


class MlflowServer:
    """`mlflow server` on 127.0.0.1 in its own process group, restartable on the same port.

    Everything it keeps lies under `root`: `server.db`, `artifacts/` (the destination its
    artifact proxy writes to) and `server.log`. It runs in `root`, so nothing lands in the
    working directory of the tests.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.artifacts = root / "artifacts"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.root / "server.log", "a") as log:
            self.proc = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "mlflow"),
                    "server",
                    "--backend-store-uri",
                    f"sqlite:///{self.root / 'server.db'}",
                    "--artifacts-destination",
                    str(self.artifacts),
                    "--serve-artifacts",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                ],
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                tail = (self.root / "server.log").read_text()[-2000:]
                pytest.fail(f"mlflow server exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    return response.status == 200
            except (urllib.error.URLError, OSError):
                return False

        poll(healthy, 120, "the MLflow server to answer /health")

    def kill(self) -> None:
        """SIGKILL the whole process group (server and its workers), as a crash would."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

        def port_closed() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", self.port)) != 0

        poll(port_closed, 30, "the killed server's port to close")

    def stop(self) -> None:
        """Kill the server if it still runs (fixture teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
