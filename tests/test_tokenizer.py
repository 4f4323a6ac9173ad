"""Tokenizer: same ids, text and chat prompts as transformers' tokenizer for the same files."""

import json

import pytest
from transformers import AutoTokenizer

from loraplex.core.tokenizer import Tokenizer, load_tokenizer
from loraplex.errors import ConfigError, InvalidRequestError
from models import write_tiny_tokenizer

TEXTS = ["Hello world", "The capital of France is", "  spaces\tand\nnewlines ", "héllo 日本語 🎉", "<s>x</s>"]
CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def pair(tok_dir):
    return Tokenizer(tok_dir), AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(pair, text):
    ours, ref = pair
    ids = ours.encode(text)
    assert ids == ref(text).input_ids
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


def test_special_tokens(pair):
    ours, ref = pair
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)
    assert set(ours.all_special_ids) >= {ref.bos_token_id, ref.eos_token_id}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(pair, add_generation_prompt):
    ours, ref = pair
    text = ours.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt)
    assert text == ref.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt,
                                           tokenize=False)
    ids = ours.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt, tokenize=True)
    expected = ref.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert ids == list(expected)


def test_add_bos_token_true_prepends_bos(tmp_path):
    path = write_tiny_tokenizer(tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["add_bos_token"] = True
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer(path)
    assert ours.encode("hi")[0] == ours.bos_token_id
    assert ours.encode("hi")[1:] == Tokenizer(write_tiny_tokenizer(tmp_path / "plain")).encode("hi")


def test_missing_template_and_broken_template_are_clear_errors(tmp_path):
    path = write_tiny_tokenizer(tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = Tokenizer(path)
    with pytest.raises(InvalidRequestError, match="no chat_template"):
        ours.apply_chat_template(CONVERSATION)
    with pytest.raises(InvalidRequestError, match="does not parse"):
        ours.apply_chat_template(CONVERSATION, chat_template="{% for %}")
    failing = "{{ raise_exception('only user turns') }}"
    with pytest.raises(InvalidRequestError, match="only user turns"):
        ours.apply_chat_template(CONVERSATION, chat_template=failing)
    with pytest.raises(InvalidRequestError, match="list of"):
        ours.apply_chat_template("hello")


def test_no_tokenizer_file(tmp_path):
    assert load_tokenizer(tmp_path) is None
    with pytest.raises(ConfigError, match="tokenizer.json"):
        Tokenizer(tmp_path)
