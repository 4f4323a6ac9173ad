"""Error messages never show the server's directories: the adapter cache (also the filesystem
resolver's directory) becomes the name of its setting, its bookkeeping disappears."""

from __future__ import annotations

from loraplex.errors import AdapterInvalidError, ResolverError
from loraplex.resolvers.cache import AdapterCache
from loraplex.server.errors import exception_to_body


def test_cache_directories_are_redacted(tmp_path, monkeypatch):
    env_dir, other = tmp_path / "from-env", AdapterCache(tmp_path / "explicit").root
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(env_dir))
    cases = [
        (AdapterInvalidError(f"adapter '{env_dir}/sql' has no weights file"),
         "adapter '$VLLM_LORA_RESOLVER_CACHE_DIR/sql' has no weights file"),
        (ResolverError(f"download failed: [Errno 2] No such file: '{other}/.loraplex-tmp/k-1.2.3/w'"),
         "download failed: [Errno 2] No such file: '$VLLM_LORA_RESOLVER_CACHE_DIR (a temporary file of the "
         "adapter cache)'"),
        (AdapterInvalidError("adapter '/home/me/my-lora' has no weights file"),
         "adapter '/home/me/my-lora' has no weights file"),            # the user's own path stays
    ]
    for exc, message in cases:
        status, body = exception_to_body(exc)
        assert body["error"]["message"] == message and status in (400, 502)
