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


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def usage(runs: list[PromptRun]) -> dict:
    prompt = sum(len(r.prompt_token_ids) for r in runs)
    completion = sum(r.num_output_tokens for r in runs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finite(value: float) -> float:
    # JSON has no -inf; a token with probability 0 gets the most negative float instead.
    return value if math.isfinite(value) else -9999.0


class TokenText:
    """Token id -> its text, preferring the text the engine already decoded."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, token_id: int, logprob: Any = None) -> str:
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

    def block(self, token_ids: list[int], entries: list[dict] | None) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, token_id in enumerate(token_ids):
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
