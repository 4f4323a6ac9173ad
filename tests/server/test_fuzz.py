"""Property-based fuzz of the HTTP API (hypothesis): whatever the body, the server answers
with a status below 500, and every error is an OpenAI error object."""

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters import write_peft_adapter
from server.harness import API_KEY
from server.real_server import real_server

ENDPOINTS = ["/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
             "/tokenize", "/detokenize"]

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | \
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
any_json = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) |
                        st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
small_ints = st.integers(-3, 5)
token_ids = st.lists(st.integers(-5, 400), min_size=0, max_size=6)
models = st.sampled_from(["tiny-base", "fs-lora", "nope", "../x", "", "a/b", "x" * 300]) | st.text(max_size=8)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "robot"]) | any_json},
    optional={"content": st.text(max_size=10) | any_json |
              st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                              "text": st.text(max_size=5)}), max_size=2)}),
    max_size=3)
FIELDS = {
    "model": models, "prompt": st.text(max_size=10) | token_ids | st.lists(token_ids, max_size=2) |
    st.lists(st.text(max_size=5), max_size=2) | any_json,
    "messages": messages | any_json, "max_tokens": small_ints | any_json,
    "max_completion_tokens": small_ints, "temperature": st.floats(-1, 3) | any_json,
    "top_p": st.floats(-0.5, 1.5), "top_k": small_ints, "min_p": st.floats(-0.5, 1.5),
    "n": small_ints, "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=2) | any_json,
    "stop_token_ids": token_ids, "seed": st.integers(-2**65, 2**65) | st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63) - 1]) | any_json,
    "logprobs": small_ints | st.booleans() | st.integers(0, 30), "top_logprobs": st.integers(-2, 25),
    "echo": st.booleans(), "stream": st.booleans() | any_json,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans(),
                                                          "continuous_usage_stats": st.booleans()}) | any_json,
    "presence_penalty": st.floats(-3, 3), "frequency_penalty": st.floats(-3, 3),
    "repetition_penalty": st.floats(-1, 3), "min_tokens": small_ints, "ignore_eos": st.booleans(),
    "suffix": st.text(max_size=3), "best_of": small_ints, "add_generation_prompt": st.booleans(),
    "continue_final_message": st.booleans(), "lora_name": models | any_json,
    "lora_path": st.sampled_from(["/", "/nonexistent", "\x00bad"]) | st.text(max_size=10) | any_json,
    "load_inplace": st.booleans() | any_json,
    "tokens": token_ids | any_json, "add_special_tokens": st.booleans() | any_json,
    "return_token_strs": st.booleans() | any_json,
}
# Mostly a valid request with a few fields replaced, so the engine path is fuzzed too, not
# only request validation; sometimes any JSON at all.
VALID = {
    "/v1/completions": {"model": "tiny-base", "prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions": {"model": "fs-lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/load_lora_adapter": {"lora_name": "fuzz-lora", "lora_path": "/nonexistent"},
    "/v1/unload_lora_adapter": {"lora_name": "fuzz-lora"},
    "/tokenize": {"model": "fs-lora", "messages": [{"role": "user", "content": "hi"}]},
    "/detokenize": {"model": "tiny-base", "tokens": [5, 6, 7]},
}
changes = st.dictionaries(st.sampled_from(sorted(FIELDS)), st.just(None), max_size=3).flatmap(
    lambda keys: st.fixed_dictionaries({k: FIELDS[k] for k in keys}))


def bodies(endpoint: str):
    return changes.map(lambda c: {**VALID[endpoint], **c}) | any_json


@pytest.fixture(scope="module")
def fuzz_server(tiny_checkpoint, tmp_path_factory):
    ckpt = str(tiny_checkpoint())
    cache = tmp_path_factory.mktemp("fuzz-cache")
    write_peft_adapter(cache / "fs-lora", base_model_name_or_path=ckpt)
    # A short context bounds how long any accepted request can generate.
    argv = ["serve", ckpt, "--served-model-name", "tiny-base", "--enable-lora", "--max-model-len", "24",
            "--api-key", API_KEY]
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_PLUGINS": "lora_filesystem_resolver",
           "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache)}
    with real_server(argv, env) as server:
        with httpx.Client(base_url=server.base_url, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            yield client


def check_response(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == r.status_code
        assert isinstance(error["message"], str) and error["message"]
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            payload = json.loads(event)
            assert "error" not in payload or payload["error"]["code"] < 500, payload


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(endpoint=st.sampled_from(ENDPOINTS), data=st.data())
def test_no_5xx_for_any_json_body(fuzz_server, endpoint, data):
    check_response(fuzz_server.post(endpoint, json=data.draw(bodies(endpoint))))


def test_the_valid_bodies_succeed(fuzz_server):
    for endpoint in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        assert fuzz_server.post(endpoint, json=VALID[endpoint]).status_code == 200


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(endpoint=st.sampled_from(ENDPOINTS), raw=st.binary(max_size=40),
       content_type=st.sampled_from(["application/json", "text/plain", "", "application/x-www-form-urlencoded"]))
def test_no_5xx_for_any_raw_body(fuzz_server, endpoint, raw, content_type):
    check_response(fuzz_server.post(endpoint, content=raw, headers={"content-type": content_type}))
