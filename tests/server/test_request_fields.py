"""Every sampling and structured-output field of vLLM's OpenAI API, sent with the official openai client's
extra_body to the real server over the demo model and two of its adapters, each checked by its effect;
vLLM's fields loraplex does not implement are refused by name, fields nobody knows are ignored as vLLM
ignores them, and vLLM's limits and defaults hold."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import httpx
import jsonschema
import openai
import pytest

from loraplex import LLM, SamplingParams
from loraplex.demo import demo_adapters_dir, demo_model_path
from loraplex.server.protocol import UNSUPPORTED
from server.real_server import real_server

BASE = "demo"
PROMPT = "Input: hello world\nOutput: "
SCHEMA = {"type": "object",
          "properties": {"word": {"type": "string", "maxLength": 12}, "n": {"type": "integer", "minimum": 0,
                                                                           "maximum": 99}},
          "required": ["word", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server():
    adapters = demo_adapters_dir()
    argv = ["serve", str(demo_model_path()), "--served-model-name", BASE, "--device", "cpu", "--enable-lora",
            "--max-loras", "2", "--lora-modules", f"upper={adapters / 'upper'}", f"reverse={adapters / 'reverse'}",
            "--structured-outputs-config", '{"disable_any_whitespace": true}']
    with real_server(argv, {}) as srv:
        srv.client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)
        yield srv


@pytest.fixture(scope="module")
def tokenizer():
    return LLM(str(demo_model_path()), device="cpu").get_tokenizer()


def complete(server, prompt=PROMPT, model=BASE, **extra):
    """One completion; fields the openai client has no argument for go in extra_body."""
    known = {k: extra.pop(k) for k in ("max_tokens", "temperature", "seed", "stop", "logprobs", "echo", "n",
                                       "stream") if k in extra}
    known.setdefault("max_tokens", 16)
    known.setdefault("temperature", 0)
    return server.client.completions.create(model=model, prompt=prompt, extra_body=extra, **known)


def chat(server, content="hello world", model=BASE, **extra):
    known = {k: extra.pop(k) for k in ("max_tokens", "temperature", "seed", "logprobs", "top_logprobs",
                                       "response_format", "n", "stream") if k in extra}
    known.setdefault("max_tokens", 16)
    known.setdefault("temperature", 0)
    return server.client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                                 extra_body=extra, **known)


def raw(choice, key):
    """A field of a choice or response that the openai client keeps as an extra."""
    return (choice.model_extra or {}).get(key)


def test_stop_strings_and_include_stop_str_in_output(server):
    assert complete(server).choices[0].text == "hello world"
    assert complete(server, stop=["wor"]).choices[0].text == "hello "
    choice = complete(server, stop=["wor"], include_stop_str_in_output=True).choices[0]
    assert choice.text == "hello wor" and raw(choice, "stop_reason") == "wor"


def test_special_tokens_in_text(server):
    base = dict(ignore_eos=True, max_tokens=13)
    assert "</s>" not in complete(server, **base).choices[0].text
    assert complete(server, skip_special_tokens=False, **base).choices[0].text == "hello world </s> </s>"
    assert complete(server, skip_special_tokens=False, spaces_between_special_tokens=False,
                    **base).choices[0].text == "hello world</s></s>"


def test_truncate_prompt_tokens_and_add_special_tokens(server, tokenizer):
    ids = tokenizer.encode(PROMPT)
    assert complete(server, max_tokens=1).usage.prompt_tokens == len(ids)
    assert complete(server, max_tokens=1, truncate_prompt_tokens=5).usage.prompt_tokens == 5
    # Without BOS (added by the tokenizer unless add_special_tokens is false), one token less.
    assert complete(server, max_tokens=1, add_special_tokens=False).usage.prompt_tokens == len(ids) - 1
    out = complete(server, max_tokens=1, truncate_prompt_tokens=5, return_token_ids=True).choices[0]
    assert raw(out, "prompt_token_ids") == ids[-5:]


def test_max_tokens_must_fit_the_context_after_truncation(server, tokenizer):
    """A max_tokens the context cannot hold is a 400 on both endpoints, as in vLLM's server
    (completions used to stop at max_model_len with a 200), counted after
    truncate_prompt_tokens, and for every prompt of a batch."""
    max_model_len, ids = 256, tokenizer.encode(PROMPT)
    room = max_model_len - len(ids)
    assert complete(server, max_tokens=room, ignore_eos=True).usage.completion_tokens == room
    with pytest.raises(openai.BadRequestError) as err:
        complete(server, max_tokens=room + 1)
    assert err.value.body["param"] == "max_tokens" and f"lower max_tokens to at most {room}." in err.value.message
    with pytest.raises(openai.BadRequestError, match=f"at most {room}"):   # the short prompt fits, the other not
        complete(server, prompt=["hi", PROMPT], max_tokens=room + 1)
    long = "x" * 300                                        # one token a byte: over max_model_len alone
    with pytest.raises(openai.BadRequestError, match="Shorten the prompt"):
        complete(server, prompt=long, max_tokens=1)
    assert complete(server, prompt=long, max_tokens=250, truncate_prompt_tokens=6,
                    ignore_eos=True).usage.completion_tokens == 250
    assert chat(server, content=long, max_tokens=250, truncate_prompt_tokens=6,
                ignore_eos=True).usage.completion_tokens == 250
    with pytest.raises(openai.BadRequestError, match="at most 250"):
        chat(server, content=long, max_tokens=251, truncate_prompt_tokens=6)


def test_token_controls(server, tokenizer):
    z = tokenizer.encode("Z", add_special_tokens=False)[0]
    assert complete(server, max_tokens=5, logit_bias={str(z): 100}).choices[0].text == "ZZZZZ"
    allowed = tokenizer.encode("ab ", add_special_tokens=False)
    choice = complete(server, temperature=1.0, seed=3, allowed_token_ids=allowed, return_token_ids=True).choices[0]
    assert set(raw(choice, "token_ids")) <= set(allowed) and len(raw(choice, "token_ids")) == 16
    text = complete(server, bad_words=["world"]).choices[0].text
    assert text.startswith("hello ") and "world" not in text


def test_logprobs_echo_and_prompt_logprobs(server, tokenizer):
    ids = tokenizer.encode(PROMPT)
    offline = LLM(str(demo_model_path()), device="cpu").generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2, logprobs=2), use_tqdm=False)[0]
    choice = complete(server, max_tokens=4, logprobs=2, prompt_logprobs=2).choices[0]
    plp = raw(choice, "prompt_logprobs")
    assert len(plp) == len(ids) and plp[0] is None
    for pos in range(1, len(ids)):
        want = offline.prompt_logprobs[pos]
        assert {int(t): v["logprob"] for t, v in plp[pos].items()} == pytest.approx(
            {t: lp.logprob for t, lp in want.items()}, abs=1e-5)
        assert plp[pos][str(ids[pos])]["rank"] == want[ids[pos]].rank
    # echo with logprobs: the prompt's tokens and logprobs first (the first token has none), as in vLLM.
    echoed = complete(server, max_tokens=4, logprobs=1, echo=True).choices[0]
    assert echoed.text == PROMPT + "hell"
    lp = echoed.logprobs
    assert len(lp.tokens) == len(ids) + 4 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens[1:]) == PROMPT + "hell"
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(
        [offline.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))], abs=1e-5)
    assert lp.text_offset[:3] == [0, 0, 1]    # BOS has no text
    assert lp.token_logprobs[len(ids):] == pytest.approx(
        [e[t].logprob for t, e in zip(offline.outputs[0].token_ids, offline.outputs[0].logprobs)], abs=1e-5)
    # return_tokens_as_token_ids names every token by its id.
    named = complete(server, max_tokens=2, logprobs=1, return_tokens_as_token_ids=True).choices[0].logprobs
    assert named.tokens == [f"token_id:{t}" for t in offline.outputs[0].token_ids[:2]]
    chat_named = chat(server, max_tokens=2, logprobs=True, top_logprobs=1,
                      return_tokens_as_token_ids=True).choices[0].logprobs.content
    assert all(re.fullmatch(r"token_id:\d+", c.token) for c in chat_named)


def test_return_token_ids_streaming_and_not(server, tokenizer):
    ids = tokenizer.encode(PROMPT)
    choice = complete(server, return_token_ids=True).choices[0]
    assert raw(choice, "prompt_token_ids") == ids
    assert tokenizer.decode(raw(choice, "token_ids")) == "hello world"
    chunks = list(complete(server, stream=True, return_token_ids=True))
    assert raw(chunks[0].choices[0], "prompt_token_ids") == ids
    assert all(raw(c.choices[0], "prompt_token_ids") is None for c in chunks[1:])
    assert tokenizer.decode([t for c in chunks for t in raw(c.choices[0], "token_ids")]) == "hello world"
    reply = chat(server, return_token_ids=True, return_prompt_text=True)
    assert raw(reply, "prompt_text") == PROMPT.replace("Input", "<s>Input", 1)
    assert raw(reply, "prompt_token_ids") == ids
    assert tokenizer.decode(raw(reply.choices[0], "token_ids")) == reply.choices[0].message.content == "hello world"


def test_stream_interval_streams_the_same_tokens_in_fewer_chunks(server):
    """The first token at once, then every k tokens, the last with the finish. (A stream that
    falls behind gets the waiting chunks joined, server.md: a chunk after the first then holds
    a multiple of k.)"""
    def streamed(route="completions", **extra):
        """The token ids of each streamed chunk that has some."""
        send = chat if route == "chat" else complete
        chunks = [raw(c.choices[0], "token_ids") for c in send(server, stream=True, max_tokens=16, ignore_eos=True,
                                                              return_token_ids=True, **extra) if c.choices]
        return [c for c in chunks if c]

    def check(chunks, k):
        assert sum(chunks, []) == every_token, chunks
        assert len(chunks[0]) == 1 and all(len(c) % k == 0 for c in chunks[1:-1]), chunks
        assert len(chunks) <= 2 + (16 - 2) // k, chunks

    every_token = sum(streamed(), [])
    assert len(every_token) == 16
    check(streamed(stream_interval=4), 4)
    server.state.request_defaults.stream_interval = 8     # --stream-interval 8
    try:
        check(streamed(), 8)
        check(streamed(stream_interval=4), 8)              # the server's floor holds
        check(streamed(stream_interval=16), 16)
        check(streamed("chat", stream_interval=4), 8)
    finally:
        server.state.request_defaults.stream_interval = 1


def test_the_servers_stream_interval_is_a_floor_a_request_may_raise():
    from loraplex.server.protocol import CompletionRequest
    from loraplex.server.sampling import RequestDefaults, completion_sampling_params

    def interval(asked, floor):
        request = CompletionRequest(model="m", prompt="x", stream_interval=asked)
        return completion_sampling_params(request, defaults=RequestDefaults(stream_interval=floor)).stream_interval

    assert [interval(None, 1), interval(4, 1), interval(None, 8), interval(4, 8), interval(16, 8)] == [1, 4, 8, 8, 16]


@pytest.mark.parametrize("model", [BASE, "upper"])
def test_responses_api_answers_as_chat_does_on_the_real_engine(server, model):
    """/v1/responses is the chat request it means: the same greedy text, base and adapter; its
    text.format json_schema constrains the output as chat's response_format does."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]
    answer = server.client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    out = server.client.responses.create(model=model, instructions="Be brief.", input="hello world",
                                         max_output_tokens=12, temperature=0)
    assert out.output_text == answer.choices[0].message.content and out.output_text
    assert out.usage.input_tokens == answer.usage.prompt_tokens
    assert out.usage.output_tokens == answer.usage.completion_tokens
    chat_lp = server.client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                                    logprobs=True, top_logprobs=2).choices[0].logprobs.content
    resp_lp = server.client.responses.create(model=model, instructions="Be brief.", input="hello world",
                                             max_output_tokens=12, temperature=0, top_logprobs=2,
                                             include=["message.output_text.logprobs"]).output[0].content[0].logprobs
    assert [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in resp_lp] == \
        [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in chat_lp]
    shaped = server.client.responses.create(model=model, input="hello world", max_output_tokens=60, temperature=0,
                                            text={"format": {"type": "json_schema", "name": "thing", "schema": SCHEMA}})
    jsonschema.validate(json.loads(shaped.output_text), SCHEMA)


def test_structured_outputs_every_spelling(server):
    def check_json(text):
        jsonschema.validate(json.loads(text), SCHEMA)

    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
    check_json(chat(server, max_tokens=60, response_format=fmt).choices[0].message.content)
    check_json(complete(server, max_tokens=60, response_format=fmt).choices[0].text)
    check_json(complete(server, max_tokens=60, structured_outputs={"json": SCHEMA}).choices[0].text)
    check_json(complete(server, max_tokens=60, guided_json=json.dumps(SCHEMA)).choices[0].text)
    obj = chat(server, max_tokens=100, temperature=1.0, seed=1, response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    regex = r"[a-c]{2}[0-9]{3}"
    for extra in ({"structured_outputs": {"regex": regex}}, {"guided_regex": regex}):
        for seed in (1, 2):
            assert re.fullmatch(regex, complete(server, temperature=1.0, seed=seed, **extra).choices[0].text)
    choices = ["red", "green", "blue"]
    for extra in ({"structured_outputs": {"choice": choices}}, {"guided_choice": choices}):
        # Temperature 2 (vLLM's highest): the tiny model strongly prefers one choice, and the
        # constraint must still let sampling reach the others.
        got = {complete(server, temperature=2.0, seed=s, **extra).choices[0].text for s in range(12)}
        assert got <= set(choices) and len(got) > 1
    grammar = 'root ::= "SELECT " ("a" | "b") ";"'
    for extra in ({"structured_outputs": {"grammar": grammar}}, {"guided_grammar": grammar}):
        assert re.fullmatch(r"SELECT [ab];", complete(server, **extra).choices[0].text)
    # The server default (disable_any_whitespace) gives way to the request's own setting.
    loose = complete(server, max_tokens=12, structured_outputs={"json": SCHEMA, "disable_any_whitespace": False})
    assert loose.choices[0].text.startswith("{") and loose.choices[0].text != "{"


async def _mixed_batch(server):
    client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    regex = r"[A-Z]{4}"
    jobs = []
    for i in range(3):
        jobs.append(client.completions.create(model=BASE, prompt=PROMPT, max_tokens=60, temperature=1.0, seed=i,
                                              extra_body={"structured_outputs": {"json": SCHEMA}}))
        jobs.append(client.completions.create(model="upper", prompt=PROMPT, max_tokens=16, temperature=0))
        jobs.append(client.completions.create(model="reverse", prompt=PROMPT, max_tokens=16, temperature=0.7,
                                              seed=i, extra_body={"guided_regex": regex}))
        jobs.append(client.chat.completions.create(
            model="upper", messages=[{"role": "user", "content": "hello world"}], max_tokens=60,
            response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}))
        jobs.append(client.completions.create(model="reverse", prompt=PROMPT, max_tokens=16, temperature=0))
    results = await asyncio.gather(*jobs)
    await client.close()
    return results, regex


def test_structured_outputs_in_a_batch_mixed_with_adapters(server):
    results, regex = asyncio.run(_mixed_batch(server))
    for i in range(0, len(results), 5):
        schema_base, upper, regex_reverse, schema_chat_upper, reverse = results[i:i + 5]
        jsonschema.validate(json.loads(schema_base.choices[0].text), SCHEMA)
        assert upper.choices[0].text == "HELLO WORLD" and upper.model == "upper"
        assert re.fullmatch(regex, regex_reverse.choices[0].text)
        jsonschema.validate(json.loads(schema_chat_upper.choices[0].message.content), SCHEMA)
        assert reverse.choices[0].text == "dlrow olleh"


def test_model_empty_string_is_the_base_model_and_request_id(server):
    out = complete(server, model="", request_id="my-id-1")
    assert out.choices[0].text == "hello world" and out.model == BASE and out.id == "cmpl-my-id-1"
    again = complete(server, model="", request_id="my-id-1")     # a reused id does not clash
    assert again.id == "cmpl-my-id-1"
    r = httpx.post(server.base_url + "/v1/chat/completions", headers={"X-Request-Id": "hdr"},
                   json={"model": "", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["id"] == "chatcmpl-hdr"


def test_chat_template_inputs(server):
    # The demo template ignores them; they reach it without error, as in vLLM.
    reply = chat(server, documents=[{"title": "t", "text": "x"}], chat_template_kwargs={"flag": True},
                 reasoning_effort="low", include_reasoning=False, parallel_tool_calls=False,
                 tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="none")
    assert reply.choices[0].message.content == "hello world"


def test_the_answers_role_is_the_response_role_or_that_of_the_message_it_continues(server):
    messages = [{"role": "user", "content": "hello world"}]
    body = {"model": BASE, "messages": messages, "max_tokens": 2}
    assert _post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]["role"] == "assistant"
    server.state.response_role = "bot"                  # --response-role bot
    try:
        assert _post(server, "/v1/chat/completions", body).json()["choices"][0]["message"]["role"] == "bot"
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json={**body, "stream": True}) as r:
            first = json.loads(next(line for line in r.iter_lines() if line.startswith("data: "))[6:])
        assert first["choices"][0]["delta"]["role"] == "bot"
        continued = {**body, "messages": [*messages, {"role": "assistant", "content": "hel"}],
                     "add_generation_prompt": False, "continue_final_message": True}
        assert _post(server, "/v1/chat/completions", continued).json()["choices"][0]["message"]["role"] == "assistant"
    finally:
        server.state.response_role = "assistant"


def _post(server, path, body):
    return httpx.post(server.base_url + path, json=body, timeout=60)


OFF = {"use_beam_search": True, "length_penalty": 0.5, "watermarking": True, "logprob_token_ids": [1],
       "prompt_embeds": "AAAA", "kv_transfer_params": {"a": 1}, "ec_transfer_params": {"a": 1},
       "vllm_xargs": {"a": 1}, "repetition_detection": {"max_pattern_size": 2, "min_count": 2},
       "thinking_token_budget": 10, "routed_experts_prompt_start": 3, "suffix": "end",
       "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto",
       "functions": [{"name": "f"}], "function_call": "auto", "chat_template": "{{ messages }}",
       "mm_processor_kwargs": {"a": 1}, "media_io_kwargs": {"image": {}}, "priority": 1,
       "guided_decoding_backend": "xgrammar", "return_weight_versions": True}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_fields_are_refused_by_name(server, name):
    route, body = ("/v1/completions", {"prompt": "hi"})
    if name in ("tools", "tool_choice", "functions", "function_call", "chat_template", "mm_processor_kwargs",
                "media_io_kwargs"):
        route, body = ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    r = _post(server, route, {**body, "max_tokens": 2, name: OFF[name]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == name and f"'{name}' is not supported" in error["message"]
    assert error["type"] == "BadRequestError"
    off = UNSUPPORTED[name].off[0]
    ok = _post(server, route, {**body, "max_tokens": 2, name: off})      # its "off" value is accepted
    assert ok.status_code == 200, ok.text


def test_unknown_fields_are_ignored_and_logged_as_vllm_does(server, caplog):
    with caplog.at_level(logging.WARNING, logger="loraplex.server.protocol"):
        r = _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 16, "temperature": 0,
                                              "no_such_field_xyz": 1, "store": True})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "hello world"
    assert "no_such_field_xyz" in caplog.text and "store" in caplog.text


@pytest.mark.parametrize("body, param, message", [
    ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
    ({"temperature": 0, "n": 2}, None, "n must be 1 when using greedy sampling"),
    ({"temperature": 1.0, "n": 20000}, None, "n must be at most 16384"),
    ({"logit_bias": {"9999": 1}}, None, "out-of-vocabulary"),
    ({"allowed_token_ids": [1, 9999]}, None, "out-of-vocabulary"),
    ({"prompt_logprobs": 1, "stream": True}, None, "not available when `stream=True`"),
    ({"structured_outputs": {"regex": "a(b"}}, None, "the regex is not valid"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, None, "exactly one constraint"),
    ({"structured_outputs": {"nope": 1}}, None, "unknown field"),
    ({"response_format": {"type": "structural_tag", "format": {}}}, "response_format", "structural_tag"),
    ({"truncation_side": "middle"}, "truncation_side", ""),
    ({"cache_salt": "a/b"}, None, "cache_salt"),
    ({"stream_interval": 0}, "stream_interval", "greater than or equal to 1"),
    ({"logprobs": 21}, None, "Requested sample logprobs of 21, which is greater than max allowed: 20"),
    ({"prompt_logprobs": 21}, None, "Requested prompt logprobs of 21"),
])
def test_bad_values_are_400_naming_the_problem(server, body, param, message):
    r = _post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "BadRequestError"
    if param:
        assert error["param"] == param
    # Temperatures above 1 up to 2 are fine; n > 1 with sampling too.
    assert _post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "temperature": 2.0, "n": 3}) \
        .status_code == 200


def test_through_the_engine_process(tmp_path):
    """`loraplex serve --demo` as users run it (the engine in its own process): grammars compiled in
    the API server reach the engine's matchers, and prompt logprobs come back, in a batch that mixes
    the base model with resolved adapters."""
    import os

    from server.serve_process import ServeProcess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "LORAPLEX_"))}
    server = ServeProcess(["--demo", "--device", "cpu"], env, tmp_path / "server.log")
    try:
        server.wait_ready()

        async def fire():
            client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
            schema = {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}}
            jobs = [client.completions.create(model=model, prompt=PROMPT, max_tokens=60, temperature=1.0, seed=i,
                                              extra_body=schema)
                    for i, model in enumerate(("loraplex-demo-base", "sql", "upper"))]
            jobs.append(client.completions.create(model="upper", prompt=PROMPT, max_tokens=16, temperature=0,
                                                  extra_body={"guided_regex": "[A-Z ]{3,6}", "prompt_logprobs": 1}))
            jobs.append(client.completions.create(model="reverse", prompt=PROMPT, max_tokens=16, temperature=0))
            try:
                return await asyncio.gather(*jobs)
            finally:
                await client.close()

        outs = asyncio.run(fire())
    finally:
        server.stop()
    for out in outs[:3]:
        jsonschema.validate(json.loads(out.choices[0].text), SCHEMA)
    assert re.fullmatch("[A-Z ]{3,6}", outs[3].choices[0].text) and outs[3].choices[0].text.startswith("HEL")
    plp = raw(outs[3].choices[0], "prompt_logprobs")
    assert plp[0] is None and len(plp) == len(PROMPT) + 1          # byte-level: BOS + one token per byte
    assert outs[4].choices[0].text == "dlrow olleh"
