"""MediaLoader: the bytes behind an image or audio reference in a chat message, with limits.

    data:<mime>;base64,<payload>   always accepted (the usual way to send media)
    http:// and https://           only with allow_remote_media (--allow-remote-media), optionally
                                   only from allowed_media_domains; each download must finish
                                   within media_fetch_timeout seconds and stay under
                                   max_media_bytes, redirects included
    anything else (file:, ftp:...) refused

Every refusal is an InvalidRequestError saying what to change. Blocking: the server calls it
in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

from loraplex.core.multimodal.audio import load_audio_bytes
from loraplex.core.multimodal.image import decode_image
from loraplex.errors import InvalidRequestError

_CHUNK = 64 * 1024


class MediaLoader:
    def __init__(self, *, allow_remote: bool = False, allowed_domains: list[str] | None = None,
                 timeout: float = 5.0, max_bytes: int = 25 * 2**20):
        self.allow_remote, self.timeout, self.max_bytes = allow_remote, timeout, max_bytes
        self.allowed_domains = {d.lower() for d in allowed_domains} if allowed_domains else None

    @classmethod
    def from_config(cls, config) -> "MediaLoader":
        return cls(allow_remote=config.allow_remote_media, allowed_domains=config.allowed_media_domains,
                   timeout=config.media_fetch_timeout, max_bytes=config.max_media_bytes)

    def image(self, url: str, where: str):
        return decode_image(self.fetch(url, where), where)

    def audio(self, url: str, where: str) -> tuple[np.ndarray, int]:
        return load_audio_bytes(self.fetch(url, where), where)

    def input_audio(self, data: str, audio_format: str | None, where: str) -> tuple[np.ndarray, int]:
        """OpenAI's input_audio part: base64 data and a format ("wav"; "mp3" is refused)."""
        if audio_format not in (None, "wav"):
            raise InvalidRequestError(f"{where} has format {audio_format!r}; loraplex decodes 'wav' audio only")
        return load_audio_bytes(self._base64(data, where), where)

    def fetch(self, url: str, where: str) -> bytes:
        if not isinstance(url, str) or not url:
            raise InvalidRequestError(f"{where} needs a URL (data: or http(s):)")
        scheme = url.split(":", 1)[0].lower()
        if scheme == "data":
            header, sep, payload = url.partition(",")
            if not sep or not header.endswith(";base64"):
                raise InvalidRequestError(f"{where} is a data: URL without ';base64,'; send "
                                          f"data:<mime type>;base64,<data>")
            return self._base64(payload, where)
        if scheme not in ("http", "https"):
            raise InvalidRequestError(f"{where} has a {scheme}: URL; send a data: URL (or an http(s) URL "
                                      f"where the server allows them)")
        if not self.allow_remote:
            raise InvalidRequestError(f"{where} is an {scheme} URL, but this server does not fetch remote media; "
                                      f"send the file inline as a data: URL (or start it with --allow-remote-media)")
        return self._download(url, where)

    def _base64(self, payload: str, where: str) -> bytes:
        if len(payload) > self.max_bytes * 4 // 3 + 4:
            raise InvalidRequestError(f"{where} is larger than the {self.max_bytes} bytes allowed")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise InvalidRequestError(f"{where} is not valid base64 ({e})") from None

    def _check_host(self, url: str, where: str) -> None:
        host = (urllib.parse.urlsplit(url).hostname or "").lower()
        if self.allowed_domains is not None and host not in self.allowed_domains:
            raise InvalidRequestError(f"{where}: the host {host!r} is not one of the allowed media domains "
                                      f"(--allowed-media-domains)")

    def _download(self, url: str, where: str) -> bytes:
        self._check_host(url, where)
        loader = self

        class CheckedRedirects(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, req, fp, code, msg, headers, newurl):
                if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
                    raise InvalidRequestError(f"{where} redirects to a non-http URL")
                loader._check_host(newurl, where)
                return super().redirect_request(req, fp, code, msg, headers, newurl)

        deadline = time.monotonic() + self.timeout
        opener = urllib.request.build_opener(CheckedRedirects)
        try:
            with opener.open(urllib.request.Request(url, headers={"User-Agent": "loraplex"}),
                             timeout=self.timeout) as response:
                declared = response.headers.get("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                    raise InvalidRequestError(f"{where} is larger than the {self.max_bytes} bytes allowed "
                                              f"({declared} bytes)")
                chunks, size = [], 0
                while chunk := response.read(_CHUNK):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise InvalidRequestError(f"{where} is larger than the {self.max_bytes} bytes allowed")
                    if time.monotonic() > deadline:
                        raise TimeoutError()
                    chunks.append(chunk)
                return b"".join(chunks)
        except InvalidRequestError:
            raise
        except (TimeoutError, OSError) as e:
            if isinstance(e, urllib.error.HTTPError):
                raise InvalidRequestError(f"{where} could not be fetched: HTTP {e.code} from {url}") from None
            if isinstance(e, TimeoutError) or "timed out" in str(e):
                raise InvalidRequestError(f"{where} could not be fetched within {self.timeout:g} s") from None
            raise InvalidRequestError(f"{where} could not be fetched ({e})") from None
