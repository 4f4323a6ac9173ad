"""A small asyncio HTTP/1.1 client for `loraplex bench serve`: POST JSON, read SSE as it arrives.

A benchmark client must cost little and time events when they arrive: this one parses
the status line, headers and the body (Content-Length, chunked, or until close) itself,
on asyncio streams, and keeps connections alive between requests (one pool per run).
http:// and https:// URLs; no proxies, no redirects.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class HTTPStatusError(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:500].decode('utf-8', 'replace')}")
        self.status = status
        self.body = body


class Response:
    def __init__(self, status: int, headers: dict[str, str], reader: asyncio.StreamReader) -> None:
        self.status = status
        self.headers = headers
        self._reader = reader
        self.keep_alive = headers.get("connection", "").lower() != "close"
        self.complete = False

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        reader = self._reader
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass                       # trailers
                    break
                data = await reader.readexactly(size)
                await reader.readexactly(2)       # CRLF
                yield data
        elif "content-length" in self.headers:
            remaining = int(self.headers["content-length"])
            while remaining:
                data = await reader.read(min(remaining, 1 << 16))
                if not data:
                    raise ConnectionError("the server closed the connection mid-body")
                remaining -= len(data)
                yield data
        else:
            self.keep_alive = False
            while data := await reader.read(1 << 16):
                yield data
        self.complete = True

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_bytes()])

    async def iter_sse_data(self) -> AsyncIterator[bytes]:
        """The `data:` payload of each server-sent event, as soon as its event is complete."""
        buffer = b""
        async for chunk in self.iter_bytes():
            buffer += chunk
            while True:
                end = buffer.find(b"\n\n")
                if end < 0:
                    break
                event, buffer = buffer[:end], buffer[end + 2:]
                for line in event.split(b"\n"):
                    if line.startswith(b"data:"):
                        yield line[5:].strip()


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    async def request(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> Response:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        response_headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b"\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            response_headers[key.strip().lower()] = value.strip()
        return Response(status, response_headers, self.reader)

    def close(self) -> None:
        self.writer.close()


class ConnectionPool:
    """Keep-alive connections to one origin; a connection serves one request at a time."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"--base-url must be an http:// or https:// URL, got {base_url!r}")
        self.https = parts.scheme == "https"
        self.hostname = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.host_header = parts.netloc
        self.prefix = parts.path.rstrip("/")
        self._idle: list[Connection] = []

    async def _connect(self) -> Connection:
        context = ssl.create_default_context() if self.https else None
        reader, writer = await asyncio.open_connection(self.hostname, self.port, ssl=context, limit=1 << 22)
        return Connection(reader, writer, self.host_header)

    def stream(self, path: str, body: bytes, headers: dict[str, str], method: str = "POST") -> _Exchange:
        """An async context manager yielding the Response of METHOD prefix+path (the body not read yet)."""
        return _Exchange(self, self.prefix + path, body, headers, method)

    def _release(self, conn: Connection, response: Response | None) -> None:
        if response is not None and response.complete and response.keep_alive:
            self._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


class _Exchange:
    def __init__(self, pool: ConnectionPool, path: str, body: bytes, headers: dict[str, str], method: str) -> None:
        self.pool, self.path, self.body, self.headers, self.method = pool, path, body, headers, method
        self.conn: Connection | None = None
        self.response: Response | None = None

    async def __aenter__(self) -> Response:
        reused = bool(self.pool._idle)
        self.conn = self.pool._idle.pop() if reused else await self.pool._connect()
        try:
            self.response = await self.conn.request(self.method, self.path, self.body, self.headers)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            self.conn.close()
            if not reused:
                raise
            # A kept-alive connection the server had closed meanwhile: one retry on a fresh one.
            self.conn = await self.pool._connect()
            self.response = await self.conn.request(self.method, self.path, self.body, self.headers)
        return self.response

    async def __aexit__(self, *exc) -> None:
        self.pool._release(self.conn, self.response if exc == (None, None, None) else None)
