"""A Hugging Face Hub-compatible HTTP server serving model repos from a local directory.

It implements what huggingface_hub's model_info / list_repo_tree / list_repo_files /
snapshot_download / hf_hub_download call (read from the installed huggingface_hub):

    GET  /api/models/{org}/{repo}[/revision/{rev}]      -> {"id", "sha", "siblings": [...]}
    GET  /api/models/{org}/{repo}/tree/{rev}[/{path}]   -> [{"type", "path", "size", "oid", "lfs"?}]
    HEAD|GET /{org}/{repo}/resolve/{rev}/{file}         -> the file, with ETag, X-Repo-Commit,
                                                           Content-Length (and Range support)

Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound) as the Hub's do.
Repos live in `<root>/<org>/<repo>/` (branch "main"); `<root>/<org>/<repo>@<branch>/` is
another branch. A repo's commit sha is a hash of its files, so any change is a new commit.
No Xet headers are ever sent, so clients download over plain HTTP.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from servers.threaded import ThreadedServer

LFS_SUFFIXES = (".safetensors", ".bin")


@dataclass
class HubRequest:
    method: str
    path: str
    authorization: str | None


@dataclass
class HubStall:
    filename: str                      # path in the repo whose next GET stalls
    after_bytes: int                   # bytes sent before stalling
    started: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    killed: bool = False               # set by kill(): cut the connection instead of resuming


class HubTestServer(ThreadedServer):
    """A Hub-compatible server over a local directory (kill() then a new HubTestServer on the
    same root serves the same repos)."""

    def __init__(self, root: str | os.PathLike, token: str | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.token = token                     # when set, every request must carry it
        self.requests: list[HubRequest] = []
        self.lock = threading.Lock()
        self.stall: HubStall | None = None
        handler = type("Handler", (_HubHandler,), {"hub": self})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        self._serve(server)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def stall_download(self, filename: str, after_bytes: int) -> HubStall:
        """Make the next GET of `filename` (a path in any repo) send `after_bytes`, then
        hang until released (the rest follows) or killed."""
        with self.lock:
            self.stall = HubStall(filename, after_bytes)
            return self.stall

    def repo_dir(self, repo_id: str, branch: str = "main") -> Path:
        return self.root / (repo_id if branch == "main" else f"{repo_id}@{branch}")

    def downloads(self, repo_id: str, filename: str) -> int:
        """GETs of one file's content, at any revision."""
        prefix, suffix = f"/{repo_id}/resolve/", f"/{filename}"
        with self.lock:
            return sum(1 for r in self.requests
                       if r.method == "GET" and r.path.startswith(prefix) and r.path.endswith(suffix)
                       and r.path.count("/") == prefix.count("/") + filename.count("/") + 1)

    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def reset_log(self) -> None:
        with self.lock:
            self.requests.clear()

    # -- repo model --------------------------------------------------------------

    def resolve_revision(self, repo_id: str, revision: str) -> tuple[Path, str] | None:
        """(directory, commit sha) for a branch name or a commit sha of one of its branches."""
        candidates = [(self.repo_dir(repo_id), "main")] + [
            (p, p.name.split("@", 1)[1]) for p in self.repo_dir(repo_id).parent.glob(f"{Path(repo_id).name}@*")]
        for directory, branch in candidates:
            if directory.is_dir():
                sha = commit_sha(directory)
                if revision in (branch, sha):
                    return directory, sha
        return None


def repo_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def commit_sha(directory: Path) -> str:
    digest = hashlib.sha1()
    for path in repo_files(directory):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0" + file_sha256(path).encode())
    return digest.hexdigest()


_hash_cache: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        _hash_cache[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _hash_cache[key]


def git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def tree_entry(directory: Path, path: Path) -> dict:
    entry = {"type": "file", "path": path.relative_to(directory).as_posix(), "size": path.stat().st_size}
    if path.name.endswith(LFS_SUFFIXES):
        sha = file_sha256(path)
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {entry['size']}\n"
        entry["oid"] = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer.encode()).hexdigest()
        entry["lfs"] = {"oid": sha, "size": entry["size"], "pointerSize": len(pointer)}
    else:
        entry["oid"] = git_blob_id(path)
    return entry


class _HubHandler(BaseHTTPRequestHandler):
    hub: HubTestServer

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._handle(send_body=False)

    def do_GET(self) -> None:
        self._handle(send_body=True)

    def _handle(self, send_body: bool) -> None:
        path = urlsplit(self.path).path
        with self.hub.lock:
            self.hub.requests.append(HubRequest(self.command, path, self.headers.get("Authorization")))
        if self.hub.token and self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            return self._error(401, "RepoNotFound", "Invalid credentials in Authorization header")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return self._api(parts[2:], send_body)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:])),
                                 send_body)
        self._error(404, None, f"no route for {path}")

    def _api(self, parts: list[str], send_body: bool) -> None:
        repo_id, rest = f"{parts[0]}/{parts[1]}", parts[2:]
        if not rest:
            rest = ["revision", "main"]
        revision = unquote(rest[1]) if len(rest) >= 2 else "main"
        found = self._find(repo_id, revision)
        if found is None:
            return
        directory, sha = found
        if rest[0] == "revision":
            files = repo_files(directory)
            body = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                    "siblings": [{"rfilename": p.relative_to(directory).as_posix()} for p in files]}
            return self._json(body, send_body)
        if rest[0] == "tree":
            sub = unquote("/".join(rest[2:])).strip("/")
            base = directory / sub if sub else directory
            if not base.is_dir():
                return self._error(404, "EntryNotFound", f"{sub} does not exist in {repo_id}")
            recursive = "recursive=true" in (urlsplit(self.path).query.lower())
            paths = repo_files(base) if recursive else sorted(base.iterdir())
            entries = []
            for p in paths:
                if p.is_dir():
                    entries.append({"type": "directory", "path": p.relative_to(directory).as_posix(),
                                    "oid": "0" * 40, "size": 0})
                else:
                    entries.append(tree_entry(directory, p))
            return self._json(entries, send_body)
        self._error(404, None, f"no API route {'/'.join(rest)}")

    def _resolve(self, repo_id: str, revision: str, filename: str, send_body: bool) -> None:
        found = self._find(repo_id, revision)
        if found is None:
            return
        directory, sha = found
        path = directory / filename
        if not path.is_file() or ".." in filename.split("/"):
            return self._error(404, "EntryNotFound", f"{filename} does not exist in {repo_id}@{revision}")
        data = path.read_bytes()
        entry = tree_entry(directory, path)
        etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
        start = 0
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes=") and range_header[6:].split("-")[0].isdigit():
            start = int(range_header[6:].split("-")[0])
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", sha)
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if send_body:
            with self.hub.lock:
                stall = self.hub.stall
                if stall is not None and (stall.filename != filename or stall.started.is_set()):
                    stall = None
            if stall is not None:
                return self._send_stalled(data[start:], stall)
            self.wfile.write(data[start:])

    def _send_stalled(self, body: bytes, stall: HubStall) -> None:
        self.wfile.write(body[:stall.after_bytes])
        stall.started.set()
        stall.release.wait(60)
        if stall.killed:
            # What a client sees when the server process dies mid-body.
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body[stall.after_bytes:])

    def _find(self, repo_id: str, revision: str) -> tuple[Path, str] | None:
        if not self.hub.repo_dir(repo_id).is_dir():
            self._error(404, "RepoNotFound", f"Repository Not Found for url: {repo_id}")
            return None
        found = self.hub.resolve_revision(repo_id, revision)
        if found is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return found

    def _json(self, body, send_body: bool) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def _error(self, status: int, code: str | None, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def main() -> None:
    """`python -m servers.hub_server ROOT`: serve ROOT until killed; prints the endpoint."""
    import sys
    server = HubTestServer(sys.argv[1]).start()
    print(server.endpoint, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
