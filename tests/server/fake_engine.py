"""A small deterministic engine for testing the HTTP layer in isolation.

Tokens are characters (id = code point). Each model (base or adapter) writes a
different, predictable letter sequence, so tests can tell which adapter served a
request without a neural network. The real-engine tests live beside this file.
"""

from __future__ import annotations

import asyncio

from loraplex.core.outputs import CompletionOutput, Logprob, RequestOutput
from loraplex.core.sampling_params import RequestOutputKind
from loraplex.errors import AdapterCapacityError, EngineDeadError, InvalidRequestError
from loraplex.lora_request import LoRARequest
from loraplex.resolvers.validation import validate_adapter_dir

EOS_ID = 0


class CharTokenizer:
    eos_token_id = EOS_ID

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids if i != EOS_ID)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, **kwargs):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<assistant>"
        return self.encode(text) if tokenize else text


def expected_text(model_offset: int, prompt_ids: list[int], num_tokens: int, sample: int = 0) -> str:
    """What the fake engine writes: letters walking from a start that depends on the
    prompt, the model and the sample index."""
    start = (sum(prompt_ids) + model_offset + 7 * sample) % 26
    return "".join(chr(ord("a") + (start + i) % 26) for i in range(num_tokens))


def model_offset(lora_request: LoRARequest | None) -> int:
    return 0 if lora_request is None else 1 + sum(map(ord, lora_request.lora_name)) % 25


class _Sent:
    """How much of one sample earlier delta outputs handed out."""

    def __init__(self) -> None:
        self.chars = self.tokens = 0
        self.finished = False

    def delta(self, out: CompletionOutput) -> CompletionOutput | None:
        new = CompletionOutput(out.index, out.text[self.chars:], out.token_ids[self.tokens:], None,
                               out.logprobs[self.tokens:len(out.token_ids)] if out.logprobs is not None else None,
                               out.finish_reason)
        if not (new.text or new.token_ids or (out.finish_reason and not self.finished)):
            return None
        self.chars, self.tokens = max(self.chars, len(out.text)), max(self.tokens, len(out.token_ids))
        self.finished = out.finish_reason is not None
        return new


class FakeEngine:
    def __init__(self, *, step_delay_s: float = 0.0, max_model_len: int = 512) -> None:
        self.tokenizer = CharTokenizer()
        self.step_delay_s = step_delay_s
        self.max_model_len = max_model_len
        self.loras: dict[int, LoRARequest] = {}
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.started: list[str] = []
        self.seen_lora: dict[str, str | None] = {}
        self.is_running = True

    def add_lora(self, request: LoRARequest) -> bool:
        validate_adapter_dir(request.lora_path)
        new = request.lora_int_id not in self.loras
        self.loras[request.lora_int_id] = request
        return new

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.loras.pop(lora_int_id, None) is not None

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def engine_stats(self) -> dict:
        return {"num_requests_running": 0, "num_requests_waiting": 0, "kv_cache_usage_perc": 0.0,
                "lora_cache_hits_total{tier=cpu}": 3, "lora_cache_hits_total{tier=device}": 5}

    async def generate(self, prompt, params, request_id, lora_request=None):
        if not self.is_running:
            raise EngineDeadError("the engine stopped: RuntimeError('boom'); restart it")
        if isinstance(prompt, dict):                  # {"prompt" | "prompt_token_ids": ..., "cache_salt": ...}
            prompt = prompt.get("prompt_token_ids") or prompt["prompt"]
        if prompt in ("all slots pinned", self.tokenizer.encode("all slots pinned")):
            raise AdapterCapacityError("all 2 device slots hold pinned adapters; unpin one")
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if len(prompt_ids) + (params.max_tokens or 0) > self.max_model_len:
            raise InvalidRequestError(f"prompt of {len(prompt_ids)} tokens plus max_tokens "
                                      f"{params.max_tokens} exceeds max_model_len {self.max_model_len}")
        self.started.append(request_id)
        self.seen_lora[request_id] = lora_request.lora_name if lora_request else None
        offset = model_offset(lora_request)
        full = [expected_text(offset, prompt_ids, params.max_tokens, s) for s in range(params.n)]
        texts = [""] * params.n
        reasons: list[str | None] = [None] * params.n
        logprobs: list[list] = [[] for _ in range(params.n)]
        sent = [_Sent() for _ in range(params.n)]
        for step in range(params.max_tokens):
            await asyncio.sleep(self.step_delay_s)
            for s in range(params.n):
                if reasons[s] is not None:
                    continue
                texts[s] += full[s][step]
                tok = ord(full[s][step])
                entry = {tok: Logprob(-0.5, 1, chr(tok))}
                for k in range(params.logprobs or 0):
                    other = ord("A") + k
                    entry[other] = Logprob(-2.0 - k, k + 2, chr(other))
                logprobs[s].append(entry)
                hit = next((x for x in params.stop_strings if texts[s].endswith(x)), None)
                if hit is not None:
                    texts[s] = texts[s][: -len(hit)]
                    reasons[s] = "stop"
                elif step + 1 == params.max_tokens:
                    reasons[s] = "length"
            outputs = [CompletionOutput(s, texts[s], [ord(c) for c in texts[s]], None,
                                        logprobs[s] if params.logprobs is not None else None,
                                        reasons[s]) for s in range(params.n)]
            if params.output_kind == RequestOutputKind.DELTA:   # what the server asks for
                outputs = [d for d in (sent[s].delta(out) for s, out in enumerate(outputs)) if d is not None]
            done = all(r is not None for r in reasons)
            yield RequestOutput(request_id, prompt if isinstance(prompt, str) else None,
                                prompt_ids, outputs, done)
            if done:
                self.finished.append(request_id)
                return
