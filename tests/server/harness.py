"""Run a real uvicorn server on 127.0.0.1 in a background thread, for tests."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

API_KEY = "test-key"


class ServerThread:
    """Starts `make_app()` inside the server thread's event loop (so engines that
    bind to a loop are created on the right one) and serves it until stop()."""

    def __init__(self, make_app: Callable[[], FastAPI]) -> None:
        self.make_app = make_app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.app: FastAPI | None = None
        self.server: uvicorn.Server | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="test-uvicorn")

    def _run(self) -> None:
        async def main() -> None:
            self.app = self.make_app()
            config = uvicorn.Config(self.app, log_level="warning", lifespan="on",
                                    timeout_graceful_shutdown=10)
            self.server = uvicorn.Server(config)
            await self.server.serve(sockets=[self.sock])
        try:
            asyncio.run(main())
        except BaseException as e:  # surfaced by start()
            self.error = e

    def start(self, timeout_s: float = 60) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not (self.server and self.server.started):
            if self.error or not self._thread.is_alive():
                self.sock.close()
                raise RuntimeError(f"test server failed to start: {self.error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        self._thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
