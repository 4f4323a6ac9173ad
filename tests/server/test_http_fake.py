"""HTTP behaviour in isolation, over the fake engine: shapes, statuses, auth, streaming."""

import asyncio
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from server.harness import API_KEY
from server.fake_engine import CharTokenizer, expected_text, model_offset
from loraplex.lora_request import LoRARequest

TOK = CharTokenizer()


def _client(server, key=API_KEY):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)


def _wait_until(condition, failure: str, timeout: float = 10.0, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(poll)


def _expected(model, prompt, n_tokens, sample=0):
    lora = None if model == "tiny-base" else LoRARequest(model, 1, "/x")
    return expected_text(model_offset(lora), TOK.encode(prompt), n_tokens, sample)


def test_models_list_has_base_and_adapter_lineage(fake_server, adapter_dirs):
    models = {m.id: m for m in _client(fake_server).models.list().data}
    assert models["tiny-base"].root == "/models/tiny" and models["tiny-base"].parent is None
    assert models["sql-lora"].root == adapter_dirs["sql-lora"]
    assert models["sql-lora"].parent == "tiny-base"


@pytest.mark.parametrize("model", ["tiny-base", "sql-lora"])
def test_completion_uses_the_named_model(fake_server, model):
    out = _client(fake_server).completions.create(model=model, prompt="hello", max_tokens=5)
    assert out.choices[0].text == _expected(model, "hello", 5)
    assert out.model == model and out.object == "text_completion"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (5, 5, 10)
    assert out.choices[0].finish_reason == "length"


def test_batch_prompts_token_prompts_and_n(fake_server):
    client = _client(fake_server)
    out = client.completions.create(model="sql-lora", prompt=["ab", "cd"], max_tokens=3, n=2)
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert texts == [_expected("sql-lora", p, 3, s) for p in ("ab", "cd") for s in (0, 1)]
    assert out.usage.prompt_tokens == 4 and out.usage.completion_tokens == 12
    out = client.completions.create(model="tiny-base", prompt=TOK.encode("hey"), max_tokens=2)
    assert out.choices[0].text == _expected("tiny-base", "hey", 2)
    out = client.completions.create(model="tiny-base", prompt=[TOK.encode("a"), TOK.encode("b")], max_tokens=2)
    assert len(out.choices) == 2


def test_stop_echo_and_logprobs(fake_server):
    client = _client(fake_server)
    full = _expected("tiny-base", "xyz", 6)
    out = client.completions.create(model="tiny-base", prompt="xyz", max_tokens=6, stop=[full[3]])
    assert out.choices[0].text == full[:3] and out.choices[0].finish_reason == "stop"
    out = client.completions.create(model="tiny-base", prompt="xyz", max_tokens=2, echo=True)
    assert out.choices[0].text == "xyz" + full[:2]
    out = client.completions.create(model="tiny-base", prompt="xyz", max_tokens=3, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp.tokens == list(full[:3]) and lp.token_logprobs == [-0.5] * 3
    assert lp.top_logprobs[0] == {full[0]: -0.5, "A": -2.0}
    assert lp.text_offset == [0, 1, 2]


def test_completion_streaming_with_usage(fake_server):
    stream = _client(fake_server).completions.create(
        model="sql-lora", prompt="abc", max_tokens=4, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == _expected("sql-lora", "abc", 4)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_stream_ends_with_done(fake_server):
    with httpx.stream("POST", fake_server.base_url + "/v1/completions",
                      headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"prompt": "a", "max_tokens": 2, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"


def test_chat_completion_and_stream(fake_server):
    client = _client(fake_server)
    messages = [{"role": "user", "content": "hi"}]
    prompt = TOK.apply_chat_template(messages, tokenize=False)
    out = client.chat.completions.create(model="sql-lora", messages=messages, max_tokens=4,
                                         logprobs=True, top_logprobs=1)
    assert out.choices[0].message.content == _expected("sql-lora", prompt, 4)
    assert out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(prompt)
    assert [t.logprob for t in out.choices[0].logprobs.content] == [-0.5] * 4
    assert len(out.choices[0].logprobs.content[0].top_logprobs) == 1
    chunks = list(client.chat.completions.create(model="sql-lora", messages=messages, max_tokens=4,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == _expected("sql-lora", prompt, 4)
    assert chunks[-1].usage.total_tokens == len(prompt) + 4


def test_chat_echo_repeats_a_final_assistant_message(fake_server):
    client = _client(fake_server)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Well,"}]
    answer = _expected("tiny-base", TOK.apply_chat_template(messages, tokenize=False), 3)
    out = client.chat.completions.create(model="tiny-base", messages=messages, max_tokens=3,
                                         extra_body={"echo": True})
    assert out.choices[0].message.content == "Well," + answer
    chunks = list(client.chat.completions.create(model="tiny-base", messages=messages, max_tokens=3, stream=True,
                                                 extra_body={"echo": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Well," + answer
    out = client.chat.completions.create(model="tiny-base", messages=messages[:1], max_tokens=3,
                                         extra_body={"echo": True})   # nothing to echo after a user turn
    assert out.choices[0].message.content == _expected("tiny-base", TOK.apply_chat_template(messages[:1],
                                                                                             tokenize=False), 3)


def test_chat_default_max_tokens_fills_the_context(fake_server):
    out = _client(fake_server).chat.completions.create(
        model="tiny-base", messages=[{"role": "user", "content": "x" * 400}])
    assert out.usage.total_tokens == fake_server.engine.max_model_len


def test_resolve_on_first_request_shares_one_resolution(fake_server):
    async def many():
        client = openai.AsyncOpenAI(base_url=fake_server.base_url + "/v1", api_key=API_KEY, max_retries=0)
        outs = await asyncio.gather(*[client.completions.create(model="resolvable-lora", prompt="q", max_tokens=2)
                                      for _ in range(6)])
        await client.close()
        return outs
    outs = asyncio.run(many())
    assert {o.choices[0].text for o in outs} == {_expected("resolvable-lora", "q", 2)}
    assert fake_server.chain.calls.count("resolvable-lora") == 1
    models = {m.id: m for m in _client(fake_server).models.list().data}
    assert models["resolvable-lora"].root == fake_server.resolvable_path


def test_unknown_model_is_404_never_the_base_model(fake_server):
    with pytest.raises(openai.NotFoundError) as e:
        _client(fake_server).completions.create(model="nobody-has-this", prompt="a", max_tokens=1)
    assert e.value.body["message"] == "The model 'nobody-has-this' does not exist."
    assert e.value.body["type"] == "NotFoundError" and e.value.body["code"] == 404
    assert fake_server.app.state.loraplex.backend._name_locks == {}   # nothing kept per unknown name


def test_unsafe_model_name_is_400(fake_server):
    with pytest.raises(openai.BadRequestError) as e:
        _client(fake_server).completions.create(model="../etc", prompt="a", max_tokens=1)
    assert "'..'" in e.value.body["message"]


def _post(server, path, body, key=API_KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=30)


def test_load_and_unload_adapter(fake_server, adapter_dirs):
    r = _post(fake_server, "/v1/load_lora_adapter", {"lora_name": "chat-lora", "lora_path": adapter_dirs["chat-lora"]})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'chat-lora' added successfully."
    again = _post(fake_server, "/v1/load_lora_adapter", {"lora_name": "chat-lora", "lora_path": adapter_dirs["chat-lora"]})
    assert again.status_code == 400 and "load_inplace" in again.json()["error"]["message"]
    inplace = _post(fake_server, "/v1/load_lora_adapter", {"lora_name": "chat-lora", "load_inplace": True,
                                                           "lora_path": adapter_dirs["extra-lora"]})
    assert inplace.status_code == 200
    models = {m.id: m for m in _client(fake_server).models.list().data}
    assert models["chat-lora"].root == adapter_dirs["extra-lora"]
    num_engine_loras = len(fake_server.engine.loras)
    r = _post(fake_server, "/v1/unload_lora_adapter", {"lora_name": "chat-lora"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'chat-lora' removed successfully."
    assert len(fake_server.engine.loras) == num_engine_loras - 1
    assert "chat-lora" not in {m.id for m in _client(fake_server).models.list().data}
    missing = _post(fake_server, "/v1/unload_lora_adapter", {"lora_name": "chat-lora"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == 404


def test_load_invalid_adapter_is_400_with_reason(fake_server, tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}')
    r = _post(fake_server, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(tmp_path)})
    assert r.status_code == 400 and "PROMPT_TUNING" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "lora_path"
    r = _post(fake_server, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(tmp_path / "no")})
    assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "lora_path"
    r = _post(fake_server, "/v1/load_lora_adapter", {"lora_name": "../bad", "lora_path": str(tmp_path)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"


@pytest.mark.parametrize("body", [
    {"prompt": "a", "max_tokens": 0},
    {"prompt": "a", "temperature": -1},
    {"prompt": 5},
    {"prompt": []},
    {"prompt": "a", "n": "many"},
    {"max_tokens": 3},
    {"prompt": "a", "logit_bias": {"five": 10}},
    {"prompt": "a", "response_format": {"type": "json_schema"}},
    {"prompt": "a", "use_beam_search": True},
    {"prompt": "a", "suffix": "end"},
    {"prompt": "a", "stream_options": {"include_usage": True}},
])
def test_validation_errors_are_400_in_openai_shape(fake_server, body):
    r = _post(fake_server, "/v1/completions", body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == 400


def test_invalid_json_and_context_overflow(fake_server):
    r = httpx.post(fake_server.base_url + "/v1/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
    r = _post(fake_server, "/v1/chat/completions",
              {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    for stream in (False, True):   # completions answer as chat does (vLLM's server refuses both)
        r = _post(fake_server, "/v1/completions", {"prompt": "x", "max_tokens": 10_000, "stream": stream})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        assert "maximum context length is 512 tokens" in r.json()["error"]["message"]


def test_auth_required_on_v1_only(fake_server):
    for key in (None, "wrong"):
        r = _post(fake_server, "/v1/completions", {"prompt": "a"}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == 401
        r = _post(fake_server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/x"}, key=key)
        assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        _client(fake_server, key="wrong").models.list()
    v1_routes = [(method, route.path) for route in fake_server.app.routes if route.path.startswith("/v1/")
                 for method in getattr(route, "methods", ()) if method != "HEAD"]
    assert len(v1_routes) == 9   # models, completions, chat, responses (create, get, delete, cancel), load, unload
    for method, path in v1_routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            r = httpx.request(method, fake_server.base_url + path, json={}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "UnauthorizedError", (method, path)
    assert httpx.get(fake_server.base_url + "/health").status_code == 200
    assert httpx.get(fake_server.base_url + "/ping").status_code == 200     # open, as /health
    assert httpx.post(fake_server.base_url + "/ping").status_code == 200
    assert httpx.get(fake_server.base_url + "/version").json()["version"]


def test_unknown_route_is_404_in_openai_shape(fake_server):
    r = httpx.get(fake_server.base_url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


def test_client_disconnect_aborts_the_request(fake_server):
    engine = fake_server.engine
    old_delay, engine.step_delay_s = engine.step_delay_s, 0.05
    try:
        with socket.create_connection(("127.0.0.1", fake_server.port)) as s:
            body = b'{"prompt": "slow", "max_tokens": 200}'
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            _wait_until(lambda: engine.started and engine.started[-1] not in engine.finished,
                        "the engine never started the request", poll=0.01)
            request_id = engine.started[-1]
        _wait_until(lambda: request_id in engine.aborted, "the engine request was not aborted")
        assert request_id not in engine.finished
        _wait_until(lambda: 'route="/v1/completions",status="499"' in httpx.get(fake_server.base_url + "/metrics").text,
                    "the disconnect was not counted as 499")
    finally:
        engine.step_delay_s = old_delay


def test_metrics_exposed(fake_server):
    _client(fake_server).completions.create(model="sql-lora", prompt="m", max_tokens=3)
    text = httpx.get(fake_server.base_url + "/metrics").text
    assert 'loraplex_lora_requests_total{model="sql-lora"}' in text
    assert "loraplex_time_to_first_token_seconds_count" in text
    assert 'loraplex_http_requests_total{method="POST",route="/v1/completions",status="200"}' in text
    assert 'loraplex_lora_cache_hits_total{tier="device"} 5.0' in text
    assert "loraplex_generation_tokens_total" in text


def test_client_disconnect_aborts_a_stream(fake_server):
    engine = fake_server.engine
    old_delay, engine.step_delay_s = engine.step_delay_s, 0.05
    try:
        with httpx.stream("POST", fake_server.base_url + "/v1/chat/completions",
                          headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"messages": [{"role": "user", "content": "slow"}], "max_tokens": 200,
                                "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break
            request_id = engine.started[-1]
        _wait_until(lambda: request_id in engine.aborted, "the streaming request was not aborted")
        assert request_id not in engine.finished
    finally:
        engine.step_delay_s = old_delay


def test_draining_server_refuses_new_generation(fake_server):
    state = fake_server.app.state.loraplex
    state.is_draining = True
    try:
        r = _post(fake_server, "/v1/completions", {"prompt": "a", "max_tokens": 1})
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    finally:
        state.is_draining = False


def test_unsupported_features_are_refused_by_name(fake_server):
    r = _post(fake_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                    "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert r.status_code == 400 and "'tools' is not supported" in r.json()["error"]["message"]
    ok = _post(fake_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
                                                     "tools": [], "tool_choice": "none", "logit_bias": {},
                                                     "response_format": {"type": "text"}})
    assert ok.status_code == 200


def test_server_side_failures_map_to_502_and_503(fake_server):
    r = _post(fake_server, "/v1/completions", {"model": "source-down-lora", "prompt": "a"})
    assert r.status_code == 502 and "connection refused" in r.json()["error"]["message"]
    r = _post(fake_server, "/v1/completions", {"prompt": "all slots pinned"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
    fake_server.engine.is_running = False
    try:
        assert httpx.get(fake_server.base_url + "/health").status_code == 503
        assert httpx.get(fake_server.base_url + "/ping").status_code == 503
        assert httpx.post(fake_server.base_url + "/ping").status_code == 503
        r = _post(fake_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]})
        assert r.status_code == 503 and "restart" in r.json()["error"]["message"]
    finally:
        fake_server.engine.is_running = True


def test_the_app_imports_what_its_first_streamed_response_would():
    """anyio's asyncio backend is imported with the app, not by the first streamed response
    (25-70 ms of that request's first token)."""
    code = "import sys, loraplex.server.app; print('anyio._backends._asyncio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True", out.stderr


def test_return_tokens_as_token_ids_flag_is_the_default_a_request_overrides(fake_server):
    """--return-tokens-as-token-ids (vLLM's): logprobs name tokens by id unless the request
    sets return_tokens_as_token_ids itself, as vLLM decides it."""
    state = fake_server.app.state.loraplex
    body = {"prompt": "xyz", "max_tokens": 2, "logprobs": 1}
    assert not _post(fake_server, "/v1/completions", body).json()["choices"][0]["logprobs"]["tokens"][0].startswith(
        "token_id:")
    state.return_tokens_as_token_ids = True
    try:
        tokens = _post(fake_server, "/v1/completions", body).json()["choices"][0]["logprobs"]["tokens"]
        assert all(t.startswith("token_id:") for t in tokens) and len(tokens) == 2
        tokens = _post(fake_server, "/v1/completions", {**body, "return_tokens_as_token_ids": False}).json()[
            "choices"][0]["logprobs"]["tokens"]
        assert not any(t.startswith("token_id:") for t in tokens)
        chat = _post(fake_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                           "max_tokens": 2, "logprobs": True}).json()
        assert all(c["token"].startswith("token_id:") for c in chat["choices"][0]["logprobs"]["content"])
    finally:
        state.return_tokens_as_token_ids = False
