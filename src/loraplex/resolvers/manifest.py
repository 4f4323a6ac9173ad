"""The manifest a download leaves in its adapter directory: "downloaded by loraplex, evictable".

It records where the adapter came from, every file with its size and version tag (S3 ETag,
the Hub's sha256 or blob id, an mtime), and when the source last confirmed it. Its mtime is
the adapter's last use, the adapter cache's LRU clock (written by holds.py). A directory
without one was placed by hand: the cache never replaces, counts nor evicts it.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from loraplex.resolvers.holds import MANIFEST_FILE

MANIFEST_FORMAT = 1


@dataclass
class Manifest:
    lora_name: str
    location: str
    fingerprint: str
    files: dict[str, dict]                  # name -> {"size": int, "tag": str | None}
    revision: str | None
    base_model_name_or_path: str | None
    downloaded_at: float
    checked_at: float                       # last time the source confirmed this version
    format: int = MANIFEST_FORMAT

    @property
    def total_bytes(self) -> int:
        return sum(f["size"] for f in self.files.values())


def read_manifest(entry: Path) -> Manifest | None:
    try:
        data = json.loads((entry / MANIFEST_FILE).read_text(encoding="utf-8"))
        if data.get("format") != MANIFEST_FORMAT:
            return None
        return Manifest(**data)
    except (OSError, ValueError, TypeError, RecursionError):
        return None


def intact_manifest(entry: Path) -> Manifest | None:
    """The manifest, if every recorded file is present with its recorded size."""
    manifest = read_manifest(entry)
    if manifest is None:
        return None
    for name, info in manifest.files.items():
        try:
            if (entry / name).stat().st_size != info["size"]:
                return None
        except OSError:
            return None
    return manifest


def write_manifest(entry: Path, manifest: Manifest) -> None:
    """Write atomically: a reader sees the old or the new manifest, never half of one."""
    tmp = entry / f"{MANIFEST_FILE}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(asdict(manifest), indent=1), encoding="utf-8")
    os.replace(tmp, entry / MANIFEST_FILE)
