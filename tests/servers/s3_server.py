"""A moto S3 server on 127.0.0.1 that records every request and can stall downloads.

moto's own ThreadedMotoServer has no request log, so this builds the same
werkzeug app (moto's DomainDispatcherApplication) and wraps it in a WSGI
middleware of ours: the tests count downloads at the server, never in the client.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field

import boto3
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

from servers.threaded import ThreadedServer

ACCESS_KEY = "testing-key"
SECRET_KEY = "testing-secret"
REGION = "us-east-1"


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: str


@dataclass
class _Stall:
    key_path: str                      # "/bucket/key" whose GET body stalls
    after_bytes: int                   # bytes sent before stalling
    started: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    killed: bool = False               # set by kill(): cut the connection instead of resuming


class _RecordingApp:
    def __init__(self, app, server: "S3TestServer") -> None:
        self.app = app
        self.server = server

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "")
        with self.server.lock:
            self.server.requests.append(RecordedRequest(method, path, environ.get("QUERY_STRING", "")))
            stall = self.server.stall if method == "GET" and self.server.stall and path == self.server.stall.key_path else None
        body = self.app(environ, start_response)
        if stall is None:
            return body
        return self._stalled(body, stall, environ["werkzeug.socket"])

    @staticmethod
    def _stalled(body, stall: _Stall, connection: socket.socket):
        sent = 0
        for chunk in body:
            if not stall.started.is_set() and sent + len(chunk) > stall.after_bytes:
                cut = max(stall.after_bytes - sent, 0)
                yield chunk[:cut]
                stall.started.set()
                stall.release.wait(60)
                if stall.killed:
                    # What a client sees when the server process dies mid-body.
                    connection.shutdown(socket.SHUT_RDWR)
                    raise ConnectionResetError("S3 test server killed mid-download")
                chunk = chunk[cut:]
            sent += len(chunk)
            yield chunk


class _QuietHandler(MotoRequestHandler):
    def log_request(self, *args, **kwargs) -> None:
        pass


class S3TestServer(ThreadedServer):
    """moto in server mode on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.lock = threading.Lock()
        self.stall: _Stall | None = None
        app = _RecordingApp(DomainDispatcherApplication(create_backend_app), self)
        self._serve(make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler))
        self.endpoint_url = f"http://127.0.0.1:{self.port}"

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def env(self) -> dict[str, str]:
        """The standard AWS variables a resolver needs to reach this server."""
        return {"AWS_ENDPOINT_URL_S3": self.endpoint_url, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION}

    def reset_log(self) -> None:
        with self.lock:
            self.requests.clear()

    def downloads(self, bucket: str, key: str) -> int:
        """GETs of one object's body (listings and HEADs are not downloads)."""
        path = f"/{bucket}/{key}"
        with self.lock:
            return sum(1 for r in self.requests if r.method == "GET" and r.path == path)

    def count(self, bucket: str) -> int:
        """Every request that touched `bucket`."""
        with self.lock:
            return sum(1 for r in self.requests if r.path == f"/{bucket}" or r.path.startswith(f"/{bucket}/"))

    def stall_get(self, bucket: str, key: str, after_bytes: int) -> _Stall:
        """Make the next GET of one object send `after_bytes`, then hang until released
        (the rest of the body follows the release)."""
        with self.lock:
            self.stall = _Stall(f"/{bucket}/{key}", after_bytes)
            return self.stall

    def clear_stall(self) -> None:
        with self.lock:
            if self.stall:
                self.stall.release.set()
            self.stall = None


def upload_dir(client, bucket: str, prefix: str, local_dir) -> None:
    """Upload every file directly inside `local_dir` to s3://bucket/prefix/."""
    from pathlib import Path
    for path in sorted(Path(local_dir).iterdir()):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
