"""Pieces of OpenAI response bodies shared by completions and chat: ids, usage,
logprobs in both of OpenAI's formats, and server-sent-event framing."""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any

from loraplex.server.generation import PromptRun

DONE_EVENT = b"data: [DONE]\n\n"


def new_id(prefix: str, sep: str = "-") -> str:
    return f"{prefix}{sep}{uuid.uuid4().hex}"


def request_id_for(prefix: str, request: Any, raw: Any, sep: str = "-") -> str:
    """The response id, as vLLM makes it: the X-Request-Id header, else the body's request_id,
    else a random one, after `prefix` and `sep` (OpenAI's Responses ids use "_": resp_...)."""
    header = raw.headers.get("x-request-id") if raw is not None else None
    chosen = header or getattr(request, "request_id", None)
    return f"{prefix}{sep}{chosen}" if chosen else new_id(prefix, sep)


def now() -> int:
    return int(time.time())


def sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def stream_usage(stream_options, force: bool) -> tuple[bool, bool]:
    """(a usage chunk at the end, usage in every chunk) of a stream: what stream_options asks,
    or both with --enable-force-include-usage (vLLM's rule)."""
    if force:
        return True, True
    include = bool(stream_options and stream_options.include_usage)
    return include, bool(include and stream_options.continuous_usage_stats)


def usage(runs: list[PromptRun]) -> dict:
    prompt = sum(len(r.prompt_token_ids) for r in runs)
    completion = sum(r.num_output_tokens for r in runs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finite(value: float) -> float:
    # JSON has no -inf; a token with probability 0 gets the most negative float instead.
    return value if math.isfinite(value) else -9999.0


class TokenText:
    """Token id -> its text, preferring the text the engine already decoded; with as_token_ids
    (vLLM's return_tokens_as_token_ids) "token_id:{id}", which any token can be named by."""

    def __init__(self, tokenizer: Any, as_token_ids: bool = False) -> None:
        self.tokenizer = tokenizer
        self.as_token_ids = as_token_ids

    def __call__(self, token_id: int, logprob: Any = None) -> str:
        if self.as_token_ids:
            return f"token_id:{token_id}"
        decoded = getattr(logprob, "decoded_token", None)
        if decoded is not None:
            return decoded
        if self.tokenizer is None:
            return f"<{token_id}>"
        return self.tokenizer.decode([token_id])


def _value(logprob: Any) -> float:
    return float(getattr(logprob, "logprob", logprob))


def _ranked(entry: dict, limit: int) -> list[tuple[int, Any]]:
    """The `limit` most likely entries of one position, most likely first."""
    return sorted(entry.items(), key=lambda kv: -_value(kv[1]))[:limit]


class CompletionLogprobs:
    """Accumulates /v1/completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, token_text: TokenText, num_top: int, start_offset: int = 0) -> None:
        self.token_text = token_text
        self.num_top = num_top
        self.offset = start_offset

    def block(self, token_ids: list[int], entries: list[dict | None] | None) -> dict:
        """entries[i]: the logprobs of token_ids[i]; None for a prompt's first token (no top_logprobs)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, token_id in enumerate(token_ids):
            if entries and i < len(entries) and entries[i] is None:
                text = self.token_text(token_id)
                out["tokens"].append(text)
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                out["text_offset"].append(self.offset)
                self.offset += len(text)
                continue
            entry = entries[i] if entries and i < len(entries) else {}
            text = self.token_text(token_id, entry.get(token_id))
            out["tokens"].append(text)
            out["token_logprobs"].append(_finite(_value(entry[token_id])) if token_id in entry else None)
            # vLLM's rule: the top k, plus the sampled token when it is not among them. The
            # sampled token goes first so it keeps its own value when two tokens decode alike.
            top = {text: _finite(_value(entry[token_id]))} if token_id in entry else {}
            for t, lp in _ranked(entry, self.num_top):
                top.setdefault(self.token_text(t, lp), _finite(_value(lp)))
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out

    @staticmethod
    def extend(total: dict | None, block: dict) -> dict:
        if total is None:
            return {k: list(v) for k, v in block.items()}
        for key, values in block.items():
            total[key].extend(values)
        return total


def prompt_logprobs_body(entries: list | None) -> list | None:
    """vLLM's prompt_logprobs in a response: per prompt token None (the first) or {token id:
    {"logprob", "rank", "decoded_token"}}, -inf as -9999.0."""
    if entries is None:
        return None
    return [None if entry is None else
            {str(t): {"logprob": _finite(_value(lp)), "rank": getattr(lp, "rank", None),
                      "decoded_token": getattr(lp, "decoded_token", None)} for t, lp in entry.items()}
            for entry in entries]


def chat_logprobs(token_text: TokenText, token_ids: list[int], entries: list[dict] | None,
                  num_top: int) -> dict:
    """Chat's format: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    content = []
    for i, token_id in enumerate(token_ids):
        entry = entries[i] if entries and i < len(entries) else {}
        text = token_text(token_id, entry.get(token_id))
        top = [{"token": (t_text := token_text(t, lp)), "logprob": _finite(_value(lp)),
                "bytes": list(t_text.encode("utf-8"))} for t, lp in _ranked(entry, num_top)]
        value = _finite(_value(entry[token_id])) if token_id in entry else -9999.0
        content.append({"token": text, "logprob": value, "bytes": list(text.encode("utf-8")),
                        "top_logprobs": top})
    return {"content": content}
