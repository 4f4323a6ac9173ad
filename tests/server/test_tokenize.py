"""POST /tokenize and /detokenize as vLLM serves them, against the real server (the demo model, whose
tokenizer adds a BOS token and has a chat template): a prompt's
and a conversation's tokens equal what the generation routes count and feed the engine, token ids
round-trip to text, and bad input is a 4xx that says what was wrong."""

import httpx
import openai
import pytest

from loraplex.core.tokenizer import Tokenizer
from loraplex.demo import demo_adapters_dir, demo_model_path
from server.harness import API_KEY
from server.real_server import real_server

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three, please."}]


@pytest.fixture(scope="module")
def served():
    ckpt = str(demo_model_path())
    argv = ["serve", ckpt, "--served-model-name", "tiny-base", "--enable-lora", "--max-lora-rank", "32",
            "--lora-modules", f"tok-lora={demo_adapters_dir() / 'upper'}", "--api-key", API_KEY,
            "--enable-tokenizer-info-endpoint"]
    with real_server(argv, {}) as server:
        yield {"url": server.base_url, "tokenizer": Tokenizer(ckpt), "server": server}


def post(served, path, body):
    return httpx.post(served["url"] + path, json=body, timeout=30)


def usage(served, **request):
    client = openai.OpenAI(base_url=served["url"] + "/v1", api_key=API_KEY, max_retries=0)
    create = client.chat.completions.create if "messages" in request else client.completions.create
    return create(max_tokens=1, temperature=0, **request).usage.prompt_tokens


def test_a_prompt_tokenizes_as_the_completions_route_counts_it(served):
    tok = served["tokenizer"]
    body = post(served, "/tokenize", {"prompt": "hello tokenizer", "model": "tok-lora"}).json()
    assert body["tokens"] == tok.encode("hello tokenizer") and body["tokens"][0] == tok.bos_token_id
    assert body["count"] == len(body["tokens"]) == usage(served, model="tok-lora", prompt="hello tokenizer")
    assert body["max_model_len"] == served["server"].state.backend.max_model_len and body["token_strs"] is None
    bare = post(served, "/tokenize", {"prompt": "hello tokenizer", "add_special_tokens": False,
                                      "return_token_strs": True}).json()
    assert bare["tokens"] == body["tokens"][1:]
    assert bare["token_strs"] == tok.convert_ids_to_tokens(bare["tokens"])


def test_messages_tokenize_as_the_chat_route_renders_them(served):
    body = post(served, "/tokenize", {"model": "tiny-base", "messages": MESSAGES}).json()
    assert body["count"] == usage(served, model="tiny-base", messages=MESSAGES)
    rendered = served["tokenizer"].apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert body["tokens"] == served["tokenizer"].encode(rendered, add_special_tokens=False)
    special = post(served, "/tokenize", {"messages": MESSAGES, "add_special_tokens": True}).json()
    assert special["tokens"] == served["tokenizer"].encode(rendered, add_special_tokens=True) != body["tokens"]


def test_detokenize_turns_tokens_back_into_text(served):
    tokens = post(served, "/tokenize", {"prompt": "round trip, 42!", "add_special_tokens": False}).json()["tokens"]
    assert post(served, "/detokenize", {"tokens": tokens, "model": "tok-lora"}).json() == {"prompt": "round trip, 42!"}


@pytest.mark.parametrize("path, body, status, message", [
    ("/tokenize", {"prompt": "x", "model": "no-such-model"}, 404, "does not exist"),
    ("/tokenize", {"text": "x"}, 400, "prompt"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400, "image or audio"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "continue_final_message": True}, 400,
     "continue_final_message"),
    ("/detokenize", {"tokens": [5, 10 ** 9]}, 400, "outside the tokenizer's vocabulary"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
])
def test_bad_requests_are_4xx_that_say_what_was_wrong(served, path, body, status, message):
    response = post(served, path, body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    assert post(served, "/tokenize", {"prompt": "still serving"}).json()["count"] > 0


def test_chat_template_flag_replaces_the_tokenizers_template(tmp_path):
    template = tmp_path / "brackets.jinja"
    template.write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    argv = ["serve", str(demo_model_path()), "--served-model-name", "tiny-base", "--chat-template", str(template)]
    with real_server(argv, {}) as server:
        served = {"url": server.base_url}
        body = post(served, "/tokenize", {"messages": MESSAGES}).json()
        expected = Tokenizer(str(demo_model_path())).encode("<<Be brief.>><<Count to three, please.>>",
                                                            add_special_tokens=False)
        assert body["tokens"] == expected
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)
        out = client.chat.completions.create(model="tiny-base", messages=MESSAGES, max_tokens=1, temperature=0)
        assert out.usage.prompt_tokens == len(expected)


def test_tokenizer_info_is_the_tokenizers_configuration(served):
    """vLLM's GET /tokenizer_info (--enable-tokenizer-info-endpoint): tokenizer_config.json's settings
    with special tokens as text, the class and the chat template; open like /tokenize."""
    import json

    from loraplex.demo import demo_model_path
    saved = json.loads((demo_model_path() / "tokenizer_config.json").read_text())
    info = httpx.get(served["url"] + "/tokenizer_info", timeout=30).json()
    tok = served["tokenizer"]
    assert info["chat_template"] == tok.chat_template and info["tokenizer_class"] == saved["tokenizer_class"]
    assert (info["bos_token"], info["eos_token"]) == (tok.bos_token, tok.eos_token)
    assert info["model_max_length"] == saved["model_max_length"]
    assert not {"vocab_file", "tokenizer_file", "name_or_path"} & set(info)
