"""LoRAResolution, the one name -> loaded adapter path: single flight for successes and failures,
invalid adapters remembered briefly, and the download cache's hold kept until the load."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from adapters import write_peft_adapter
from loraplex.core.lora.resolution import LoRAResolution
from loraplex.errors import AdapterInvalidError, AdapterNotFoundError
from loraplex.lora_request import LoRARequest, lora_id_for_name
from loraplex.resolvers.cache import AdapterCache
from loraplex.resolvers.chain import ResolverChain
from loraplex.resolvers.holds import is_held_here
from loraplex.resolvers.remote import RemoteResolver
from loraplex.resolvers.validation import validate_adapter_dir


class DictResolver:
    """A resolver over a dict of name -> directory, counting its calls."""

    def __init__(self, known: dict[str, Path]) -> None:
        self.known = known
        self.calls: list[str] = []

    async def resolve_lora(self, base_model_name, lora_name):
        self.calls.append(lora_name)
        await asyncio.sleep(0.02)   # long enough for concurrent callers to pile up
        path = self.known.get(lora_name)
        return None if path is None else LoRARequest(lora_name, lora_id_for_name(lora_name), str(path))


class Loader:
    """What the engine's add_lora does, for these tests: validate, count, and remember."""

    def __init__(self, max_rank: int = 16) -> None:
        self.max_rank = max_rank
        self.loads: list[LoRARequest] = []

    async def __call__(self, request: LoRARequest) -> bool:
        self.loads.append(request)
        await asyncio.sleep(0.02)
        files = validate_adapter_dir(request.lora_path)
        if files.config["r"] > self.max_rank:
            raise AdapterInvalidError(f"adapter {request.lora_name!r} has rank {files.config['r']}, "
                                      f"above max_lora_rank={self.max_rank}")
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(tmp_path, known: dict[str, Path], **kwargs):
    resolver = DictResolver(known)
    chain = ResolverChain([("dict", resolver)], negative_ttl_s=0)
    loader = Loader()
    loaded = []
    resolution = LoRAResolution(load=loader, base_model_name="tiny-base", chain_factory=lambda: chain,
                                on_loaded=lambda name, request: loaded.append(name), **kwargs)
    return resolution, resolver, loader, loaded


async def gather_outcomes(resolution, name: str, n: int) -> list:
    return await asyncio.gather(*(resolution.resolve(name) for _ in range(n)), return_exceptions=True)


def test_concurrent_misses_share_one_resolve_and_one_load(tmp_path):
    good = write_peft_adapter(tmp_path / "good")
    resolution, resolver, loader, loaded = make(tmp_path, {"good": good})
    results = asyncio.run(gather_outcomes(resolution, "good", 50))
    assert {r.lora_path for r in results} == {str(good)} and len({id(r) for r in results}) == 1
    assert resolver.calls == ["good"] and len(loader.loads) == 1 and loaded == ["good"]


def test_an_invalid_adapter_fails_every_waiter_once_and_is_remembered(tmp_path):
    big = write_peft_adapter(tmp_path / "big", rank=64)
    clock = Clock()
    resolution, resolver, loader, loaded = make(tmp_path, {"big": big}, invalid_ttl_s=10, clock=clock)
    outcomes = []
    resolution.listeners.append(lambda name, outcome, seconds: outcomes.append(outcome))

    async def run():
        first = await gather_outcomes(resolution, "big", 50)
        clock.now = 9.0
        again = await gather_outcomes(resolution, "big", 5)
        clock.now = 10.5
        later = await gather_outcomes(resolution, "big", 1)
        return first, again, later

    first, again, later = asyncio.run(run())
    assert all(isinstance(e, AdapterInvalidError) and "rank 64" in str(e) for e in first + again + later)
    assert len({id(e) for e in first}) == 1                       # one failure, shared
    assert "kept for 10 s" in str(again[0])
    assert resolver.calls == ["big", "big"] and len(loader.loads) == 2   # once, then after the TTL
    assert outcomes == ["invalid", "invalid"] and loaded == []


def test_unknown_names_and_engine_errors(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    resolution, resolver, loader, _ = make(tmp_path, {"broken": broken}, invalid_ttl_s=0)

    async def run():
        with pytest.raises(AdapterNotFoundError, match="no LoRA adapter named 'nope'.*resolvers: dict"):
            await resolution.resolve("nope")
        with pytest.raises(AdapterInvalidError, match="has no adapter_config.json"):
            await resolution.resolve("broken")
        with pytest.raises(AdapterInvalidError, match="has no adapter_config.json"):
            await resolution.resolve("broken")                   # TTL 0: asked again
        assert resolver.calls == ["nope", "broken", "broken"]

        def crashing(request):
            raise OSError("disk on fire")
        resolution._load = crashing
        with pytest.raises(AdapterInvalidError, match="could not be loaded: disk on fire"):
            await resolution.load(LoRARequest("x", 1, str(tmp_path)))
        assert resolution.num_in_flight == 0
    asyncio.run(run())


def test_the_download_stays_held_until_the_engine_has_loaded_it(tmp_path):
    write_peft_adapter(tmp_path / "store" / "remote")
    cache = AdapterCache(tmp_path / "cache")
    chain = ResolverChain([("s3", RemoteResolver(f"file://{tmp_path / 'store'}", cache=cache))])
    held_during_load = []

    def load(request):
        held_during_load.append(is_held_here(request.lora_path))

    resolution = LoRAResolution(load=load, base_model_name="tiny-base", chain_factory=lambda: chain)
    request = asyncio.run(resolution.resolve("remote"))
    assert held_during_load == [True]
    assert not is_held_here(request.lora_path)    # released: the engine holds it from here on
