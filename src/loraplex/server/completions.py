"""POST /v1/completions: one engine request per prompt of the batch, merged into one response."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from loraplex.server.disconnect import unless_disconnected
from loraplex.server.errors import HTTPError, exception_to_body
from loraplex.server.generation import PromptRun, merge, run_prompt, start_stream, with_cache_salt
from loraplex.server.protocol import CompletionRequest, check_unsupported, unknown_fields
from loraplex.server.responses import (
    DONE_EVENT, CompletionLogprobs, TokenText, new_id, now, prompt_logprobs_body, request_id_for, sse, stream_usage,
    usage)
from loraplex.server.sampling import completion_sampling_params, kept_prompt_tokens, output_room
from loraplex.server.state import ServerState


def normalize_prompts(prompt) -> list[str | list[int]]:
    """The four prompt forms as a list of prompts (a string or a token-id list each)."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise HTTPError(400, "prompt is empty; give a string, a list of strings, a list of token "
                             "ids or a list of token-id lists", param="prompt")
    for p in prompts:
        if len(p) == 0:
            raise HTTPError(400, "a prompt is empty; every prompt needs at least one character "
                                 "or token", param="prompt")
    return prompts


def engine_prompt(prompt: str | list[int], tokenizer, add_special_tokens: bool):
    """What the engine gets for one prompt: text is tokenized here (with BOS unless
    add_special_tokens is false), in the process the engine's input processor would have
    done it in, so that the prompt's length is known before the request is sent."""
    if not isinstance(prompt, str) or tokenizer is None:
        return prompt
    # With special tokens, the call the input processor makes.
    ids = tokenizer.encode(prompt) if add_special_tokens else tokenizer.encode(prompt, add_special_tokens=False)
    return {"prompt": prompt, "prompt_token_ids": ids}


def check_fits(request: CompletionRequest, prompts: list, max_model_len: int | None) -> None:
    """A 400 for a max_tokens that some prompt leaves no room for, as vLLM's server answers
    (the engine would stop each such choice at max_model_len instead)."""
    if max_model_len is None:
        return
    for prompt in prompts:
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else prompt
        if isinstance(ids, list):      # text without a tokenizer: the engine refuses it anyway
            output_room(request.max_tokens, kept_prompt_tokens(len(ids), request, max_model_len),
                        max_model_len, prompt_param="prompt")


async def create_completion(request: CompletionRequest, raw: Request, state: ServerState):
    check_unsupported(request)
    unknown_fields(request)
    backend = state.backend
    lora_request = await backend.lora_request_for(request.model)
    model_name = backend.response_model_name(request.model, lora_request)
    prompts = normalize_prompts(request.prompt)
    params = completion_sampling_params(request, defaults=state.request_defaults)
    request_id = request_id_for("cmpl", request, raw)
    n = request.n or 1
    # Engine ids of their own: a request_id a client reuses must not clash in the engine.
    runs = [PromptRun(i, new_id(f"{request_id}-{i}")) for i in range(len(prompts))]
    engine_prompts = [engine_prompt(prompt, backend.tokenizer, request.add_special_tokens) for prompt in prompts]
    check_fits(request, engine_prompts, backend.max_model_len)
    streams = [run_prompt(backend, run, with_cache_salt(prompt, request.cache_salt), params, lora_request, n)
               for run, prompt in zip(runs, engine_prompts)]
    ctx = _Context(request, state, model_name, request_id, runs, prompts)
    if request.stream:
        try:
            first = await start_stream(merge(streams), lambda coro: unless_disconnected(coro, raw))
        except BaseException:
            ctx.observe()
            raise
        return StreamingResponse(ctx.stream(first), media_type="text/event-stream")
    try:
        body = await unless_disconnected(ctx.collect(merge(streams)), raw)
    finally:
        ctx.observe()
    return JSONResponse(body)


class _Context:
    def __init__(self, request: CompletionRequest, state: ServerState, model_name: str,
                 request_id: str, runs: list[PromptRun], prompts: list) -> None:
        self.request, self.state, self.model_name = request, state, model_name
        self.request_id, self.runs, self.prompts = request_id, runs, prompts
        self.created = now()
        self.token_text = TokenText(state.backend.tokenizer, state.return_tokens_as_token_ids
                                    if request.return_tokens_as_token_ids is None else request.return_tokens_as_token_ids)
        self.logprobs: dict[int, CompletionLogprobs] = {}
        self.started: set[int] = set()

    def observe(self) -> None:
        for run in self.runs:
            self.state.metrics.observe_prompt_run(self.model_name, run)

    def _echo(self, prompt_index: int) -> str:
        prompt = self.prompts[prompt_index]
        if isinstance(prompt, str):
            return prompt
        return self.runs[prompt_index].prompt or self.state.backend.tokenizer.decode(prompt)

    def _choice_piece(self, delta) -> tuple[str, dict | None, bool]:
        """(text, logprobs block, first piece of its choice); with echo the first piece starts with
        the prompt, and its logprobs with the prompt's (vLLM's echo)."""
        text = delta.text
        first = delta.index not in self.started
        self.started.add(delta.index)
        run = self.runs[delta.prompt_index]
        if self.request.echo and first:
            text = self._echo(delta.prompt_index) + text
        block = None
        if self.request.logprobs is not None:
            lp = self.logprobs.setdefault(delta.index, CompletionLogprobs(self.token_text, self.request.logprobs))
            if self.request.echo and first:
                block = lp.block(run.prompt_token_ids, run.prompt_logprobs)
                block = CompletionLogprobs.extend(block, lp.block(delta.token_ids, delta.logprobs))
            else:
                block = lp.block(delta.token_ids, delta.logprobs)
        return text, block, first

    def _extras(self, choice: dict, delta, first: bool) -> None:
        """vLLM's extra choice fields: token ids (return_token_ids) and prompt_logprobs."""
        run = self.runs[delta.prompt_index]
        if self.request.return_token_ids:
            choice["token_ids"] = choice.get("token_ids", []) + list(delta.token_ids) if not self.request.stream \
                else list(delta.token_ids)
            if first:
                choice["prompt_token_ids"] = list(run.prompt_token_ids)
        if self.request.prompt_logprobs is not None and first:
            choice["prompt_logprobs"] = prompt_logprobs_body(run.prompt_logprobs)

    async def collect(self, deltas: AsyncIterator) -> dict:
        choices: dict[int, dict] = {}
        async for delta in deltas:
            text, block, first = self._choice_piece(delta)
            choice = choices.setdefault(delta.index, {"index": delta.index, "text": "", "logprobs": None,
                                                      "finish_reason": None, "stop_reason": None})
            self._extras(choice, delta, first)
            choice["text"] += text
            if block is not None:
                choice["logprobs"] = CompletionLogprobs.extend(choice["logprobs"], block)
            if delta.finish_reason is not None:
                choice["finish_reason"], choice["stop_reason"] = delta.finish_reason, delta.stop_reason
        return {"id": self.request_id, "object": "text_completion", "created": self.created,
                "model": self.model_name, "choices": [choices[i] for i in sorted(choices)],
                "usage": usage(self.runs), "system_fingerprint": None}

    async def stream(self, deltas: AsyncIterator) -> AsyncIterator[bytes]:
        include_usage, continuous = stream_usage(self.request.stream_options, self.state.http.force_include_usage)
        try:
            async for delta in deltas:
                text, block, first = self._choice_piece(delta)
                choice = {"index": delta.index, "text": text, "logprobs": block,
                          "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}
                self._extras(choice, delta, first)
                chunk = {"id": self.request_id, "object": "text_completion", "created": self.created,
                         "model": self.model_name, "choices": [choice]}
                if continuous:
                    chunk["usage"] = usage(self.runs)
                yield sse(chunk)
            if include_usage:
                yield sse({"id": self.request_id, "object": "text_completion", "created": self.created,
                           "model": self.model_name, "choices": [], "usage": usage(self.runs)})
        except Exception as e:   # the status line is sent: report the error in the stream
            yield sse(exception_to_body(e)[1])
        finally:
            await deltas.aclose()
            self.observe()
        yield DONE_EVENT
