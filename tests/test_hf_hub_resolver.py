"""The Hugging Face Hub resolver against a real Hub-compatible server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from adapters import write_peft_adapter
from loraplex.errors import AdapterInvalidError, AdapterNameError, ConfigError, ResolverError
from loraplex.resolvers.cache import TMP_DIR, AdapterCache
from loraplex.resolvers.hf_hub import (PLUGIN_NAME, REPO_LIST_ENV, HfHubResolver, HubRepo, parse_repo_list,
                                       register_lora_resolvers)
from servers.hub_server import HubTestServer

SAFETENSORS = "adapter_model.safetensors"
RESOLVE_ONCE = str(Path(__file__).parent / "servers" / "resolve_once.py")


@pytest.fixture
def hub(tmp_path):
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:  # read at import: the in-process tests cannot reach the server
        pytest.fail("HF_HUB_OFFLINE is set in the test environment; unset it to run the Hub resolver tests")
    server = HubTestServer(tmp_path / "hub").start()
    yield server
    server.stop()


def make_resolver(hub, tmp_path, repos="org/repo", **kwargs) -> HfHubResolver:
    cache_kwargs = {k: kwargs.pop(k) for k in ("revalidate_s", "max_bytes") if k in kwargs}
    return HfHubResolver(repos, cache=AdapterCache(tmp_path / "cache", **cache_kwargs), endpoint=hub.endpoint,
                         hf_cache_dir=str(tmp_path / "hf-cache"), **kwargs)


def resolve(resolver, name, base="tiny-base"):
    return asyncio.run(resolver.resolve_lora(base, name))


def assert_same_files(resolved_dir, source_dir):
    names = {f.name for f in Path(source_dir).iterdir() if f.is_file()}
    assert names and names <= {f.name for f in Path(resolved_dir).iterdir()}
    for name in names:
        assert (Path(resolved_dir) / name).read_bytes() == (Path(source_dir) / name).read_bytes(), name


def test_root_and_subfolder_adapters(hub, tmp_path):
    root = write_peft_adapter(hub.repo_dir("org/repo"), seed=1)
    sub = write_peft_adapter(hub.repo_dir("org/repo") / "adapters" / "french", seed=2)
    resolver = make_resolver(hub, tmp_path, repos="org/other, org/repo")
    request = resolve(resolver, "org/repo/adapters/french")
    assert request.lora_name == "org/repo/adapters/french"
    assert Path(request.lora_path) == tmp_path / "cache" / "org" / "repo" / "adapters" / "french"
    assert_same_files(request.lora_path, sub)
    assert resolve(resolver, "org/repo/adapters/french").lora_path == request.lora_path
    assert hub.downloads("org/repo", f"adapters/french/{SAFETENSORS}") == 1
    # The files went through the HF cache (HF_HUB_CACHE keeps working).
    assert list((tmp_path / "hf-cache").rglob(f"french/{SAFETENSORS}"))
    # A root adapter whose cache dir already holds a nested adapter cannot be placed there.
    with pytest.raises(ResolverError, match="parent directory of other cached adapters"):
        resolve(resolver, "org/repo")
    assert_same_files(resolve(resolver, "org/repo/adapters/french").lora_path, sub)
    other_cache = make_resolver(hub, tmp_path / "second")
    assert_same_files(resolve(other_cache, "org/repo").lora_path, root)
    assert resolve(resolver, "org/repo/adapters") is None      # a folder without an adapter


@pytest.mark.parametrize("name", ["org/repo/../../etc", "/org/repo", "org\\repo", "org/repo/\x00",
                                  "org/repo/.loraplex-tmp"])
def test_hostile_names_rejected_before_any_request(hub, tmp_path, name):
    resolver = make_resolver(hub, tmp_path)
    with pytest.raises(AdapterNameError):
        resolve(resolver, name)
    assert hub.count() == 0


def test_names_outside_the_repo_list_cost_no_request(hub, tmp_path):
    write_peft_adapter(hub.repo_dir("org/secret"))
    resolver = make_resolver(hub, tmp_path)
    assert resolve(resolver, "org/secret") is None
    assert resolve(resolver, "org/repo-other/x") is None
    assert hub.count() == 0


def test_fifty_concurrent_first_requests_download_once(hub, tmp_path):
    source = write_peft_adapter(hub.repo_dir("org/repo") / "hot")
    resolver = make_resolver(hub, tmp_path)

    async def fifty():
        return await asyncio.gather(*(resolver.resolve_lora("tiny-base", "org/repo/hot") for _ in range(50)))

    results = asyncio.run(fifty())
    assert len({r.lora_path for r in results}) == 1 and len(results) == 50
    assert hub.downloads("org/repo", f"hot/{SAFETENSORS}") == 1
    assert_same_files(results[0].lora_path, source)


def test_new_adapter_found_without_restart(hub, tmp_path):
    write_peft_adapter(hub.repo_dir("org/repo") / "first")
    resolver = make_resolver(hub, tmp_path, relist_s=3600)
    assert resolve(resolver, "org/repo/first") is not None
    assert resolve(resolver, "org/repo/later") is None
    new = write_peft_adapter(hub.repo_dir("org/repo") / "later")
    hub.reset_log()
    assert resolve(resolver, "org/repo/later") is None   # the recent listing answers, no request
    assert hub.count() == 0
    resolver.source.relist_s = 0                          # the listing's TTL has passed
    assert_same_files(resolve(resolver, "org/repo/later").lora_path, new)


def test_reupload_picked_up_after_revalidation_interval(hub, tmp_path):
    write_peft_adapter(hub.repo_dir("org/repo") / "a", seed=1)
    resolver = make_resolver(hub, tmp_path, revalidate_s=0.5)
    old = Path(resolve(resolver, "org/repo/a").lora_path) / SAFETENSORS
    old_bytes = old.read_bytes()
    new = write_peft_adapter(hub.repo_dir("org/repo") / "a", seed=2)
    assert (Path(resolve(resolver, "org/repo/a").lora_path) / SAFETENSORS).read_bytes() == old_bytes
    time.sleep(0.6)
    assert_same_files(resolve(resolver, "org/repo/a").lora_path, new)
    assert hub.downloads("org/repo", f"a/{SAFETENSORS}") == 2
    # Another commit that leaves this adapter alone: checked, not downloaded again.
    write_peft_adapter(hub.repo_dir("org/repo") / "b")
    time.sleep(0.6)
    resolve(resolver, "org/repo/a")
    assert hub.downloads("org/repo", f"a/{SAFETENSORS}") == 2


def test_truncated_through_hard_link_is_repaired(hub, tmp_path):
    source = write_peft_adapter(hub.repo_dir("org/repo"))
    resolver = make_resolver(hub, tmp_path)
    path = Path(resolve(resolver, "org/repo").lora_path) / SAFETENSORS
    with open(path, "r+b") as f:  # in place: the HF cache's blob (same inode) is damaged too
        f.truncate(100)
    assert_same_files(resolve(resolver, "org/repo").lora_path, source)
    assert hub.downloads("org/repo", SAFETENSORS) == 2


def test_revision_pinning(hub, tmp_path):
    main = write_peft_adapter(hub.repo_dir("org/repo"), seed=1)
    v1 = write_peft_adapter(hub.repo_dir("org/repo", branch="v1"), seed=2)
    pinned = make_resolver(hub, tmp_path, repos="org/repo@v1")
    assert_same_files(resolve(pinned, "org/repo").lora_path, v1)
    default_v1 = make_resolver(hub, tmp_path / "b", revision="v1")
    assert_same_files(resolve(default_v1, "org/repo").lora_path, v1)
    assert_same_files(resolve(make_resolver(hub, tmp_path / "c"), "org/repo").lora_path, main)
    with pytest.raises(ResolverError, match="revision 'v2' of org/repo does not exist.*configuration"):
        resolve(make_resolver(hub, tmp_path / "d", repos="org/repo@v2"), "org/repo")


def test_missing_repo_is_a_configuration_error(hub, tmp_path):
    with pytest.raises(ResolverError, match="repo org/missing .*does not exist.*configuration error"):
        resolve(make_resolver(hub, tmp_path, repos="org/missing"), "org/missing/x")


def test_token_refused_and_accepted(tmp_path):
    server = HubTestServer(tmp_path / "hub", token="hf_right").start()
    try:
        source = write_peft_adapter(server.repo_dir("org/private"))
        wrong = make_resolver(server, tmp_path / "w", repos="org/private", token="hf_wrong")
        with pytest.raises(ResolverError, match="refused.*HF_TOKEN"):
            resolve(wrong, "org/private")
        right = make_resolver(server, tmp_path / "r", repos="org/private", token="hf_right")
        assert_same_files(resolve(right, "org/private").lora_path, source)
    finally:
        server.stop()


def test_hub_down(tmp_path):
    server = HubTestServer(tmp_path / "hub").start()
    write_peft_adapter(server.repo_dir("org/repo"))
    resolver = make_resolver(server, tmp_path, revalidate_s=0, relist_s=0)
    assert resolve(resolver, "org/repo") is not None
    server.stop()
    with pytest.raises(ResolverError, match="cannot reach org/repo@main"):
        resolve(resolver, "org/repo/other")
    assert resolve(resolver, "org/repo") is not None  # the cached copy, with a warning


def test_hub_killed_mid_download_leaves_nothing_usable(tmp_path):
    server = HubTestServer(tmp_path / "hub").start()
    source = write_peft_adapter(server.repo_dir("org/repo") / "fragile")
    stall = server.stall_download(f"fragile/{SAFETENSORS}",
                                  after_bytes=(source / SAFETENSORS).stat().st_size // 2)
    killer = threading.Thread(target=lambda: stall.started.wait(60) and server.kill())
    killer.start()
    try:
        with pytest.raises(ResolverError, match="cannot reach org/repo@main"):
            resolve(make_resolver(server, tmp_path), "org/repo/fragile")
    finally:
        killer.join(60)
        server.stop()
    assert stall.killed
    assert not (tmp_path / "cache" / "org" / "repo" / "fragile").exists()
    assert not list((tmp_path / "cache" / TMP_DIR).iterdir())
    # The Hub is back: the adapter arrives whole (huggingface_hub may resume its partial file).
    revived = HubTestServer(tmp_path / "hub").start()
    try:
        assert_same_files(resolve(make_resolver(revived, tmp_path), "org/repo/fragile").lora_path, source)
        assert revived.downloads("org/repo", f"fragile/{SAFETENSORS}") == 1
    finally:
        revived.stop()


def test_pickle_weights_refused(hub, tmp_path):
    local = write_peft_adapter(hub.repo_dir("org/repo") / "pickled")
    (local / SAFETENSORS).rename(local / "adapter_model.bin")
    with pytest.raises(AdapterInvalidError, match="pickle"):
        resolve(make_resolver(hub, tmp_path), "org/repo/pickled")
    assert not (tmp_path / "cache" / "org" / "repo" / "pickled").exists()


def test_repo_list_parsing():
    assert parse_repo_list(" org/a , org/b@v2,,", "dev") == [HubRepo("org/a", "dev"), HubRepo("org/b", "v2")]
    with pytest.raises(ConfigError, match="not folders"):
        parse_repo_list("org/a/sub")
    with pytest.raises(ConfigError, match="lists no repos"):
        parse_repo_list(" , ")
    with pytest.raises(ConfigError, match="is not a repo id"):
        parse_repo_list("../etc")


def test_plugin_registers_only_when_configured(tmp_path, monkeypatch):
    registered = []
    monkeypatch.delenv(REPO_LIST_ENV, raising=False)
    register_lora_resolvers(lambda name, resolver: registered.append(name))
    assert registered == []
    monkeypatch.setenv(REPO_LIST_ENV, "org/repo")
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(tmp_path))
    register_lora_resolvers(lambda name, resolver: registered.append(name))
    assert registered == [PLUGIN_NAME]
    monkeypatch.setenv("LORAPLEX_RESOLVER_HF_RELIST_S", "-1")
    with pytest.raises(ConfigError, match="LORAPLEX_RESOLVER_HF_RELIST_S='-1' must be a finite number"):
        register_lora_resolvers(lambda name, resolver: registered.append(name))


def hub_env(hub, tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "VLLM_", "LORAPLEX_"))}
    env.update({REPO_LIST_ENV: "org/repo", "HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(tmp_path / "hf"),
                "VLLM_LORA_RESOLVER_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    env.update(extra)
    return env


def test_offline_mode_is_a_clear_error(hub, tmp_path):
    write_peft_adapter(hub.repo_dir("org/repo"))
    out = subprocess.run([sys.executable, RESOLVE_ONCE, "hf", "org/repo", "tiny-base"],
                         env=hub_env(hub, tmp_path, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert "ResolverError" in out.stderr and "HF_HUB_OFFLINE is set" in out.stderr
    assert hub.count() == 0


def test_environment_configures_a_fresh_process(hub, tmp_path):
    """HF_ENDPOINT, HF_HUB_CACHE and the cache dir from the environment alone, in a new process."""
    source = write_peft_adapter(hub.repo_dir("org/repo") / "sub")
    env = hub_env(hub, tmp_path)
    out = subprocess.run([sys.executable, RESOLVE_ONCE, "hf", "org/repo/sub", "tiny-base"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["path"] == str(tmp_path / "cache" / "org" / "repo" / "sub")
    assert_same_files(result["path"], source)
    assert list((tmp_path / "hf").rglob(SAFETENSORS))
    assert hub.downloads("org/repo", f"sub/{SAFETENSORS}") == 1
    shutil.rmtree(tmp_path / "cache")


def test_only_the_config_and_weights_are_downloaded_from_the_hub(hub, tmp_path):
    local = write_peft_adapter(hub.repo_dir("org/repo") / "extra", seed=3)
    (local / "README.md").write_text("# notes\n")
    (local / "training_args.bin").write_bytes(b"\0" * 50_000)
    request = resolve(make_resolver(hub, tmp_path), "org/repo/extra")
    assert sorted(p.name for p in Path(request.lora_path).iterdir()) == [
        ".loraplex-manifest.json", "adapter_config.json", SAFETENSORS]
    assert hub.downloads("org/repo", "extra/training_args.bin") == 0
    assert hub.downloads("org/repo", "extra/README.md") == 0
