"""Write tiny but real Hugging Face checkpoints (weights + tokenizer) for tests.

`make_tiny_checkpoint` builds the model with transformers (random init, then saved with
save_pretrained as safetensors), so the files are exactly what a downloaded checkpoint
looks like, and transformers is the reference for what the model computes.

The weights are deliberately not transformers' default init: that init (std 0.02, norms
at 1, biases at 0) makes attention almost uniform and norms and biases invisible, so a
wrong mask, a swapped norm or a dropped bias would still pass. Here projections are
larger, and norm weights and biases are random.

Shapes match tests/adapters.py TINY_SHAPES: hidden 64, 4 heads x 16, 2 KV heads,
intermediate 128, 2 layers; so adapters written there fit these models.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
    rope_theta=10000.0, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
# Granite's four scalars, as Granite checkpoints set them (values of the tiny test models).
GRANITE_MULTIPLIERS = dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625,
                           logits_scaling=8.0)
TINY_VOCAB_SIZE = 300  # 3 specials + 256 bytes + 41 merges
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_TOKENIZER_CORPUS = [
    "the quick brown fox jumps over the lazy dog. hello world, hello loraplex!",
    "Serving many LoRA adapters of one base model: the engine batches them together.",
    "<|user|>what is the answer?<|assistant|>the answer is 42.",
]


def _model_classes(arch: str):
    from transformers import (GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM), "granite": (GraniteConfig, GraniteForCausalLM)}
    if arch not in classes:
        raise ValueError(f"arch must be one of {sorted(classes)}, got {arch!r}")
    return classes[arch]


def make_tiny_config(arch: str = "llama", *, tie_word_embeddings: bool = False, rope_scaling: dict | None = None,
                     vocab_size: int = TINY_VOCAB_SIZE, **config_overrides):
    """The transformers config object of a tiny model (Mistral: no sliding window unless given)."""
    config_cls, _ = _model_classes(arch)
    kwargs = dict(TINY_CONFIG, vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings)
    if arch == "mistral":
        kwargs["sliding_window"] = None
    if arch == "granite":   # multipliers far from 1, so a dropped or misplaced one shows
        kwargs.update(GRANITE_MULTIPLIERS)
    if rope_scaling is not None:
        kwargs["rope_scaling"] = dict(rope_scaling)
    kwargs.update(config_overrides)
    return config_cls(**kwargs)


def make_tiny_model(arch: str = "llama", *, seed: int = 0, **config_kwargs):
    """A transformers model with tiny shapes and test-friendly random weights (float32, eval mode)."""
    _, model_cls = _model_classes(arch)
    config = make_tiny_config(arch, **config_kwargs)
    torch.manual_seed(seed)
    model = model_cls(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    return model.eval()


def write_tiny_tokenizer(path: str | Path, vocab_size: int = TINY_VOCAB_SIZE, *,
                         extra_special_tokens: tuple[str, ...] = (), chat_template: str = CHAT_TEMPLATE) -> Path:
    """A byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json + special_tokens_map.json)
    that `transformers.AutoTokenizer.from_pretrained(path)` and `tokenizers.Tokenizer.from_file` load.
    extra_special_tokens (e.g. "<image>") get the ids after the trained vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_TOKENIZER_CORPUS * 4, trainer=trainer)
    if extra_special_tokens:
        tokenizer.add_special_tokens(list(extra_special_tokens))
    tokenizer.save(str(path / "tokenizer.json"))
    pad, bos, eos = SPECIAL_TOKENS
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
        # unk None: otherwise Qwen2Tokenizer adds its own <|endoftext|> beyond the model's vocab.
        "unk_token": None, "add_bos_token": False, "model_max_length": TINY_CONFIG["max_position_embeddings"],
        "chat_template": chat_template,
    }, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "pad_token": pad}, indent=2))
    return path


def make_tiny_checkpoint(path: str | Path, arch: str = "llama", *, tie_word_embeddings: bool = False,
                         rope_scaling: dict | None = None, num_shards: int = 1, dtype: torch.dtype = torch.float32,
                         seed: int = 0, vocab_size: int = TINY_VOCAB_SIZE, **config_overrides) -> Path:
    """Create `path` holding a real HF checkpoint of a tiny `arch` model, plus its tokenizer.

    num_shards > 1 splits the weights over several safetensors files with an index.
    `config_overrides` go to the transformers config (e.g. sliding_window=8 for Mistral).
    """
    path = Path(path)
    model = make_tiny_model(arch, seed=seed, tie_word_embeddings=tie_word_embeddings, rope_scaling=rope_scaling,
                            vocab_size=vocab_size, **config_overrides).to(dtype)
    save_kwargs = {}
    if num_shards > 1:
        total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        save_kwargs["max_shard_size"] = total_bytes // num_shards + 1
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    write_tiny_tokenizer(path, vocab_size=min(vocab_size, TINY_VOCAB_SIZE))
    return path
