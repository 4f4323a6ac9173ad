"""The tiny checkpoints others build on: loadable by transformers, tokenizer consistent with the model."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_tokenizer_loads_and_fits_the_model(tiny_checkpoint, arch):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = tiny_checkpoint(arch)
    config = json.loads((path / "config.json").read_text())
    hf = AutoTokenizer.from_pretrained(path)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert len(hf) <= config["vocab_size"] and raw.get_vocab_size() <= config["vocab_size"]
    assert (hf.bos_token_id, hf.eos_token_id) == (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    text = "hello world, the answer is 42. ünïcode ✓"
    ids = raw.encode(text).ids
    assert raw.decode(ids) == text and hf.decode(hf(text).input_ids) == text
    if arch != "qwen2":
        # transformers' Qwen2Tokenizer swaps in Qwen's own pre-tokenizer regex, so its ids differ
        # from tokenizer.json's; loraplex reads tokenizer.json.
        assert hf(text).input_ids == ids
    assert len(ids) < len(text.encode())  # the BPE merges do something
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<s><|user|>hi</s><|assistant|>"


def test_weights_are_not_default_init(tiny_checkpoint):
    """Norm weights and biases must be random, or tests could not see them misused."""
    from safetensors.torch import load_file

    tensors = load_file(str(tiny_checkpoint("qwen2") / "model.safetensors"))
    assert tensors["model.layers.0.input_layernorm.weight"].std() > 0.1
    assert tensors["model.layers.0.self_attn.q_proj.bias"].abs().min() > 0
