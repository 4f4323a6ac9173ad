"""Tokenizer: a Hugging Face checkpoint's tokenizer without transformers.

tokenizer.json is loaded with the `tokenizers` library (it holds the model,
normalizer, pre-tokenizer, post-processor and decoder). tokenizer_config.json
adds what transformers layers on top: the bos/eos tokens, add_bos_token and
the chat template, which is rendered with a sandboxed jinja2 environment set up
the way transformers sets up its own, so templates from the Hub render the same.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from loraplex.errors import ConfigError, InvalidRequestError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _token_content(value) -> str | None:
    # tokenizer_config stores special tokens as a string or as {"content": ...}.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        tokenizer_file = path / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise ConfigError(f"no {TOKENIZER_FILE} in {str(path)!r}: loraplex needs a fast "
                              f"(tokenizers-library) tokenizer saved with the checkpoint")
        self._tok = HFTokenizer.from_file(str(tokenizer_file))
        config = {}
        if (path / CONFIG_FILE).is_file():
            config = json.loads((path / CONFIG_FILE).read_text())
        self.config = config
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos_token = config.get("add_bos_token")     # None: the post-processor decides
        self.special_tokens_map = {
            key: _token_content(config.get(key))
            for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                        "mask_token")
            if _token_content(config.get(key)) is not None
        }
        added = self._tok.get_added_tokens_decoder()
        self.all_special_ids = sorted(i for i, t in added.items() if t.special)
        # Every added token (special or not) by id: what spaces_between_special_tokens separates.
        self.added_tokens = {i: t.content for i, t in added.items()}
        self.chat_template = self._read_chat_template(path, config)
        self._compiled_template = None

    @staticmethod
    def _read_chat_template(path: Path, config: dict) -> str | None:
        if (path / CHAT_TEMPLATE_FILE).is_file():
            return (path / CHAT_TEMPLATE_FILE).read_text()
        template = config.get("chat_template")
        if isinstance(template, list):   # named templates: use "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.bos_token_id is not None and self.add_bos_token is not None:
            has_bos = bool(ids) and ids[0] == self.bos_token_id
            if self.add_bos_token and not has_bos:
                ids = [self.bos_token_id] + ids
            elif not self.add_bos_token and has_bos and \
                    len(ids) > len(self._tok.encode(text, add_special_tokens=False).ids):
                ids = ids[1:]   # the post-processor added it, not the text
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str | None]:
        return [self._tok.id_to_token(i) for i in token_ids]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, chat_template: str | None = None,
                            **template_kwargs) -> str | list[int]:
        """Render a conversation as the model expects it; token ids when tokenize=True.

        The rendered text already holds the template's special tokens, so it is
        tokenized without adding BOS again.
        """
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise InvalidRequestError(
                "messages must be a list of {'role': ..., 'content': ...} dicts")
        template = self._compile(chat_template)
        try:
            text = template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **self.special_tokens_map, **template_kwargs)
        except jinja2.exceptions.TemplateError as exc:
            raise InvalidRequestError(f"the chat template rejected the messages: {exc}") from exc
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _compile(self, chat_template: str | None) -> jinja2.Template:
        source = chat_template or self.chat_template
        if source is None:
            raise InvalidRequestError(
                "this model's tokenizer has no chat_template (tokenizer_config.json or "
                "chat_template.jinja); use generate() with a formatted prompt, or pass chat_template=")
        if chat_template is None and self._compiled_template is not None:
            return self._compiled_template
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            compiled = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise InvalidRequestError(f"the chat template does not parse: {exc}") from exc
        if chat_template is None:
            self._compiled_template = compiled
        return compiled


def load_tokenizer(model_path: str | Path) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None when it ships without tokenizer.json."""
    if not (Path(model_path) / TOKENIZER_FILE).is_file():
        return None
    return Tokenizer(model_path)
