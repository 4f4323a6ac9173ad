"""POST /v1/responses (OpenAI's Responses API, text) over the fake engine, through the openai client."""

import httpx
import openai
import pytest

from server.fake_engine import CharTokenizer, expected_text, model_offset
from server.harness import API_KEY
from loraplex.lora_request import LoRARequest

TOK = CharTokenizer()


def _client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0)


def _answer(model, messages, n_tokens):
    lora = None if model == "tiny-base" else LoRARequest(model, 1, "/x")
    return expected_text(model_offset(lora), TOK.apply_chat_template(messages), n_tokens)


def _post(server, body, path="/v1/responses"):
    return httpx.post(server.base_url + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)


@pytest.mark.parametrize("model", ["tiny-base", "sql-lora", "resolvable-lora"])
def test_text_input_answers_as_chat_would(fake_server, model):
    out = _client(fake_server).responses.create(model=model, input="hi", max_output_tokens=4)
    messages = [{"role": "user", "content": "hi"}]
    assert out.output_text == _answer(model, messages, 4)
    assert out.object == "response" and out.model == model and out.id.startswith("resp_")
    assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
    message = out.output[0]
    assert (message.type, message.role, message.status) == ("message", "assistant", "completed")
    assert message.content[0].type == "output_text"
    prompt_tokens = len(TOK.apply_chat_template(messages))
    assert (out.usage.input_tokens, out.usage.output_tokens, out.usage.total_tokens) == (
        prompt_tokens, 4, prompt_tokens + 4)
    assert out.store is False


def test_instructions_and_message_items_make_the_conversation(fake_server):
    conversation = [{"role": "user", "content": [{"type": "input_text", "text": "h"}, {"type": "input_text", "text": "i"}]},
                    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "yo"}]},
                    {"role": "user", "content": "again"}]
    out = _client(fake_server).responses.create(model="tiny-base", instructions="Be brief", input=conversation,
                                                max_output_tokens=3, metadata={"k": "v"})
    messages = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"}]
    assert out.output_text == _answer("tiny-base", messages, 3)
    assert out.instructions == "Be brief" and out.metadata == {"k": "v"} and out.max_output_tokens == 3


def test_a_stop_ends_the_response_completed(fake_server):
    messages = [{"role": "user", "content": "xyz"}]
    full = _answer("tiny-base", messages, 6)
    out = _client(fake_server).responses.create(model="tiny-base", input="xyz", max_output_tokens=6,
                                                extra_body={"stop": [full[3]]})
    assert out.output_text == full[:3]
    assert out.status == "completed" and out.incomplete_details is None


def test_stream_events_in_order_and_their_text(fake_server):
    events = list(_client(fake_server).responses.create(model="sql-lora", input="hi", max_output_tokens=5,
                                                        stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    expected = _answer("sql-lora", [{"role": "user", "content": "hi"}], 5)
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == expected
    assert events[-4].text == expected and events[-1].response.output_text == expected
    assert events[0].response.status == "in_progress" and events[-1].response.usage.output_tokens == 5
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")} | {events[2].item.id, events[-2].item.id}
    assert len(item_ids) == 1


def test_truncation_auto_drops_the_oldest_turns(fake_server):
    long_turns = [{"role": "user", "content": "u" * 150}, {"role": "assistant", "content": "a" * 150},
                  {"role": "user", "content": "u" * 150}, {"role": "assistant", "content": "a" * 150},
                  {"role": "user", "content": "last"}]
    refused = _post(fake_server, {"model": "tiny-base", "input": long_turns, "max_output_tokens": 8})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "input"
    out = _client(fake_server).responses.create(model="tiny-base", input=long_turns, max_output_tokens=8,
                                                truncation="auto", instructions="sys")
    kept = [{"role": "system", "content": "sys"}, *long_turns[2:]]    # two turns dropped, instructions kept
    assert out.output_text == _answer("tiny-base", kept, 8)
    assert out.usage.input_tokens == len(TOK.apply_chat_template(kept))


@pytest.mark.parametrize("body, param, words", [
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools", "tools are not supported"),
    ({"previous_response_id": "resp_1"}, "previous_response_id", "keeps no responses"),
    ({"background": True}, "background", "foreground only"),
    ({"include": ["message.output_text.logprobs", "reasoning.encrypted_content"]}, "include",
     "include may only list 'message.output_text.logprobs'"),
    ({"top_logprobs": -1}, "top_logprobs", "greater than or equal to 0"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input",
     "'function_call_output': loraplex's /v1/responses takes messages"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, "input",
     "this server takes text only"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]}, "input",
     "file_id is not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_data": "x"}]}]}, "input",
     "content part of type 'input_file'"),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input",
     "input[0]: its input_text part needs a string `text`"),
    ({"input": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}], "instructions": "s"},
     "input", "input[1].role: Input should be"),
    ({"text": {"format": {"type": "grammar"}}}, "text", "text.format type 'grammar' is not supported"),
    ({"max_output_tokens": 100000}, "max_output_tokens", "lower max_output_tokens to at most"),
    ({"temperature": 5}, "temperature", "temperature"),
    ({"reasoning": {"effort": "extreme"}}, "reasoning", "reasoning.effort: Input should be 'none'"),
    ({"tool_choice": "required"}, "tool_choice", "there are no tools to call"),
    ({"model": "no-such-adapter"}, "model", "no-such-adapter"),
])
def test_what_it_cannot_do_is_a_400_naming_the_field(fake_server, body, param, words):
    r = _post(fake_server, {"model": "tiny-base", "input": "hi", **body})
    assert r.status_code in (400, 404), r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_stored_responses_are_not_kept(fake_server):
    for method, path in (("GET", "/v1/responses/resp_1"), ("DELETE", "/v1/responses/resp_1"),
                         ("POST", "/v1/responses/resp_1/cancel")):
        r = httpx.request(method, fake_server.base_url + path, headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 404 and "keeps no responses" in r.json()["error"]["message"]


def test_an_error_after_the_stream_started_is_an_error_event(fake_server, monkeypatch):
    import json

    from loraplex.errors import EngineDeadError
    engine = fake_server.engine
    real = engine.generate

    async def dies_after_one_output(prompt, params, request_id, lora_request=None):
        async for out in real(prompt, params, request_id, lora_request):
            yield out
            raise EngineDeadError("the engine stopped: RuntimeError('boom'); restart it")
    monkeypatch.setattr(engine, "generate", dies_after_one_output)
    with httpx.stream("POST", fake_server.base_url + "/v1/responses", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"input": "hi", "max_output_tokens": 5, "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200
    assert [e["type"] for e in events][-2:] == ["response.output_text.delta", "error"]
    assert events[-1]["code"] == 503 and "the engine stopped" in events[-1]["message"]
    assert events[-1]["sequence_number"] == len(events) - 1


def test_output_logprobs_when_include_asks(fake_server):
    client = _client(fake_server)
    expected = _answer("tiny-base", [{"role": "user", "content": "hi"}], 3)
    out = client.responses.create(model="tiny-base", input="hi", max_output_tokens=3, top_logprobs=1,
                                  include=["message.output_text.logprobs"])
    logprobs = out.output[0].content[0].logprobs
    assert [lp.token for lp in logprobs] == list(expected) and [lp.logprob for lp in logprobs] == [-0.5] * 3
    assert [[(t.token, t.logprob) for t in lp.top_logprobs] for lp in logprobs] == [[(c, -0.5)] for c in expected]
    assert out.top_logprobs == 1
    plain = client.responses.create(model="tiny-base", input="hi", max_output_tokens=3, top_logprobs=1)
    assert plain.output[0].content[0].logprobs == []            # top_logprobs alone changes nothing (vLLM's rule)
    events = list(client.responses.create(model="tiny-base", input="hi", max_output_tokens=3, stream=True,
                                          include=["message.output_text.logprobs"]))
    streamed = [lp.token for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert streamed == list(expected)
    done = next(e for e in events if e.type == "response.output_text.done")
    assert [lp.token for lp in done.logprobs] == list(expected)


def test_tools_with_tool_choice_none_only_reach_the_template(fake_server):
    tools = [{"type": "function", "name": "lookup", "description": "d", "parameters": {"type": "object"}}]
    out = _client(fake_server).responses.create(model="tiny-base", input="hi", max_output_tokens=3, tools=tools,
                                                tool_choice="none")
    assert out.output_text == _answer("tiny-base", [{"role": "user", "content": "hi"}], 3)
    assert out.tools[0].name == "lookup" and out.tool_choice == "none"


def test_a_client_that_leaves_aborts_its_response(fake_server, monkeypatch):
    import socket
    import time

    def wait_until(condition, failure):
        deadline = time.monotonic() + 10
        while not condition():
            assert time.monotonic() < deadline, failure
            time.sleep(0.01)

    engine = fake_server.engine
    monkeypatch.setattr(engine, "step_delay_s", 0.05)
    for stream in (True, False):
        body = ('{"input": "slow", "max_output_tokens": 200, "stream": %s}' % str(stream).lower()).encode()
        before = len(engine.started)
        with socket.create_connection(("127.0.0.1", fake_server.port)) as s:
            s.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            wait_until(lambda: len(engine.started) > before, "the engine never started the request")
            request_id = engine.started[-1]
        wait_until(lambda: request_id in engine.aborted, f"the response (stream={stream}) was not aborted")
        assert request_id not in engine.finished
