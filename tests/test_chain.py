"""ResolverChain: order, single flight, timeouts, error aggregation, negative cache, bounds."""

from __future__ import annotations

import asyncio
import logging

import pytest

from loraplex.errors import AdapterInvalidError, AdapterNameError, ConfigError, ResolverError
from loraplex.lora_request import LoRARequest, lora_id_for_name
from loraplex.resolvers import LoRAResolver, LoRAResolverRegistry, ResolverChain
from plugin_helpers import add_pluggy_plugin, fake_site, isolated_plugins  # noqa: F401
from test_names import HOSTILE_NAMES

BASE = "tiny-base"


class CountingResolver(LoRAResolver):
    """Knows the adapters in `known`; `behaviour` makes it fail, stall or misbehave."""

    def __init__(self, known=(), behaviour=None, delay=0.0):
        self.known = set(known)
        self.behaviour = behaviour
        self.delay = delay
        self.calls: list[str] = []

    async def resolve_lora(self, base_model_name, lora_name):
        self.calls.append(lora_name)
        if self.delay:
            await asyncio.sleep(self.delay)
        if isinstance(self.behaviour, BaseException):
            raise self.behaviour
        if self.behaviour == "wrong_type":
            return {"path": "/x"}
        if self.behaviour == "wrong_name":
            return LoRARequest("other", lora_id_for_name("other"), "/x")
        if lora_name in self.known:
            return LoRARequest(lora_name, lora_id_for_name(lora_name), f"/adapters/{lora_name}", base_model_name)
        return None


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make_chain(*resolvers, **kwargs):
    kwargs.setdefault("timeout_s", 5.0)
    kwargs.setdefault("negative_ttl_s", 30.0)
    return ResolverChain([(f"r{i}", r) for i, r in enumerate(resolvers)], **kwargs)


def run(coro):
    return asyncio.run(coro)


def test_first_found_wins_and_later_resolvers_are_not_asked():
    first, second, third = CountingResolver(), CountingResolver(known={"a"}), CountingResolver(known={"a"})
    events = []
    chain = make_chain(first, second, third)
    chain.add_listener(lambda *e: events.append(e[:2]))
    result = run(chain.resolve(BASE, "a"))
    assert result.lora_path == "/adapters/a" and result.lora_int_id == lora_id_for_name("a")
    assert (first.calls, second.calls, third.calls) == (["a"], ["a"], [])
    assert events == [("r0", "not_found"), ("r1", "found")]


def test_single_flight_50_concurrent_calls_run_each_resolver_once():
    miss, hit = CountingResolver(delay=0.05), CountingResolver(known={"a"}, delay=0.05)
    chain = make_chain(miss, hit)

    async def main():
        return await asyncio.gather(*(chain.resolve(BASE, "a") for _ in range(50)))

    results = run(main())
    assert len(miss.calls) == 1 and len(hit.calls) == 1
    assert all(r is results[0] for r in results)
    assert chain.num_in_flight == 0


def test_single_flight_shares_the_same_exception():
    failing = CountingResolver(behaviour=RuntimeError("S3 is down"), delay=0.05)
    chain = make_chain(failing)

    async def main():
        return await asyncio.gather(*(chain.resolve(BASE, "a") for _ in range(50)), return_exceptions=True)

    errors = run(main())
    assert len(failing.calls) == 1
    assert isinstance(errors[0], ResolverError) and all(e is errors[0] for e in errors)


def test_distinct_names_and_base_models_are_not_merged():
    resolver = CountingResolver(known={"a", "b"}, delay=0.01)
    chain = make_chain(resolver)

    async def main():
        return await asyncio.gather(chain.resolve(BASE, "a"), chain.resolve(BASE, "b"),
                                    chain.resolve("other-base", "a"))

    results = run(main())
    assert [r.lora_name for r in results] == ["a", "b", "a"]
    assert sorted(resolver.calls) == ["a", "a", "b"]


def test_cancelled_caller_does_not_cancel_the_others():
    slow = CountingResolver(known={"a"}, delay=0.1)
    chain = make_chain(slow)

    async def main():
        impatient = asyncio.ensure_future(chain.resolve(BASE, "a"))
        patient = asyncio.ensure_future(chain.resolve(BASE, "a"))
        await asyncio.sleep(0.02)
        impatient.cancel()
        return await patient

    assert run(main()).lora_name == "a"
    assert len(slow.calls) == 1


def test_timeout_moves_on_to_the_next_resolver():
    stuck, good = CountingResolver(known={"a"}, delay=30), CountingResolver(known={"a"})
    events = []
    chain = make_chain(stuck, good, timeout_s=0.05)
    chain.add_listener(lambda name, outcome, s: events.append((name, outcome, s)))
    assert run(chain.resolve(BASE, "a")).lora_name == "a"
    assert [e[:2] for e in events] == [("r0", "timeout"), ("r1", "found")]
    assert 0.04 <= events[0][2] < 5


def test_timed_out_resolver_is_cancelled():
    class Stalling(LoRAResolver):
        cancelled = False

        async def resolve_lora(self, base_model_name, lora_name):
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                Stalling.cancelled = True
                raise

    chain = ResolverChain([("stall", Stalling())], timeout_s=0.05, negative_ttl_s=0)

    async def main():
        with pytest.raises(ResolverError, match="stall: timed out"):
            await chain.resolve(BASE, "a")
        await asyncio.sleep(0)  # let the cancellation be delivered

    run(main())
    assert Stalling.cancelled


def test_resolver_raising_timeout_error_itself_is_an_error_not_a_timeout():
    events = []
    chain = make_chain(CountingResolver(behaviour=TimeoutError("read timed out from s3")))
    chain.add_listener(lambda name, outcome, s: events.append(outcome))
    with pytest.raises(ResolverError, match="r0: TimeoutError: read timed out from s3"):
        run(chain.resolve(BASE, "a"))
    assert events == ["error"]


def test_every_resolver_failing_raises_resolver_error_naming_each():
    chain = make_chain(CountingResolver(behaviour=PermissionError("access denied by bucket policy")),
                       CountingResolver(delay=30), timeout_s=0.05)
    with pytest.raises(ResolverError) as info:
        run(chain.resolve(BASE, "a"))
    message = str(info.value)
    assert "r0: PermissionError: access denied by bucket policy" in message
    assert "r1: timed out after 0.05 s" in message
    assert chain.num_negative_cached == 0


def test_failures_and_timeouts_are_logged_with_the_resolvers_name(caplog):
    chain = ResolverChain([("s3_bucket", CountingResolver(behaviour=ConnectionError("endpoint refused"))),
                           ("slow_hub", CountingResolver(delay=30)),
                           ("local", CountingResolver(known={"a"}))], timeout_s=0.05)
    with caplog.at_level(logging.WARNING, logger="loraplex.resolvers.chain"):
        assert run(chain.resolve(BASE, "a")).lora_name == "a"
    messages = [r.getMessage() for r in caplog.records]
    assert any("'s3_bucket' failed" in m and "endpoint refused" in m for m in messages), messages
    assert any("'slow_hub' timed out" in m for m in messages), messages


def test_not_found_plus_failure_is_an_error_not_a_miss():
    not_found, failing = CountingResolver(), CountingResolver(behaviour=ConnectionError("hub unreachable"))
    chain = make_chain(not_found, failing)
    with pytest.raises(ResolverError, match="r1: ConnectionError: hub unreachable") as info:
        run(chain.resolve(BASE, "a"))
    assert "r0: not found" in str(info.value)
    # Failures are not cached: the next call asks again.
    with pytest.raises(ResolverError):
        run(chain.resolve(BASE, "a"))
    assert len(failing.calls) == 2


@pytest.mark.parametrize("error", [AdapterInvalidError("peft_type is 'IA3'"), AdapterNameError("bad name")])
def test_invalid_adapter_propagates_as_is(error):
    later = CountingResolver(known={"a"})
    chain = make_chain(CountingResolver(behaviour=error), later)
    with pytest.raises(type(error)) as info:
        run(chain.resolve(BASE, "a"))
    assert info.value is error and later.calls == []


@pytest.mark.parametrize("behaviour,problem", [("wrong_type", "returned dict"),
                                               ("wrong_name", "returned adapter 'other'")])
def test_misbehaving_resolver_is_a_failure(behaviour, problem):
    chain = make_chain(CountingResolver(behaviour=behaviour), CountingResolver(known={"a"}))
    assert run(chain.resolve(BASE, "a")).lora_name == "a"
    chain = make_chain(CountingResolver(behaviour=behaviour))
    with pytest.raises(ResolverError, match=problem):
        run(chain.resolve(BASE, "a"))


def test_negative_cache_hit_and_expiry():
    clock = FakeClock()
    resolver = CountingResolver()
    events = []
    chain = make_chain(resolver, negative_ttl_s=30, clock=clock)
    chain.add_listener(lambda name, outcome, s: events.append((name, outcome)))
    assert run(chain.resolve(BASE, "bogus")) is None
    for _ in range(100):
        assert run(chain.resolve(BASE, "bogus")) is None
    assert resolver.calls == ["bogus"]
    assert events.count(("negative_cache", "hit")) == 100
    clock.now += 29.9
    run(chain.resolve(BASE, "bogus"))
    assert len(resolver.calls) == 1
    clock.now += 0.2
    run(chain.resolve(BASE, "bogus"))
    assert len(resolver.calls) == 2


def test_forget_drops_negative_entries():
    resolver = CountingResolver()
    chain = make_chain(resolver)
    run(chain.resolve(BASE, "late"))
    resolver.known.add("late")  # the adapter was uploaded meanwhile
    assert run(chain.resolve(BASE, "late")) is None
    chain.forget("late")
    assert run(chain.resolve(BASE, "late")).lora_name == "late"


def test_zero_ttl_disables_negative_cache():
    resolver = CountingResolver()
    chain = make_chain(resolver, negative_ttl_s=0)
    for _ in range(3):
        run(chain.resolve(BASE, "bogus"))
    assert len(resolver.calls) == 3 and chain.num_negative_cached == 0


def test_found_adapters_are_not_cached():
    resolver = CountingResolver(known={"a"})
    chain = make_chain(resolver)
    run(chain.resolve(BASE, "a"))
    run(chain.resolve(BASE, "a"))
    assert len(resolver.calls) == 2


def test_maps_stay_bounded_under_10k_distinct_names():
    chain = make_chain(CountingResolver(), negative_cache_size=256)

    async def main():
        for start in range(0, 10_000, 500):
            await asyncio.gather(*(chain.resolve(BASE, f"bogus-{i}") for i in range(start, start + 500)))

    run(main())
    assert chain.num_negative_cached == 256 and chain.num_in_flight == 0
    # LRU: the most recent names are the ones kept.
    resolver = chain.resolvers[0][1]
    run(chain.resolve(BASE, "bogus-9999"))
    run(chain.resolve(BASE, "bogus-0"))
    assert resolver.calls.count("bogus-9999") == 1 and resolver.calls.count("bogus-0") == 2


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_rejected_before_any_resolver(name):
    resolver = CountingResolver(known={name} if isinstance(name, str) else ())
    chain = make_chain(resolver)
    with pytest.raises(AdapterNameError):
        run(chain.resolve(BASE, name))
    assert resolver.calls == []


def test_listener_failure_does_not_break_resolution():
    chain = make_chain(CountingResolver(known={"a"}))
    chain.add_listener(lambda *e: 1 / 0)
    assert run(chain.resolve(BASE, "a")).lora_name == "a"


def test_empty_chain_finds_nothing():
    assert run(make_chain().resolve(BASE, "a")) is None


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("LORAPLEX_RESOLVER_TIMEOUT_S", "12.5")
    monkeypatch.setenv("LORAPLEX_RESOLVER_NEGATIVE_TTL_S", "0")
    chain = ResolverChain([])
    assert (chain.timeout_s, chain.negative_ttl_s) == (12.5, 0.0)
    monkeypatch.delenv("LORAPLEX_RESOLVER_TIMEOUT_S")
    monkeypatch.delenv("LORAPLEX_RESOLVER_NEGATIVE_TTL_S")
    chain = ResolverChain([])
    assert (chain.timeout_s, chain.negative_ttl_s) == (300.0, 30.0)


@pytest.mark.parametrize("var,value", [("LORAPLEX_RESOLVER_TIMEOUT_S", "soon"),
                                       ("LORAPLEX_RESOLVER_TIMEOUT_S", "0"),
                                       ("LORAPLEX_RESOLVER_NEGATIVE_TTL_S", "-1"),
                                       ("LORAPLEX_RESOLVER_NEGATIVE_TTL_S", "nan")])
def test_bad_settings_name_the_variable(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=var):
        ResolverChain([])


def test_from_registry_loads_plugins_in_chain_order(fake_site, monkeypatch):
    add_pluggy_plugin(fake_site, "p_x", {"x_res": {"a": "/from/x"}})
    add_pluggy_plugin(fake_site, "p_y", {"y_res": {"a": "/from/y", "b": "/from/y/b"}})
    monkeypatch.setenv("VLLM_PLUGINS", "p_y,p_x")
    chain = ResolverChain.from_registry(negative_ttl_s=0)
    assert chain.resolver_names == ["y_res", "x_res"]
    assert run(chain.resolve(BASE, "a")).lora_path == "/from/y"
    assert LoRAResolverRegistry.get_supported_resolvers() == ["y_res", "x_res"]
