"""What a remote source says an adapter is (RemoteAdapter, RemoteFile), and the
AdapterSource interface the adapter cache downloads through (fsspec, the Hub)."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RemoteFile:
    """One file of an adapter as its source lists it."""
    name: str                # file name inside the adapter directory
    size: int
    tag: str | None = None   # what identifies this version: S3 ETag, HF sha256/blob id, mtime


@dataclass(frozen=True)
class RemoteAdapter:
    """What a source says an adapter consists of right now."""
    location: str                    # e.g. "s3://bucket/prefix/name", "hf://org/repo/sub@main"
    files: tuple[RemoteFile, ...]
    revision: str | None = None      # e.g. the HF commit sha; informational

    def fingerprint(self) -> str:
        """Changes whenever a file is added, removed, resized or re-tagged at the source."""
        rows = sorted((f.name, f.size, f.tag or "") for f in self.files)
        return hashlib.sha256(json.dumps([self.location, rows]).encode()).hexdigest()


class AdapterSource(ABC):
    """A place adapters are downloaded from. Methods block: call them from a thread."""

    @abstractmethod
    def stat(self, lora_name: str) -> RemoteAdapter | None:
        """List the adapter's files, or None if the source has no such adapter.
        Raise ResolverError when the source cannot be asked (down, refused, misconfigured)."""

    @abstractmethod
    def download(self, lora_name: str, remote: RemoteAdapter, dest: Path) -> None:
        """Write `remote.files` into the (existing, empty) directory `dest`."""
