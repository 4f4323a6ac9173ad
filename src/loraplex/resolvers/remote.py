"""The remote resolver: adapters under any fsspec URL (s3://, gs://, memory://, file://).

Plugin `lora_s3_resolver`, enabled by VLLM_LORA_RESOLVER_S3_URI. The adapter named
`name` is the set of files directly under `<uri>/<name>/`; it is downloaded into the
AdapterCache (VLLM_LORA_RESOLVER_CACHE_DIR) and served from there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec

from loraplex.errors import ConfigError, ResolverError
from loraplex.lora_request import LoRARequest
from loraplex.plugins import hookimpl
from loraplex.resolvers.base import LoRAResolver
from loraplex.resolvers.cache import AdapterCache, check_cache_name
from loraplex.resolvers.source import AdapterSource, RemoteAdapter, RemoteFile

PLUGIN_NAME = "lora_s3_resolver"
URI_ENV = "VLLM_LORA_RESOLVER_S3_URI"
STORAGE_OPTIONS_ENV = "LORAPLEX_RESOLVER_STORAGE_OPTIONS"

# fsspec protocol -> the package that implements it (imported lazily).
_BACKEND_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
                     "abfs": "adlfs", "abfss": "adlfs", "hdfs": "pyarrow", "sftp": "paramiko"}
# Where the URI's root is a real directory whose absence is a configuration error;
# elsewhere (object stores) prefixes don't exist on their own and the bucket is checked.
_DIRECTORY_PROTOCOLS = {"file", "local", "memory"}


class FsspecSource(AdapterSource):
    """Adapters stored as `<uri>/<name>/<file>` on an fsspec filesystem."""

    def __init__(self, uri: str, storage_options: dict | None = None, env=os.environ) -> None:
        if not isinstance(uri, str) or "://" not in uri:
            raise ConfigError(f"{URI_ENV} must be a URL such as s3://bucket/prefix, got {uri!r}")
        self.uri = uri.rstrip("/")
        self.protocol = fsspec.utils.get_protocol(uri)
        try:
            fs_class = fsspec.get_filesystem_class(self.protocol)
        except ImportError:
            package = _BACKEND_PACKAGES.get(self.protocol, f"the fsspec backend for {self.protocol}://")
            raise ConfigError(f"{URI_ENV}={uri!r} needs {package}, which is not installed: "
                              f"pip install {package}") from None
        except ValueError:
            raise ConfigError(f"{URI_ENV}={uri!r}: fsspec knows no protocol {self.protocol!r}") from None
        options = _default_options(self.protocol, env)
        options.update(storage_options or {})
        try:
            self.fs = fs_class(**options)
        except Exception as e:
            raise ConfigError(f"cannot open {uri!r} with storage options {sorted(options)}: {e}") from None
        self.root = self.fs._strip_protocol(self.uri).rstrip("/")

    def stat(self, lora_name: str) -> RemoteAdapter | None:
        path = f"{self.root}/{lora_name}"
        self.fs.invalidate_cache(path)  # listings are cached by fsspec; we want the source's truth
        try:
            listing = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            self._check_root()
            return None
        except Exception as e:
            raise self._error(f"cannot list {self.uri}/{lora_name}/", e) from None
        files = tuple(
            RemoteFile(name=info["name"].rsplit("/", 1)[-1], size=int(info["size"]), tag=_version_tag(info))
            for info in listing
            if info.get("type") == "file" and info["name"].rstrip("/").startswith(path + "/"))
        if not files:
            return None
        return RemoteAdapter(location=f"{self.uri}/{lora_name}", files=files)

    def download(self, lora_name: str, remote: RemoteAdapter, dest: Path) -> None:
        # One call for all files: async backends (s3fs, gcsfs) fetch them concurrently.
        remote_paths = [f"{self.root}/{lora_name}/{f.name}" for f in remote.files]
        try:
            self.fs.get(remote_paths, [str(dest / f.name) for f in remote.files])
        except FileNotFoundError:
            raise ResolverError(f"a file of {remote.location} disappeared during the download "
                                f"(the adapter is being re-uploaded?); retry the request") from None
        except Exception as e:
            raise self._error(f"download of {remote.location} failed", e) from None

    def _check_root(self) -> None:
        """A missing adapter is None; a missing bucket (or root dir) is a configuration error."""
        container = self.root if self.protocol in _DIRECTORY_PROTOCOLS else self.root.split("/", 1)[0]
        try:
            exists = self.fs.exists(container)
        except Exception as e:
            raise self._error(f"cannot check {self.protocol}://{container}", e) from None
        if not exists:
            what = "directory" if self.protocol in _DIRECTORY_PROTOCOLS else "bucket"
            raise ResolverError(f"the {what} {self.protocol}://{container} does not exist: this is a "
                                f"configuration error; check {URI_ENV}={self.uri!r}")

    def _error(self, what: str, e: Exception) -> ResolverError:
        if isinstance(e, PermissionError):
            return ResolverError(f"{what}: access denied ({e}); check the credentials "
                                 f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or {STORAGE_OPTIONS_ENV})")
        return ResolverError(f"{what}: the source is unreachable or failed ({type(e).__name__}: {e}); "
                             f"check that it is up and that the endpoint is right")


class RemoteResolver(LoRAResolver):
    """Resolves `lora_name` to `<uri>/<lora_name>/`, downloaded into the adapter cache."""

    def __init__(self, uri: str, *, cache: AdapterCache | None = None,
                 storage_options: dict | None = None) -> None:
        self.source = FsspecSource(uri, storage_options)
        self.cache = cache if cache is not None else AdapterCache.from_env()

    @classmethod
    def from_env(cls, env=os.environ) -> "RemoteResolver":
        return cls(env[URI_ENV], cache=AdapterCache.from_env(env), storage_options=_env_storage_options(env))

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        check_cache_name(lora_name)  # before any I/O
        return await self.cache.resolve(lora_name, self.source, base_model_name)


@hookimpl
def register_lora_resolvers(register):
    if os.environ.get(URI_ENV):
        register(PLUGIN_NAME, RemoteResolver.from_env())


def _default_options(protocol: str, env) -> dict:
    if protocol not in ("s3", "s3a"):
        return {}
    options: dict = {
        # Fail fast when the endpoint is down instead of botocore's long default retries.
        "config_kwargs": {"connect_timeout": 5, "read_timeout": 60,
                          "retries": {"max_attempts": 3, "mode": "standard"}},
    }
    # The installed botocore honours AWS_ENDPOINT_URL_S3 by itself; older ones (< 1.31)
    # don't, so it is passed explicitly.
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


def _env_storage_options(env) -> dict | None:
    raw = env.get(STORAGE_OPTIONS_ENV)
    if not raw:
        return None
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{STORAGE_OPTIONS_ENV} must be a JSON object of fsspec storage options, "
                          f"e.g. '{{\"anon\": true}}'; it does not parse: {e}") from None
    if not isinstance(options, dict):
        raise ConfigError(f"{STORAGE_OPTIONS_ENV} must be a JSON object, got {type(options).__name__}")
    return options


def _version_tag(info: dict) -> str | None:
    """What changes when the object is re-uploaded: ETag on object stores, else mtime."""
    for key in ("ETag", "etag", "md5Hash", "generation", "mtime", "created", "LastModified"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return None
