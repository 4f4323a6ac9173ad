"""vLLM's tests/lora/test_resolver.py: the resolver registry and a resolver's contract."""

import asyncio

import pytest

from loraplex.lora_request import LoRARequest
from loraplex.resolvers import LoRAResolver, LoRAResolverRegistry
from plugin_helpers import isolated_plugins  # noqa: F401


@pytest.fixture(autouse=True)
def _isolated(isolated_plugins):  # noqa: F811 (loraplex: a fresh registry for each test)
    yield


class DummyLoRAResolver(LoRAResolver):
    """A dummy LoRA resolver for testing."""

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        if lora_name == "test_lora":
            return LoRARequest(
                lora_name=lora_name,
                lora_path=f"/dummy/path/{base_model_name}/{lora_name}",
                lora_int_id=abs(hash(lora_name)),
            )
        return None


def test_resolver_registry_registration():
    registry = LoRAResolverRegistry
    resolver = DummyLoRAResolver()
    registry.register_resolver("dummy", resolver)
    assert "dummy" in registry.get_supported_resolvers()
    assert registry.get_resolver("dummy") is resolver


def test_resolver_registry_duplicate_registration():
    registry = LoRAResolverRegistry
    resolver1 = DummyLoRAResolver()
    resolver2 = DummyLoRAResolver()
    registry.register_resolver("dummy", resolver1)
    registry.register_resolver("dummy", resolver2)
    assert registry.get_resolver("dummy") is resolver2


def test_resolver_registry_unknown_resolver():
    registry = LoRAResolverRegistry
    with pytest.raises(KeyError, match="not found"):
        registry.get_resolver("unknown_resolver")


def test_dummy_resolver_resolve():
    dummy_resolver = DummyLoRAResolver()
    base_model_name = "base_model_test"
    lora_name = "test_lora"
    result = asyncio.run(dummy_resolver.resolve_lora(base_model_name, lora_name))
    assert isinstance(result, LoRARequest)
    assert result.lora_name == lora_name
    assert result.lora_path == f"/dummy/path/{base_model_name}/{lora_name}"
    result = asyncio.run(dummy_resolver.resolve_lora(base_model_name, "nonexistent_lora"))
    assert result is None


def test_registry_resolvers_mapping_as_vllm_uses_it():
    """vLLM's OpenAI tests register and remove resolvers through the `resolvers` dict."""
    LoRAResolverRegistry.register_resolver("mock", DummyLoRAResolver())
    assert "mock" in LoRAResolverRegistry.resolvers
    del LoRAResolverRegistry.resolvers["mock"]
    assert "mock" not in LoRAResolverRegistry.get_supported_resolvers()
