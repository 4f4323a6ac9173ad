"""The S3 resolver against `rclone serve s3`: a disk-backed server that checks credentials."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from adapters import write_peft_adapter
from loraplex.errors import ResolverError
from loraplex.resolvers.cache import AdapterCache
from loraplex.resolvers.remote import RemoteResolver
from servers.rclone_server import ACCESS_KEY, SECRET_KEY, RcloneS3Server


@pytest.fixture(scope="module")
def rclone(tmp_path_factory):
    server = RcloneS3Server(tmp_path_factory.mktemp("rclone")).start()
    yield server
    server.stop()


def make_resolver(server, cache_dir, key=ACCESS_KEY, secret=SECRET_KEY, bucket="adapters"):
    options = {"endpoint_url": server.endpoint_url, "key": key, "secret": secret}
    return RemoteResolver(f"s3://{bucket}/loras", cache=AdapterCache(cache_dir), storage_options=options)


def resolve(resolver, name):
    return asyncio.run(resolver.resolve_lora("tiny-base", name))


def test_right_credentials_resolve_from_disk(rclone, tmp_path):
    source = write_peft_adapter(rclone.root / "adapters" / "loras" / "on-disk")
    request = resolve(make_resolver(rclone, tmp_path / "cache"), "on-disk")
    for f in source.iterdir():
        assert (Path(request.lora_path) / f.name).read_bytes() == f.read_bytes()
    assert resolve(make_resolver(rclone, tmp_path / "cache"), "absent") is None


@pytest.mark.parametrize("key, secret", [(ACCESS_KEY, "wrong-secret"), ("unknown-key", SECRET_KEY)])
def test_refused_credentials_are_a_clear_error(rclone, tmp_path, key, secret):
    write_peft_adapter(rclone.root / "adapters" / "loras" / "guarded")
    with pytest.raises(ResolverError, match="access denied.*check the credentials"):
        resolve(make_resolver(rclone, tmp_path / "cache", key=key, secret=secret), "guarded")
    assert not (tmp_path / "cache" / "guarded").exists()


def test_missing_bucket(rclone, tmp_path):
    with pytest.raises(ResolverError, match="bucket s3://no-bucket does not exist"):
        resolve(make_resolver(rclone, tmp_path / "cache", bucket="no-bucket"), "x")
