"""Resolver semantics vLLM users rely on: "not mine" candidates and the reasons the chain
gives when nothing usable is found; the negative cache dropped as soon as the directory
an adapter would appear in changes; symbolic links in the filesystem resolver's directory."""

from __future__ import annotations

import asyncio
import json
import os

import httpx
import pytest

from adapters import write_peft_adapter
from loraplex.errors import AdapterInvalidError, AdapterMismatchError, ResolverError
from loraplex.lora_request import LoRARequest, lora_id_for_name
from loraplex.resolvers import LoRAResolver, ResolverChain, report_skipped
from loraplex.resolvers.filesystem import FilesystemResolver
from loraplex.server.app import build_app
from loraplex.server.backend import ServingBackend
from loraplex.server.state import ServerState
from server.fake_engine import FakeEngine
from server.harness import ServerThread

BASE = "tiny-base"


class Static(LoRAResolver):
    def __init__(self, paths=None, *, skip=None, mismatch=None, fail=None):
        self.paths, self.skip, self.mismatch, self.fail = paths or {}, skip, mismatch, fail
        self.calls = 0

    async def resolve_lora(self, base_model_name, lora_name):
        self.calls += 1
        if self.fail:
            raise ConnectionError(self.fail)
        if self.mismatch:
            raise AdapterMismatchError(self.mismatch)
        if self.skip:
            await asyncio.to_thread(report_skipped, self.skip)   # from a worker thread, as resolvers do
            return None
        path = self.paths.get(lora_name)
        return LoRARequest(lora_name, lora_id_for_name(lora_name), path) if path else None


def resolve(chain, name):
    return asyncio.run(chain.resolve(BASE, name))


def write_ptuning(path):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "P_TUNING", "base_model_name_or_path": BASE}))


# ---- "not mine" --------------------------------------------------------------------

def test_a_later_resolver_serves_what_an_earlier_one_skipped(tmp_path):
    write_ptuning(tmp_path / "loras" / "sql-lora")
    chain = ResolverChain([("fs", FilesystemResolver(tmp_path / "loras")), ("store", Static({"sql-lora": "/s"}))])
    outcomes = []
    chain.add_listener(lambda name, outcome, seconds: outcomes.append((name, outcome)))
    assert resolve(chain, "sql-lora").lora_path == "/s"
    assert outcomes == [("fs", "skipped"), ("store", "found")]


def test_nothing_usable_is_a_400_naming_every_skipped_candidate(tmp_path):
    write_ptuning(tmp_path / "loras" / "sql-lora")
    other = write_peft_adapter(tmp_path / "other" / "sql-lora", base_model_name_or_path="meta-llama/Llama-3-70B")
    chain = ResolverChain([("fs", FilesystemResolver(tmp_path / "loras")),
                           ("fs2", FilesystemResolver(other.parent)),
                           ("third_party", Static(mismatch="adapter 'sql-lora' is a DoRA adapter")),
                           ("vllm_style", Static(skip="adapter 'sql-lora' has the wrong rank")),
                           ("empty", Static())], negative_ttl_s=3600)
    with pytest.raises(AdapterInvalidError) as info:
        resolve(chain, "sql-lora")
    message = str(info.value)
    assert message.startswith("no resolver found a usable LoRA adapter named 'sql-lora'")
    for expected in ("fs: adapter ", "peft_type 'P_TUNING'", "fs2: adapter 'sql-lora' was trained on "
                     "'meta-llama/Llama-3-70B'", "third_party: adapter 'sql-lora' is a DoRA adapter",
                     "vllm_style: adapter 'sql-lora' has the wrong rank"):
        assert expected in message, expected
    assert chain.num_negative_cached == 0   # a skip is not remembered: fixing the adapter takes effect at once


def test_skips_are_listed_beside_failures(tmp_path):
    chain = ResolverChain([("picky", Static(skip="not a LoRA")), ("down", Static(fail="connection refused"))])
    with pytest.raises(ResolverError, match="down: ConnectionError: connection refused; picky: not a LoRA"):
        resolve(chain, "x")


def test_report_skipped_outside_a_chain_does_nothing():
    assert asyncio.run(Static(skip="whatever").resolve_lora(BASE, "x")) is None


def test_server_answers_400_with_the_reasons(tmp_path):
    write_ptuning(tmp_path / "loras" / "prompt-tuned")
    chain = ResolverChain([("lora_filesystem_resolver", FilesystemResolver(tmp_path / "loras"))])
    backend = ServingBackend(FakeEngine(), served_model_names=[BASE], model_path=BASE, resolver_chain=chain,
                             allow_runtime_lora_updating=True)
    with ServerThread(lambda: build_app(ServerState(backend))) as server:
        r = httpx.post(server.base_url + "/v1/completions", json={"model": "prompt-tuned", "prompt": "hi"})
        missing = httpx.post(server.base_url + "/v1/completions", json={"model": "nothing-here", "prompt": "hi"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "model" and "lora_filesystem_resolver: " in error["message"]
    assert "peft_type 'P_TUNING'" in error["message"]
    assert missing.status_code == 404


# ---- the negative cache and directories that change ------------------------------------------

def hits(chain):
    counted = []
    chain.add_listener(lambda name, outcome, seconds: counted.append(outcome) if outcome == "hit" else None)
    return counted


def test_cache_directory_created_after_start(tmp_path):
    root = tmp_path / "not-yet"
    chain = ResolverChain([("fs", FilesystemResolver(root))], negative_ttl_s=3600)
    counted = hits(chain)
    assert resolve(chain, "sql-lora") is None and resolve(chain, "sql-lora") is None
    assert counted == ["hit"]   # nothing changed: answered from the negative cache
    write_peft_adapter(root / "sql-lora")
    assert resolve(chain, "sql-lora").lora_path == str(root / "sql-lora")   # no 3600 s wait


@pytest.mark.parametrize("name", ["sql-lora", "acme/sql-lora", "acme/team/sql-lora"])
def test_adapter_added_later_is_found_at_once(tmp_path, name):
    root = tmp_path / "loras"
    (root / "acme").mkdir(parents=True)
    chain = ResolverChain([("fs", FilesystemResolver(root))], negative_ttl_s=3600)
    counted = hits(chain)
    assert resolve(chain, name) is None
    write_peft_adapter(tmp_path / "unrelated")   # outside the directory: the miss stays cached
    assert resolve(chain, name) is None and counted == ["hit"]
    write_peft_adapter(root / name)
    assert resolve(chain, name).lora_path == str(root / name)


def test_directory_filled_after_a_miss(tmp_path):
    """An adapter directory that appears empty, then gets its files (a copy in progress)."""
    root = tmp_path / "loras"
    (root / "sql-lora").mkdir(parents=True)
    chain = ResolverChain([("fs", FilesystemResolver(root))], negative_ttl_s=3600)
    with pytest.raises(AdapterInvalidError, match="without adapter_config.json"):
        resolve(chain, "sql-lora")
    write_peft_adapter(root / "sql-lora")
    assert resolve(chain, "sql-lora") is not None


def test_remote_style_resolver_keeps_its_ttl():
    """A resolver without change_token: a miss is kept for the TTL, as before."""
    store = Static()
    now = [0.0]
    chain = ResolverChain([("store", store)], negative_ttl_s=30, clock=lambda: now[0])
    assert resolve(chain, "x") is None and resolve(chain, "x") is None
    assert store.calls == 1
    now[0] = 31.0
    assert resolve(chain, "x") is None and store.calls == 2


def test_failing_change_token_never_trusts_a_miss(tmp_path, caplog):
    class Broken(FilesystemResolver):
        def change_token(self, lora_name):
            raise OSError("stat failed")
    chain = ResolverChain([("fs", Broken(tmp_path))], negative_ttl_s=3600)
    assert resolve(chain, "x") is None and resolve(chain, "x") is None
    assert chain.num_negative_cached == 1 and "change_token of LoRA resolver" in caplog.text
    write_peft_adapter(tmp_path / "x")
    assert resolve(chain, "x") is not None


# ---- symbolic links in the filesystem resolver's directory ------------------------------------

def test_symlinks_are_followed_and_the_path_stays_inside(tmp_path):
    root = tmp_path / "loras"
    root.mkdir()
    outside = write_peft_adapter(tmp_path / "elsewhere" / "v3")
    os.symlink(outside, root / "prod")
    os.symlink(tmp_path / "elsewhere", root / "team")        # a linked organisation directory
    os.symlink(tmp_path / "gone", root / "dangling")
    resolver = FilesystemResolver(root)
    request = asyncio.run(resolver.resolve_lora(BASE, "prod"))
    assert request.lora_path == str(root / "prod") and os.path.realpath(request.lora_path) == str(outside)
    assert asyncio.run(resolver.resolve_lora(BASE, "team/v3")).lora_path == str(root / "team" / "v3")
    assert asyncio.run(resolver.resolve_lora(BASE, "dangling")) is None
