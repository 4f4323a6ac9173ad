"""The lifecycle the test servers share: serve on a daemon thread, stop, or die mid-request."""

from __future__ import annotations

import threading


class ThreadedServer:
    """Base of the test servers. A subclass builds its HTTP server and calls `_serve(server)`;
    `self.stall` (an object with a `release` event and a `killed` flag) may hold a download open."""

    stall = None

    def _serve(self, server) -> None:
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        if self.stall:
            self.stall.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def kill(self) -> None:
        """Stop as if the process died: a stalled download is cut off mid-body and new
        connections are refused."""
        if self.stall:
            self.stall.killed = True
        self.stop()
