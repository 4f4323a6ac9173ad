"""vLLM's tests/entrypoints/openai/test_lora_resolvers.py: a resolver in the registry
serves an unknown model name on first request, through the OpenAI completions route.

vLLM calls its serving object directly with mocks; here the same requests go over
HTTP to a loraplex server whose engine records add_lora and generate calls."""

import httpx
import pytest

from loraplex.lora_request import LoRARequest
from loraplex.resolvers import LoRAResolver, LoRAResolverRegistry
from plugin_helpers import isolated_plugins  # noqa: F401
from vllm_ported.serving import RecordingEngine, start_server

MODEL_NAME = "openai-community/gpt2"
MOCK_RESOLVER_NAME = "mock_test_resolver"


class MockLoRAResolver(LoRAResolver):
    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        if lora_name == "test-lora":
            return LoRARequest(lora_name="test-lora", lora_int_id=1, lora_path="/fake/path/test-lora")
        elif lora_name == "invalid-lora":
            return LoRARequest(lora_name="invalid-lora", lora_int_id=2, lora_path="/fake/path/invalid-lora")
        return None


@pytest.fixture(autouse=True)
def register_mock_resolver(isolated_plugins, monkeypatch):  # noqa: F811
    """Register the mock resolver (and no plugin) for the test, remove it afterwards."""
    monkeypatch.setenv("VLLM_PLUGINS", "")
    LoRAResolverRegistry.register_resolver(MOCK_RESOLVER_NAME, MockLoRAResolver())
    yield
    if MOCK_RESOLVER_NAME in LoRAResolverRegistry.resolvers:
        del LoRAResolverRegistry.resolvers[MOCK_RESOLVER_NAME]


@pytest.fixture
def serving(request):
    engine = RecordingEngine(failing=("invalid-lora",))
    server = start_server(MODEL_NAME, engine)
    yield engine, server
    server.stop()


def create_completion(server, model, prompt):
    return httpx.post(server.base_url + "/v1/completions", json={"model": model, "prompt": prompt,
                                                                  "max_tokens": 3}, timeout=30)


@pytest.fixture
def runtime_updating(monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "true")


def test_serving_completion_with_lora_resolver(runtime_updating, serving):
    engine, server = serving
    lora_model_name = "test-lora"
    response = create_completion(server, lora_model_name, "Generate with LoRA")
    assert response.status_code == 200, response.text
    assert len(engine.add_lora_calls) == 1
    called_lora_request = engine.add_lora_calls[0]
    assert isinstance(called_lora_request, LoRARequest)
    assert called_lora_request.lora_name == lora_model_name
    assert len(engine.generate_calls) == 1
    called_lora_request = engine.generate_calls[0]
    assert isinstance(called_lora_request, LoRARequest)
    assert called_lora_request.lora_name == lora_model_name


def test_serving_completion_resolver_not_found(runtime_updating, serving):
    engine, server = serving
    non_existent_model = "non-existent-lora-adapter"
    response = create_completion(server, non_existent_model, "what is 1+1?")
    assert engine.add_lora_calls == []
    assert engine.generate_calls == []
    assert response.status_code == 404
    assert response.json()["error"]["code"] == 404
    assert non_existent_model in response.json()["error"]["message"]


def test_serving_completion_resolver_add_lora_fails(runtime_updating, serving):
    engine, server = serving
    invalid_model = "invalid-lora"
    response = create_completion(server, invalid_model, "what is 1+1?")
    # add_lora was called before the failure
    assert len(engine.add_lora_calls) == 1
    called_lora_request = engine.add_lora_calls[0]
    assert isinstance(called_lora_request, LoRARequest)
    assert called_lora_request.lora_name == invalid_model
    # generate was *not* called due to the failure
    assert engine.generate_calls == []
    assert response.status_code == 400
    assert response.json()["error"]["code"] == 400
    assert invalid_model in response.json()["error"]["message"]


def test_serving_completion_flag_not_set(serving):
    engine, server = serving
    response = create_completion(server, "test-lora", "Generate with LoRA")
    assert engine.add_lora_calls == []
    assert engine.generate_calls == []
    assert response.status_code == 404   # loraplex: vLLM's test does not look at the answer
