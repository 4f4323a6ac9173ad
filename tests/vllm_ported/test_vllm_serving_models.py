"""vLLM's tests/entrypoints/openai/test_serving_models.py: /v1/models and the runtime
load/unload routes (vLLM calls OpenAIServingModels directly; here they go over HTTP)."""

import httpx
import pytest

from plugin_helpers import isolated_plugins  # noqa: F401
from vllm_ported.serving import RecordingEngine, start_server

MODEL_NAME = "meta-llama/Llama-2-7b"
LORA_LOADING_SUCCESS_MESSAGE = "Success: LoRA adapter '{lora_name}' added successfully."
LORA_UNLOADING_SUCCESS_MESSAGE = "Success: LoRA adapter '{lora_name}' removed successfully."


@pytest.fixture
def serving_models(isolated_plugins, monkeypatch):  # noqa: F811
    monkeypatch.setenv("VLLM_PLUGINS", "")
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    engine = RecordingEngine()
    server = start_server(MODEL_NAME, engine)
    yield server
    server.stop()


def post(server, route, body):
    return httpx.post(server.base_url + route, json=body, timeout=30)


def lora_requests(server):
    """The adapters the server serves (vLLM: serving_models.lora_requests)."""
    models = httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"]
    return [m for m in models if m["id"] != MODEL_NAME]


def load_lora_adapter(server, **body):
    return post(server, "/v1/load_lora_adapter", body)


def unload_lora_adapter(server, **body):
    return post(server, "/v1/unload_lora_adapter", body)


def test_serving_model_name(serving_models):
    # vLLM: model_name(None) is the base model, model_name(lora_request) the adapter's name.
    assert httpx.get(serving_models.base_url + "/v1/models").json()["data"][0]["id"] == MODEL_NAME
    assert load_lora_adapter(serving_models, lora_name="adapter", lora_path="/path/to/adapter2").status_code == 200
    completion = post(serving_models, "/v1/completions", {"model": "adapter", "prompt": "x", "max_tokens": 1})
    assert completion.json()["model"] == "adapter"
    base = post(serving_models, "/v1/completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": 1})
    assert base.json()["model"] == MODEL_NAME


def test_load_lora_adapter_success(serving_models):
    response = load_lora_adapter(serving_models, lora_name="adapter", lora_path="/path/to/adapter2")
    assert response.text == LORA_LOADING_SUCCESS_MESSAGE.format(lora_name="adapter")
    assert len(lora_requests(serving_models)) == 1
    assert lora_requests(serving_models)[0]["id"] == "adapter"


def test_load_lora_adapter_missing_fields(serving_models):
    response = load_lora_adapter(serving_models, lora_name="", lora_path="")
    assert response.json()["error"]["type"] == "InvalidUserInput"
    assert response.status_code == 400 and response.json()["error"]["code"] == 400


def test_load_lora_adapter_duplicate(serving_models):
    response = load_lora_adapter(serving_models, lora_name="adapter1", lora_path="/path/to/adapter1")
    assert response.text == LORA_LOADING_SUCCESS_MESSAGE.format(lora_name="adapter1")
    assert len(lora_requests(serving_models)) == 1
    response = load_lora_adapter(serving_models, lora_name="adapter1", lora_path="/path/to/adapter1")
    assert response.json()["error"]["type"] == "InvalidUserInput"
    assert response.status_code == 400
    assert len(lora_requests(serving_models)) == 1


def test_unload_lora_adapter_success(serving_models):
    load_lora_adapter(serving_models, lora_name="adapter1", lora_path="/path/to/adapter1")
    assert len(lora_requests(serving_models)) == 1
    response = unload_lora_adapter(serving_models, lora_name="adapter1")
    assert response.text == LORA_UNLOADING_SUCCESS_MESSAGE.format(lora_name="adapter1")
    assert len(lora_requests(serving_models)) == 0


def test_unload_lora_adapter_missing_fields(serving_models):
    response = unload_lora_adapter(serving_models, lora_name="", lora_int_id=None)
    assert response.json()["error"]["type"] == "InvalidUserInput"
    assert response.status_code == 400


def test_unload_lora_adapter_not_found(serving_models):
    response = unload_lora_adapter(serving_models, lora_name="nonexistent_adapter")
    assert response.json()["error"]["type"] == "NotFoundError"
    assert response.status_code == 404
