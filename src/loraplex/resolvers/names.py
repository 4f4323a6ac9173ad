"""Adapter-name safety checks, applied before any I/O."""

from __future__ import annotations

from loraplex.errors import AdapterNameError

MAX_ADAPTER_NAME_LENGTH = 255
# A name's '/'-separated parts become directory names (the filesystem resolver's and the
# download cache's): most filesystems cap one at 255 bytes, and a longer one makes every
# lookup fail with ENAMETOOLONG. Counted in UTF-8, as the filesystem stores it.
MAX_NAME_COMPONENT_BYTES = 255


def check_adapter_name(lora_name: object) -> str:
    """Return `lora_name` if it is safe to use as a directory name or URL part.

    Rejects what could escape a cache dir or bucket prefix: '..' components,
    absolute paths, backslashes, NUL and other control characters, names
    longer than MAX_ADAPTER_NAME_LENGTH characters, names that are not valid
    Unicode (lone surrogates, which JSON escapes can carry), and components
    longer than MAX_NAME_COMPONENT_BYTES bytes in UTF-8. A single '/' is
    allowed between normal components (HF-style 'org/repo' names), and one at
    the end of such a name ('org/repo/', which vLLM's Hub resolver accepts for
    the repo's root).
    """
    if not isinstance(lora_name, str) or not lora_name:
        raise AdapterNameError(f"adapter name must be a non-empty string, got {lora_name!r}")
    if len(lora_name) > MAX_ADAPTER_NAME_LENGTH:
        raise AdapterNameError(f"adapter name is {len(lora_name)} characters long; "
                               f"the limit is {MAX_ADAPTER_NAME_LENGTH}")
    if any(ord(c) < 32 or ord(c) == 127 for c in lora_name):
        raise AdapterNameError(f"adapter name {lora_name!r} contains NUL or control characters")
    try:
        lora_name.encode("utf-8")
    except UnicodeEncodeError:
        raise AdapterNameError(f"adapter name {lora_name[:40]!r} is not valid Unicode (it holds a lone "
                               f"surrogate); use a UTF-8 name") from None
    if "\\" in lora_name:
        raise AdapterNameError(f"adapter name {lora_name!r} contains a backslash; use plain names")
    if lora_name.startswith("/") or lora_name.startswith("~") or (len(lora_name) > 1 and lora_name[1] == ":"):
        raise AdapterNameError(f"adapter name {lora_name!r} looks like an absolute path; "
                               f"give the adapter's name, not its location")
    parts = lora_name.split("/")
    if len(parts) > 2 and parts[-1] == "":
        parts.pop()   # 'org/repo/': the trailing '/' of a Hub-style name
    if any(p in ("", ".", "..") for p in parts):
        raise AdapterNameError(f"adapter name {lora_name!r} has an empty, '.' or '..' path component")
    for part in parts:
        size = len(part.encode("utf-8"))
        if size > MAX_NAME_COMPONENT_BYTES:
            raise AdapterNameError(
                f"adapter name {lora_name[:40]!r}... has a part of {size} bytes in UTF-8; the limit is "
                f"{MAX_NAME_COMPONENT_BYTES} bytes per '/'-separated part (a filesystem limit): "
                f"use a shorter name")
    return lora_name
