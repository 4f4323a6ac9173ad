"""POST /tokenize and /detokenize, and GET /tokenizer_info (--enable-tokenizer-info-endpoint), as
vLLM serves them: the server's own tokenizer and chat template.

A client counts a prompt's tokens (or a conversation's, rendered exactly as
/v1/chat/completions renders it) before sending it, and turns token ids back into
text. `model`, when given, must name the base model or an adapter the server serves
(or can resolve), as on the generation routes: adapters share the base model's
tokenizer. Image and audio parts are not tokenized here: their placeholders' length
depends on the media, which only a generation request reads.
"""

from __future__ import annotations

from loraplex.server.chat import conversation_and_media, render_chat_prompt
from loraplex.server.errors import HTTPError
from loraplex.server.protocol import (
    ChatCompletionRequest, DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest)
from loraplex.server.state import ServerState


async def tokenize(request: TokenizeCompletionRequest | TokenizeChatRequest, state: ServerState) -> dict:
    backend = state.backend
    await backend.lora_request_for(request.model)          # a 404 for a name the server does not serve
    tokenizer = _tokenizer(state)
    if isinstance(request, TokenizeCompletionRequest):
        tokens = tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
    else:
        if any(m.has_media for m in request.messages):
            raise HTTPError(400, "/tokenize does not take image or audio parts (their token count depends "
                                 "on the media); send the text parts only", param="messages")
        chat = ChatCompletionRequest(
            model=request.model, messages=request.messages, add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message, add_special_tokens=request.add_special_tokens,
            documents=request.documents, chat_template_kwargs=request.chat_template_kwargs, tools=request.tools)
        conversation, _ = await conversation_and_media(chat, state)
        tokens = render_chat_prompt(tokenizer, chat, conversation)
    return {"count": len(tokens), "max_model_len": backend.max_model_len, "tokens": tokens,
            "token_strs": tokenizer.convert_ids_to_tokens(tokens) if request.return_token_strs else None}


async def detokenize(request: DetokenizeRequest, state: ServerState) -> dict:
    await state.backend.lora_request_for(request.model)
    tokenizer = _tokenizer(state)
    outside = sorted({t for t in request.tokens if t >= tokenizer.vocab_size})
    if outside:
        raise HTTPError(400, f"token ids {outside[:10]} are outside the tokenizer's vocabulary of "
                             f"{tokenizer.vocab_size} tokens", param="tokens")
    return {"prompt": tokenizer.decode(request.tokens, skip_special_tokens=False)}


def _tokenizer(state: ServerState):
    tokenizer = state.backend.tokenizer
    if tokenizer is None:
        raise HTTPError(400, "this server has no tokenizer (its model directory holds none), so it cannot "
                             "tokenize; send token ids to /v1/completions instead")
    return tokenizer


def tokenizer_info(state: ServerState) -> dict:
    """The tokenizer's configuration as vLLM's /tokenizer_info gives it: tokenizer_config.json's
    settings (file paths left out, special tokens as their text), the tokenizer's class and the
    chat template."""
    tokenizer = _tokenizer(state)
    settings = getattr(tokenizer, "config", None) or getattr(tokenizer, "init_kwargs", None) or {}
    info = {key: _plain(value) for key, value in settings.items()
            if key not in ("vocab_file", "merges_file", "tokenizer_file", "name_or_path")}
    info["tokenizer_class"] = settings.get("tokenizer_class") or type(tokenizer).__name__
    template = getattr(tokenizer, "chat_template", None)
    if template:
        info["chat_template"] = template
    return info


def _plain(value):
    """A setting as JSON: a special token (an AddedToken, or its saved form) as its text."""
    content = getattr(value, "content", None)
    if content is None and isinstance(value, dict) and isinstance(value.get("content"), str) \
            and (value.get("__type") == "AddedToken" or "special" in value or "lstrip" in value):
        content = value["content"]
    if content is not None:
        return content
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
