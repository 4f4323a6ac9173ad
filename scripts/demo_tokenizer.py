"""The demo's byte-level tokenizer, written as standard Hugging Face tokenizer files.

Every UTF-8 byte is one token (a BPE with the 256 ByteLevel symbols and no merges),
so reversing or upper-casing a string is a token-level operation the tiny model can
learn. Ids: 0 <pad>, 1 <s> (BOS, added by the post-processor), 2 </s> (EOS),
3 + b for byte b.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
NUM_SPECIAL = len(SPECIAL_TOKENS)
VOCAB_SIZE = NUM_SPECIAL + 256
MODEL_MAX_LENGTH = 256

# Single-turn: the prompt is built from the last user message; system and earlier
# turns are ignored. OpenAI-style content parts are joined.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(input='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if message['content'] is string -%}{%- set ns.input = message['content'] -%}"
    "{%- else -%}{%- set ns.input = '' -%}"
    "{%- for part in message['content'] -%}{%- if part['type'] == 'text' -%}"
    "{%- set ns.input = ns.input + part['text'] -%}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{ bos_token }}Input: {{ ns.input }}\nOutput: "
)


def build_tokenizer() -> Tokenizer:
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of_symbol)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({symbol: NUM_SPECIAL + i for i, symbol in enumerate(byte_symbols)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS))])
    return tokenizer


def _byte_of_symbol(symbol: str) -> int:
    # ByteLevel maps printable bytes to themselves and the rest to U+0100.. in byte order.
    return _SYMBOL_TO_BYTE[symbol]


def _bytes_to_unicode() -> dict[int, str]:
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_SYMBOL_TO_BYTE = {symbol: b for b, symbol in _bytes_to_unicode().items()}


def save_tokenizer_files(tokenizer: Tokenizer, out_dir: Path) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json in `out_dir`."""
    tokenizer.save(str(out_dir / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
