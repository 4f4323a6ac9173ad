"""The fsspec/S3 resolver against a real moto S3 server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from adapters import write_peft_adapter
from loraplex.errors import AdapterInvalidError, AdapterNameError, ConfigError, ResolverError
from loraplex.lora_request import lora_id_for_name
from loraplex.resolvers.cache import MANIFEST_FILE, TMP_DIR, AdapterCache
from loraplex.resolvers.remote import PLUGIN_NAME, URI_ENV, RemoteResolver, register_lora_resolvers
from servers.fixtures import bucket, cache_dir, s3_server  # noqa: F401 (fixtures)
from servers.s3_server import ACCESS_KEY, SECRET_KEY, S3TestServer, upload_dir

SAFETENSORS = "adapter_model.safetensors"
RESOLVE_ONCE = str(Path(__file__).parent / "servers" / "resolve_once.py")


def make_resolver(server, bucket, cache_dir, **cache_kwargs) -> RemoteResolver:
    options = {"endpoint_url": server.endpoint_url, "key": ACCESS_KEY, "secret": SECRET_KEY}
    return RemoteResolver(f"s3://{bucket}/loras", cache=AdapterCache(cache_dir, **cache_kwargs),
                          storage_options=options)


def upload_adapter(server, bucket, tmp_path, name, seed=0, **kwargs) -> Path:
    local = write_peft_adapter(tmp_path / "src" / name / str(seed), seed=seed, **kwargs)
    upload_dir(server.client(), bucket, f"loras/{name}", local)
    return local


def resolve(resolver, name, base="tiny-base"):
    return asyncio.run(resolver.resolve_lora(base, name))


def assert_same_files(resolved_dir, source_dir):
    for f in Path(source_dir).iterdir():
        assert (Path(resolved_dir) / f.name).read_bytes() == f.read_bytes(), f.name


def test_resolves_downloads_once_and_reuses(s3_server, bucket, cache_dir, tmp_path):
    source = upload_adapter(s3_server, bucket, tmp_path, "alpha")
    resolver = make_resolver(s3_server, bucket, cache_dir)
    first = resolve(resolver, "alpha")
    assert first.lora_name == "alpha" and first.lora_int_id == lora_id_for_name("alpha")
    assert first.base_model_name == "tiny-base"
    assert Path(first.lora_path) == cache_dir / "alpha"
    assert_same_files(first.lora_path, source)
    second = resolve(resolver, "alpha")
    assert second.lora_path == first.lora_path
    assert s3_server.downloads(bucket, f"loras/alpha/{SAFETENSORS}") == 1
    assert not list((cache_dir / TMP_DIR).iterdir())


def test_missing_adapter_is_none(s3_server, bucket, cache_dir):
    assert resolve(make_resolver(s3_server, bucket, cache_dir), "not-there") is None
    assert not (cache_dir / "not-there").exists()


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "a/../../b", "a\\b", "nul\x00x", "~root",
                                  ".loraplex-tmp", "x" * 300, ""])
def test_hostile_names_rejected_before_any_request(s3_server, bucket, cache_dir, name):
    resolver = make_resolver(s3_server, bucket, cache_dir)
    s3_server.reset_log()
    with pytest.raises(AdapterNameError):
        resolve(resolver, name)
    assert s3_server.count(bucket) == 0


def test_fifty_concurrent_first_requests_download_once(s3_server, bucket, cache_dir, tmp_path):
    source = upload_adapter(s3_server, bucket, tmp_path, "popular")
    resolver = make_resolver(s3_server, bucket, cache_dir)

    async def fifty():
        return await asyncio.gather(*(resolver.resolve_lora("tiny-base", "popular") for _ in range(50)))

    results = asyncio.run(fifty())
    assert len(results) == 50 and all(r is not None and r.lora_path == results[0].lora_path for r in results)
    assert s3_server.downloads(bucket, f"loras/popular/{SAFETENSORS}") == 1
    assert s3_server.downloads(bucket, "loras/popular/adapter_config.json") == 1
    assert_same_files(results[0].lora_path, source)


@pytest.mark.parametrize("damage, message", [
    ("truncated", "truncated"),
    ("bad_json", "not valid JSON"),
    ("not_lora", "peft_type"),
    ("pickle_only", "pickle"),
    ("no_config", "adapter_config.json"),
])
def test_corrupt_adapters_rejected_and_never_cached(s3_server, bucket, cache_dir, tmp_path, damage, message):
    local = write_peft_adapter(tmp_path / "bad")
    weights = local / SAFETENSORS
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "bad_json":
        (local / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    elif damage == "not_lora":
        config = json.loads((local / "adapter_config.json").read_text())
        (local / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}))
    elif damage == "pickle_only":
        weights.rename(local / "adapter_model.bin")
    elif damage == "no_config":
        (local / "adapter_config.json").unlink()
    upload_dir(s3_server.client(), bucket, "loras/bad", local)
    with pytest.raises(AdapterInvalidError, match=message):
        resolve(make_resolver(s3_server, bucket, cache_dir), "bad")
    assert not (cache_dir / "bad").exists()
    assert not list((cache_dir / TMP_DIR).iterdir())


def test_incompatible_base_model_refused_but_download_kept(s3_server, bucket, cache_dir, tmp_path):
    upload_adapter(s3_server, bucket, tmp_path, "for-llama", base_model_name_or_path="meta-llama/Llama-3-8B")
    resolver = make_resolver(s3_server, bucket, cache_dir)
    with pytest.raises(AdapterInvalidError, match="Llama-3-8B"):
        resolve(resolver, "for-llama", base="mistralai/Mistral-7B")
    assert resolve(resolver, "for-llama", base="/models/Llama-3-8B") is not None
    assert s3_server.downloads(bucket, f"loras/for-llama/{SAFETENSORS}") == 1


def test_missing_bucket_is_a_configuration_error(s3_server, cache_dir):
    resolver = make_resolver(s3_server, "no-such-bucket-here", cache_dir)
    with pytest.raises(ResolverError, match="bucket s3://no-such-bucket-here does not exist.*configuration"):
        resolve(resolver, "alpha")


def test_source_down(cache_dir, tmp_path, caplog):
    server = S3TestServer().start()
    server.client().create_bucket(Bucket="downbucket")
    source = upload_adapter(server, "downbucket", tmp_path, "alpha")
    resolver = make_resolver(server, "downbucket", cache_dir, revalidate_s=0)
    assert resolve(resolver, "alpha") is not None
    server.stop()
    with pytest.raises(ResolverError, match="unreachable"):
        resolve(resolver, "beta")
    # A cached adapter keeps being served, with a warning, while its source is down.
    with caplog.at_level(logging.WARNING, logger="loraplex.resolvers.cache"):
        request = resolve(resolver, "alpha")
    assert_same_files(request.lora_path, source)
    assert "cannot check 'alpha'" in caplog.text


def test_reupload_picked_up_after_revalidation_interval(s3_server, bucket, cache_dir, tmp_path):
    key = f"loras/alpha/{SAFETENSORS}"
    upload_adapter(s3_server, bucket, tmp_path, "alpha", seed=1)
    resolver = make_resolver(s3_server, bucket, cache_dir, revalidate_s=3600)
    resolve(resolver, "alpha")
    new_source = upload_adapter(s3_server, bucket, tmp_path, "alpha", seed=2)
    s3_server.reset_log()
    # Within the interval the cached copy is served without asking the source.
    stale = resolve(resolver, "alpha")
    assert s3_server.count(bucket) == 0
    assert (Path(stale.lora_path) / SAFETENSORS).read_bytes() != (new_source / SAFETENSORS).read_bytes()
    resolver.cache.revalidate_s = 0  # the interval has passed
    fresh = resolve(resolver, "alpha")
    assert_same_files(fresh.lora_path, new_source)
    assert s3_server.downloads(bucket, key) == 1
    # Unchanged at the source: a listing, no download.
    resolve(resolver, "alpha")
    assert s3_server.downloads(bucket, key) == 1


def test_adapter_deleted_at_source_is_dropped(s3_server, bucket, cache_dir, tmp_path):
    upload_adapter(s3_server, bucket, tmp_path, "gone")
    resolver = make_resolver(s3_server, bucket, cache_dir, revalidate_s=0)
    assert resolve(resolver, "gone") is not None
    client = s3_server.client()
    for obj in client.list_objects_v2(Bucket=bucket, Prefix="loras/gone/")["Contents"]:
        client.delete_object(Bucket=bucket, Key=obj["Key"])
    assert resolve(resolver, "gone") is None
    assert not (cache_dir / "gone").exists()


def test_file_truncated_on_disk_is_downloaded_again(s3_server, bucket, cache_dir, tmp_path):
    source = upload_adapter(s3_server, bucket, tmp_path, "alpha")
    resolver = make_resolver(s3_server, bucket, cache_dir)
    path = Path(resolve(resolver, "alpha").lora_path) / SAFETENSORS
    path.write_bytes(path.read_bytes()[:1000])
    assert_same_files(resolve(resolver, "alpha").lora_path, source)
    assert s3_server.downloads(bucket, f"loras/alpha/{SAFETENSORS}") == 2


def test_hand_placed_directory_is_never_overwritten(s3_server, bucket, cache_dir, tmp_path):
    upload_adapter(s3_server, bucket, tmp_path, "mine", seed=1)
    hand_placed = write_peft_adapter(cache_dir / "mine", seed=7)
    before = (hand_placed / SAFETENSORS).read_bytes()
    with pytest.raises(ResolverError, match="not downloaded by loraplex"):
        resolve(make_resolver(s3_server, bucket, cache_dir), "mine")
    assert (hand_placed / SAFETENSORS).read_bytes() == before


def test_nested_names_and_other_fsspec_urls(tmp_path):
    # The same code serves file:// (and memory://, gs://, ...): only the URL differs.
    root = tmp_path / "store"
    source = write_peft_adapter(root / "team" / "adapter-1")
    resolver = RemoteResolver(f"file://{root}", cache=AdapterCache(tmp_path / "cache"))
    request = resolve(resolver, "team/adapter-1")
    assert Path(request.lora_path) == tmp_path / "cache" / "team" / "adapter-1"
    assert_same_files(request.lora_path, source)
    assert resolve(resolver, "team/none") is None
    missing = RemoteResolver(f"file://{tmp_path}/nowhere", cache=AdapterCache(tmp_path / "cache"))
    with pytest.raises(ResolverError, match="directory .* does not exist"):
        resolve(missing, "x")


def test_memory_url(tmp_path):
    import fsspec
    fs = fsspec.filesystem("memory")
    local = write_peft_adapter(tmp_path / "a")
    for f in local.iterdir():
        fs.pipe(f"/loraplex-test/a/{f.name}", f.read_bytes())
    request = resolve(RemoteResolver("memory://loraplex-test", cache=AdapterCache(tmp_path / "cache")), "a")
    assert_same_files(request.lora_path, local)


def test_bad_configuration_says_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="must be a URL"):
        RemoteResolver("just-a-bucket", cache=AdapterCache(tmp_path))
    with pytest.raises(ConfigError, match="no protocol 'nosuchproto'"):
        RemoteResolver("nosuchproto://x", cache=AdapterCache(tmp_path))
    monkeypatch.setenv(URI_ENV, "s3://b/p")
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LORAPLEX_RESOLVER_STORAGE_OPTIONS", "{not json")
    with pytest.raises(ConfigError, match="LORAPLEX_RESOLVER_STORAGE_OPTIONS must be a JSON object"):
        RemoteResolver.from_env()
    monkeypatch.setenv("LORAPLEX_RESOLVER_STORAGE_OPTIONS", "{}")
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_MAX_BYTES", "lots")
    with pytest.raises(ConfigError, match="VLLM_LORA_RESOLVER_CACHE_MAX_BYTES must be a positive integer"):
        RemoteResolver.from_env()


def test_plugin_registers_only_when_configured(tmp_path, monkeypatch):
    registered = []
    monkeypatch.delenv(URI_ENV, raising=False)
    register_lora_resolvers(lambda name, resolver: registered.append((name, resolver)))
    assert registered == []
    monkeypatch.setenv(URI_ENV, "memory://plugin-test")
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(tmp_path))
    register_lora_resolvers(lambda name, resolver: registered.append((name, resolver)))
    [(name, resolver)] = registered
    assert name == PLUGIN_NAME and isinstance(resolver, RemoteResolver)
    assert resolver.cache.root == tmp_path


def subprocess_env(server, bucket, cache_dir) -> dict:
    # Only the standard AWS variables: this also checks AWS_ENDPOINT_URL_S3 is honoured.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VLLM_", "LORAPLEX_"))}
    env.update(server.env())
    env.update({URI_ENV: f"s3://{bucket}/loras", "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache_dir),
                "PYTHONPATH": str(Path(__file__).parent)})
    return env


def test_two_processes_share_one_cache_and_download_once(s3_server, bucket, cache_dir, tmp_path):
    source = upload_adapter(s3_server, bucket, tmp_path, "shared")
    key = f"loras/shared/{SAFETENSORS}"
    # The first download stalls half-way until both processes are running, so the
    # second one really finds the download in progress.
    stall = s3_server.stall_get(bucket, key, after_bytes=(source / SAFETENSORS).stat().st_size // 2)
    env = subprocess_env(s3_server, bucket, cache_dir)
    procs = [subprocess.Popen([sys.executable, RESOLVE_ONCE, "s3", "shared", "tiny-base"], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    assert stall.started.wait(60)
    for p in procs:
        assert p.stdout.readline().strip() == "started"
    stall.release.set()
    outputs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outputs[0] == outputs[1] == {"name": "shared", "path": str(cache_dir / "shared")}
    assert s3_server.downloads(bucket, key) == 1
    assert_same_files(cache_dir / "shared", source)


def test_process_killed_mid_download_leaves_nothing_usable(s3_server, bucket, cache_dir, tmp_path):
    source = upload_adapter(s3_server, bucket, tmp_path, "fragile")
    stall = s3_server.stall_get(bucket, f"loras/fragile/{SAFETENSORS}",
                                after_bytes=(source / SAFETENSORS).stat().st_size // 2)
    proc = subprocess.Popen([sys.executable, RESOLVE_ONCE, "s3", "fragile", "tiny-base"],
                            env=subprocess_env(s3_server, bucket, cache_dir), stdout=subprocess.PIPE)
    try:
        assert stall.started.wait(60)
    finally:
        proc.kill()
        proc.wait()
    s3_server.clear_stall()
    assert not (cache_dir / "fragile").exists()
    assert list((cache_dir / TMP_DIR).iterdir())  # the half-written download, invisible
    request = resolve(make_resolver(s3_server, bucket, cache_dir), "fragile")
    assert_same_files(request.lora_path, source)
    assert (Path(request.lora_path) / MANIFEST_FILE).is_file()
    assert not list((cache_dir / TMP_DIR).iterdir())


def test_source_killed_mid_download_leaves_nothing_usable(cache_dir, tmp_path):
    server = S3TestServer().start()
    server.client().create_bucket(Bucket="dying")
    source = upload_adapter(server, "dying", tmp_path, "alpha")
    stall = server.stall_get("dying", f"loras/alpha/{SAFETENSORS}",
                             after_bytes=(source / SAFETENSORS).stat().st_size // 2)
    killer = threading.Thread(target=lambda: stall.started.wait(60) and server.kill())
    killer.start()
    try:
        with pytest.raises(ResolverError, match="unreachable"):
            resolve(make_resolver(server, "dying", cache_dir), "alpha")
    finally:
        killer.join(60)
        server.stop()
    assert stall.killed
    assert not (cache_dir / "alpha").exists()
    assert not list((cache_dir / TMP_DIR).iterdir())
    # The source is back (moto's objects outlive the server): the whole adapter is downloaded.
    revived = S3TestServer().start()
    try:
        assert_same_files(resolve(make_resolver(revived, "dying", cache_dir), "alpha").lora_path, source)
        assert revived.downloads("dying", f"loras/alpha/{SAFETENSORS}") == 1
    finally:
        revived.stop()


def test_through_the_resolver_chain(s3_server, bucket, cache_dir, tmp_path):
    from loraplex.resolvers import ResolverChain
    source = upload_adapter(s3_server, bucket, tmp_path, "chained")
    chain = ResolverChain([(PLUGIN_NAME, make_resolver(s3_server, bucket, cache_dir))], negative_ttl_s=30)

    async def run():
        found = await asyncio.gather(*(chain.resolve("tiny-base", "chained") for _ in range(50)))
        misses = [await chain.resolve("tiny-base", "unknown") for _ in range(3)]
        return found, misses

    found, misses = asyncio.run(run())
    assert {r.lora_path for r in found} == {str(cache_dir / "chained")}
    assert_same_files(found[0].lora_path, source)
    assert s3_server.downloads(bucket, f"loras/chained/{SAFETENSORS}") == 1
    assert misses == [None, None, None]
    # Only the first miss reached the bucket; the negative cache answered the rest.
    listings = [r for r in s3_server.requests if r.path == f"/{bucket}" and "unknown" in r.query]
    assert len(listings) == 1
