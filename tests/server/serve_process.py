"""`loraplex serve` as a user starts it: a subprocess on a free local port, its output in a log
file. Cheap to import (no fixtures, no engine), so any test module can start a server this way."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`python -m loraplex.server.cli COMMAND *argv --port PORT` (COMMAND: serve or serve-ray),
    stdout and stderr in `log_path`. `argv` does not need --host: the server's own default is
    part of what tests check."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, command: str = "serve") -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loraplex.server.cli", command, *argv, "--port", str(self.port)],
            # unbuffered: tests read the log while the server runs (Ray's forwarded lines included)
            env={**env, "PYTHONUNBUFFERED": "1"}, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 120) -> None:
        """Until /health answers 200; fails with the server's log if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early (code {self.proc.returncode}):\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout_s} s:\n{self.log_path.read_text()}")

    def stop(self, grace_s: float = 0) -> None:
        """Kill the server; with grace_s, first SIGINT it and wait that long for it to exit
        (`serve-ray` stops the Ray cluster it started, which a kill would leave running)."""
        if grace_s and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()
