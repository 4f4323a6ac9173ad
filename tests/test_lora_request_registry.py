"""LoRARequest field checks and equality; the process-wide LoRAResolverRegistry."""

from __future__ import annotations

import logging

import pytest

from loraplex import LoRARequest
from loraplex.errors import InvalidRequestError
from loraplex.lora_request import lora_id_for_name
from loraplex.resolvers import LoRAResolver, LoRAResolverRegistry
from plugin_helpers import isolated_plugins  # noqa: F401


class NoneResolver(LoRAResolver):
    async def resolve_lora(self, base_model_name, lora_name):
        return None


@pytest.mark.parametrize("kwargs, field", [
    ({"lora_name": "", "lora_int_id": 1, "lora_path": "/a"}, "lora_name"),
    ({"lora_name": "  ", "lora_int_id": 1, "lora_path": "/a"}, "lora_name"),
    ({"lora_name": "a", "lora_int_id": 0, "lora_path": "/a"}, "lora_int_id"),
    ({"lora_name": "a", "lora_int_id": -3, "lora_path": "/a"}, "lora_int_id"),
    ({"lora_name": "a", "lora_int_id": True, "lora_path": "/a"}, "lora_int_id"),
    ({"lora_name": "a", "lora_int_id": "1", "lora_path": "/a"}, "lora_int_id"),
    ({"lora_name": "a", "lora_int_id": 1, "lora_path": ""}, "lora_path"),
    ({"lora_name": "a", "lora_int_id": 1, "lora_path": "/a", "base_model_name": 7}, "base_model_name"),
])
def test_bad_fields_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError, match=f"LoRARequest.{field}"):
        LoRARequest(**kwargs)


def test_equality_and_hash_follow_the_name():
    a = LoRARequest("sql", 1, "/x", "base")
    assert a == LoRARequest("sql", 2, "/elsewhere") and hash(a) == hash(LoRARequest("sql", 9, "/y"))
    assert a != LoRARequest("chat", 1, "/x", "base")
    assert (a.adapter_id, a.name, a.path) == (1, "sql", "/x")


def test_ids_are_stable_and_in_range():
    assert lora_id_for_name("sql") == lora_id_for_name("sql") != lora_id_for_name("chat")
    assert all(1 <= lora_id_for_name(f"n{i}") < 2**31 for i in range(200))


def test_registry_register_get_replace_unregister(isolated_plugins, caplog):
    first, second, replacement = NoneResolver(), NoneResolver(), NoneResolver()
    LoRAResolverRegistry.register_resolver("first", first)
    LoRAResolverRegistry.register_resolver("second", second)
    assert LoRAResolverRegistry.get_resolver("first") is first
    with caplog.at_level(logging.WARNING):
        LoRAResolverRegistry.register_resolver("first", replacement)
    assert "already registered" in caplog.text
    assert LoRAResolverRegistry.get_resolver("first") is replacement
    assert LoRAResolverRegistry.get_supported_resolvers() == ["first", "second"]  # keeps its place
    with pytest.raises(KeyError, match=r"LoRA resolver 'nope' not found. Available resolvers: \['first', 'second'\]"):
        LoRAResolverRegistry.get_resolver("nope")
    assert LoRAResolverRegistry.unregister_resolver("first") is replacement
    assert LoRAResolverRegistry.unregister_resolver("first") is None
    assert LoRAResolverRegistry.get_supported_resolvers() == ["second"]


def test_registry_refuses_what_is_not_a_resolver(isolated_plugins):
    with pytest.raises(TypeError, match="must be a LoRAResolver instance"):
        LoRAResolverRegistry.register_resolver("bad", object())
    with pytest.raises(ValueError, match="non-empty string"):
        LoRAResolverRegistry.register_resolver("", NoneResolver())
    assert LoRAResolverRegistry.get_supported_resolvers() == []


def test_vllm_field_order_and_keywords():
    """vLLM's LoRARequest: lora_path may come by keyword after lora_int_id, and must be set."""
    request = LoRARequest(lora_name="a", lora_path="/a", lora_int_id=7)
    assert (request.lora_path, request.path, request.adapter_id) == ("/a", "/a", 7)
    assert LoRARequest("a", 7, "/a", "base", None, True, True).is_3d_lora_weight
    with pytest.raises(InvalidRequestError, match="LoRARequest.lora_path must be a non-empty path"):
        LoRARequest(lora_name="a", lora_int_id=1)


def test_tensorizer_adapters_are_refused_by_name():
    with pytest.raises(InvalidRequestError, match="tensorizer_config_dict is set for adapter 'a', but loraplex "
                                                  "cannot load tensorizer-serialized adapters"):
        LoRARequest("a", 1, "/a", tensorizer_config_dict={"tensorizer_uri": "s3://x/adapter.tensors"})


@pytest.mark.parametrize("flag", ["load_inplace", "is_3d_lora_weight"])
def test_flags_are_booleans(flag):
    with pytest.raises(InvalidRequestError, match=f"LoRARequest.{flag} must be True or False"):
        LoRARequest("a", 1, "/a", **{flag: "yes"})
