"""POST /v1/chat/completions: the tokenizer's chat template, then one engine request.

Image and audio content parts, and default LoRAs per modality, go through server/multimodal.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NamedTuple

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from loraplex.server.disconnect import unless_disconnected
from loraplex.server.errors import HTTPError, exception_to_body
from loraplex.server.generation import PromptRun, run_prompt, start_stream, with_cache_salt
from loraplex.server.protocol import ChatCompletionRequest, check_unsupported, unknown_fields
from loraplex.server.responses import (
    DONE_EVENT, TokenText, chat_logprobs, new_id, now, prompt_logprobs_body, request_id_for, sse, stream_usage,
    usage)
from loraplex.server.sampling import chat_sampling_params, kept_prompt_tokens
from loraplex.server.state import ServerState


def template_kwargs(request: ChatCompletionRequest) -> dict:
    """What the chat template sees besides the messages: vLLM's documents, tools (with tool_choice
    "none"), reasoning_effort (and enable_thinking from it), and chat_template_kwargs."""
    kwargs = dict(request.chat_template_kwargs or {})
    if "chat_template" in kwargs:
        raise HTTPError(400, "chat_template_kwargs may not set chat_template: the server does not trust chat "
                             "templates sent with requests", param="chat_template_kwargs")
    extras = {"documents": request.documents, "tools": request.tools, "reasoning_effort": request.reasoning_effort}
    for key, value in extras.items():
        if value is not None:
            kwargs.setdefault(key, value)
    if request.reasoning_effort is not None:
        kwargs.setdefault("enable_thinking", request.reasoning_effort != "none")
    return kwargs


def render_chat_prompt(tokenizer, request: ChatCompletionRequest, conversation: list[dict] | None = None,
                       *, as_text: bool = False) -> list[int] | str:
    """Token ids of the conversation after the model's chat template (its text with as_text)."""
    if request.continue_final_message and (request.add_generation_prompt
                                           or request.messages[-1].role != "assistant"):
        raise HTTPError(400, "continue_final_message needs add_generation_prompt=false and a final "
                             "assistant message", param="continue_final_message")
    if conversation is None:
        conversation = [{"role": m.role, "content": m.text()} for m in request.messages]
    # add_special_tokens (vLLM's, off by default: the template adds them) tokenizes the text here.
    tokenize = not as_text and not request.add_special_tokens
    kwargs = {"add_generation_prompt": request.add_generation_prompt, "tokenize": tokenize,
              **template_kwargs(request)}
    if request.continue_final_message:
        kwargs["continue_final_message"] = True
    try:
        ids = tokenizer.apply_chat_template(conversation, **kwargs)
    except (ValueError, TypeError, KeyError) as e:
        raise HTTPError(400, f"the chat template could not render these messages ({e}); check the "
                             f"roles and order, or use /v1/completions with a plain prompt",
                        param="messages") from e
    except Exception as e:   # jinja2's TemplateError (e.g. raise_exception in the template)
        if type(e).__module__.startswith("jinja2"):
            raise HTTPError(400, f"the chat template rejected these messages: {e}",
                            param="messages") from e
        raise
    if as_text:
        return ids
    if not tokenize:
        return list(tokenizer.encode(ids, add_special_tokens=True))
    if hasattr(ids, "keys") and "input_ids" in ids:   # transformers' BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


async def create_chat_completion(request: ChatCompletionRequest, raw: Request, state: ServerState):
    check_unsupported(request)
    unknown_fields(request)
    backend = state.backend
    lora_request = await backend.lora_request_for(request.model)
    model_name = backend.response_model_name(request.model, lora_request)
    chat = await engine_prompt(request, state, lora_request)
    params = chat_sampling_params(request, chat.num_prompt_tokens, backend.max_model_len,
                                  defaults=state.request_defaults)
    response_id = request_id_for("chatcmpl", request, raw)
    run = PromptRun(0, new_id(response_id))   # an engine id of its own: a reused request_id must not clash
    deltas = run_prompt(backend, run, chat.prompt, params, chat.lora_request, request.n or 1)
    ctx = _ChatContext(request, state, model_name, run, response_id, chat.prompt_text)
    return await respond(ctx, deltas, bool(request.stream), raw, state)


class EnginePrompt(NamedTuple):
    prompt: Any                          # token ids, or a dict with multi_modal_data and/or cache_salt
    num_prompt_tokens: int               # as the engine will count them (truncation, media expanded)
    lora_request: Any                    # the named adapter, else a modality's default one, else None
    prompt_text: str | None              # the rendered text, with return_prompt_text


async def engine_prompt(request: ChatCompletionRequest, state: ServerState, lora_request) -> EnginePrompt:
    """The engine prompt of a chat request: its messages through the chat template, with their
    images and audio (server/multimodal.py) and the default adapter of their modality."""
    backend = state.backend
    conversation, mm_data = await conversation_and_media(request, state)
    prompt_ids = render_chat_prompt(backend.tokenizer, request, conversation)
    prompt_text = render_chat_prompt(backend.tokenizer, request, conversation, as_text=True) \
        if request.return_prompt_text else None
    num_prompt_tokens = kept_prompt_tokens(len(prompt_ids), request, backend.max_model_len)
    prompt = prompt_ids
    if mm_data:
        num_prompt_tokens = state.multimodal.num_prompt_tokens(prompt_ids, mm_data)
        prompt = {"prompt_token_ids": prompt_ids, "multi_modal_data": mm_data}
        if lora_request is None:   # no adapter named: the default one of the prompt's modality, if any
            lora_request = await state.multimodal.default_lora(backend, mm_data.keys())
    return EnginePrompt(with_cache_salt(prompt, request.cache_salt), num_prompt_tokens, lora_request, prompt_text)


async def respond(ctx, deltas: AsyncIterator, stream: bool, raw: Request, state: ServerState):
    """The HTTP answer of one engine request (ctx.run) under ctx.model_name: ctx.stream's events
    once the first output is there, or ctx.collect's body; its metrics recorded once either way
    (ctx.stream records them when the stream ends)."""
    if stream:
        try:
            first = await start_stream(deltas, lambda coro: unless_disconnected(coro, raw))
        except BaseException:
            state.metrics.observe_prompt_run(ctx.model_name, ctx.run)
            raise
        return StreamingResponse(ctx.stream(first), media_type="text/event-stream")
    try:
        body = await unless_disconnected(ctx.collect(deltas), raw)
    finally:
        state.metrics.observe_prompt_run(ctx.model_name, ctx.run)
    return JSONResponse(body)


async def conversation_and_media(request: ChatCompletionRequest,
                                 state: ServerState) -> tuple[list[dict] | None, dict]:
    """The conversation for the template and multi_modal_data, when media or a multimodal model are involved."""
    multimodal = state.multimodal
    if not any(m.has_media for m in request.messages) and (multimodal is None or not multimodal.placeholders):
        return None, {}
    if multimodal is None:
        raise HTTPError(400, "this server takes text only; remove the image and audio content parts",
                        param="messages")
    template = getattr(state.backend.tokenizer, "chat_template", None)
    return await multimodal.parse([m.template_message() for m in request.messages], template)


class _ChatContext:
    def __init__(self, request: ChatCompletionRequest, state: ServerState, model_name: str,
                 run: PromptRun, response_id: str, prompt_text: str | None = None) -> None:
        self.request, self.state, self.model_name, self.run = request, state, model_name, run
        self.response_id = response_id
        self.prompt_text = prompt_text
        self.created = now()
        self.token_text = TokenText(state.backend.tokenizer, state.return_tokens_as_token_ids
                                    if request.return_tokens_as_token_ids is None else request.return_tokens_as_token_ids)
        # vLLM's echo: a final assistant message is repeated at the start of each answer.
        last = request.messages[-1]
        self.echo_text = last.text() if request.echo and last.role == "assistant" else ""
        # The answer's role (vLLM's rule): --response-role after a generation prompt, else the
        # role of the message the answer continues.
        self.role = state.response_role if request.add_generation_prompt else last.role

    def _logprobs(self, delta) -> dict | None:
        if not self.request.logprobs:
            return None
        return chat_logprobs(self.token_text, delta.token_ids, delta.logprobs,
                             self.request.top_logprobs or 0)

    def _chunk(self, choices: list[dict]) -> dict:
        return {"id": self.response_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model_name, "choices": choices}

    async def collect(self, deltas: AsyncIterator) -> dict:
        choices: dict[int, dict] = {}
        async for delta in deltas:
            choice = choices.setdefault(delta.index, {
                "index": delta.index, "message": {"role": self.role, "content": self.echo_text},
                "logprobs": {"content": []} if self.request.logprobs else None,
                "finish_reason": None, "stop_reason": None})
            choice["message"]["content"] += delta.text
            if self.request.return_token_ids:
                choice["token_ids"] = choice.get("token_ids", []) + list(delta.token_ids)
            block = self._logprobs(delta)
            if block is not None:
                choice["logprobs"]["content"].extend(block["content"])
            if delta.finish_reason is not None:
                choice["finish_reason"], choice["stop_reason"] = delta.finish_reason, delta.stop_reason
        body = {"id": self.response_id, "object": "chat.completion", "created": self.created,
                "model": self.model_name, "choices": [choices[i] for i in sorted(choices)],
                "usage": usage([self.run]), "system_fingerprint": None}
        body.update(self._prompt_extras())
        return body

    def _prompt_extras(self) -> dict:
        """vLLM's top-level extras: prompt_token_ids, prompt_logprobs, prompt_text, when asked for."""
        extras = {}
        if self.request.return_token_ids:
            extras["prompt_token_ids"] = list(self.run.prompt_token_ids)
        if self.request.prompt_logprobs is not None:
            extras["prompt_logprobs"] = prompt_logprobs_body(self.run.prompt_logprobs)
        if self.prompt_text is not None:
            extras["prompt_text"] = self.prompt_text
        return extras

    async def stream(self, deltas: AsyncIterator) -> AsyncIterator[bytes]:
        include_usage, continuous = stream_usage(self.request.stream_options, self.state.http.force_include_usage)
        started: set[int] = set()
        try:
            async for delta in deltas:
                if delta.index not in started:   # OpenAI sends the role first, once per choice
                    first_chunk = self._chunk([{"index": delta.index, "delta": {"role": self.role, "content": ""},
                                                "logprobs": None, "finish_reason": None}])
                    if not started:
                        first_chunk.update(self._prompt_extras())
                    started.add(delta.index)
                    yield sse(first_chunk)
                    if self.echo_text:
                        yield sse(self._chunk([{"index": delta.index, "delta": {"content": self.echo_text},
                                                "logprobs": None, "finish_reason": None}]))
                choice = {"index": delta.index, "delta": {"content": delta.text},
                          "logprobs": self._logprobs(delta), "finish_reason": delta.finish_reason,
                          "stop_reason": delta.stop_reason}
                if self.request.return_token_ids:
                    choice["token_ids"] = list(delta.token_ids)
                chunk = self._chunk([choice])
                if continuous:
                    chunk["usage"] = usage([self.run])
                yield sse(chunk)
            if include_usage:
                yield sse({**self._chunk([]), "usage": usage([self.run])})
        except Exception as e:   # the status line is sent: report the error in the stream
            yield sse(exception_to_body(e)[1])
        finally:
            await deltas.aclose()
            self.state.metrics.observe_prompt_run(self.model_name, self.run)
        yield DONE_EVENT
