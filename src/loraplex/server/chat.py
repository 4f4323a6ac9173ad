"""POST /v1/chat/completions: the tokenizer's chat template, then one engine request.

Image and audio content parts, and default LoRAs per modality, go through server/multimodal.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from loraplex.server.disconnect import unless_disconnected
from loraplex.server.errors import HTTPError, exception_to_body
from loraplex.server.generation import PromptRun, run_prompt, start_stream
from loraplex.server.protocol import ChatCompletionRequest
from loraplex.server.responses import DONE_EVENT, TokenText, chat_logprobs, new_id, now, sse, usage
from loraplex.server.sampling import chat_sampling_params
from loraplex.server.state import ServerState


def render_chat_prompt(tokenizer, request: ChatCompletionRequest, conversation: list[dict] | None = None) -> list[int]:
    """Token ids of the conversation after the model's chat template."""
    if request.continue_final_message and (request.add_generation_prompt
                                           or request.messages[-1].role != "assistant"):
        raise HTTPError(400, "continue_final_message needs add_generation_prompt=false and a final "
                             "assistant message", param="continue_final_message")
    if conversation is None:
        conversation = [{"role": m.role, "content": m.text()} for m in request.messages]
    kwargs = {"add_generation_prompt": request.add_generation_prompt, "tokenize": True}
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
    if hasattr(ids, "keys") and "input_ids" in ids:   # transformers' BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


async def create_chat_completion(request: ChatCompletionRequest, raw: Request, state: ServerState):
    backend = state.backend
    lora_request = await backend.lora_request_for(request.model)
    model_name = backend.response_model_name(request.model, lora_request)
    conversation, mm_data = await _media(request, state)
    prompt_ids = render_chat_prompt(backend.tokenizer, request, conversation)
    num_prompt_tokens = len(prompt_ids)
    prompt = prompt_ids
    if mm_data:
        num_prompt_tokens = state.multimodal.num_prompt_tokens(prompt_ids, mm_data)
        prompt = {"prompt_token_ids": prompt_ids, "multi_modal_data": mm_data}
        if lora_request is None:   # no adapter named: the default one of the prompt's modality, if any
            lora_request = state.multimodal.default_lora(backend, mm_data.keys())
    params = chat_sampling_params(request, num_prompt_tokens, backend.max_model_len)
    request_id = new_id("chatcmpl")
    run = PromptRun(0, request_id)
    deltas = run_prompt(backend, run, prompt, params, lora_request, request.n)
    ctx = _ChatContext(request, state, model_name, run)
    if request.stream:
        try:
            first = await start_stream(deltas, lambda coro: unless_disconnected(coro, raw))
        except BaseException:
            state.metrics.observe_prompt_run(model_name, run)
            raise
        return StreamingResponse(ctx.stream(first), media_type="text/event-stream")
    try:
        body = await unless_disconnected(ctx.collect(deltas), raw)
    finally:
        state.metrics.observe_prompt_run(model_name, run)
    return JSONResponse(body)


async def _media(request: ChatCompletionRequest, state: ServerState) -> tuple[list[dict] | None, dict]:
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
                 run: PromptRun) -> None:
        self.request, self.state, self.model_name, self.run = request, state, model_name, run
        self.created = now()
        self.token_text = TokenText(state.backend.tokenizer)
        # vLLM's echo: a final assistant message is repeated at the start of each answer.
        last = request.messages[-1]
        self.echo_text = last.text() if request.echo and last.role == "assistant" else ""

    def _logprobs(self, delta) -> dict | None:
        if not self.request.logprobs:
            return None
        return chat_logprobs(self.token_text, delta.token_ids, delta.logprobs,
                             self.request.top_logprobs or 0)

    def _chunk(self, choices: list[dict]) -> dict:
        return {"id": self.run.request_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model_name, "choices": choices}

    async def collect(self, deltas: AsyncIterator) -> dict:
        choices: dict[int, dict] = {}
        async for delta in deltas:
            choice = choices.setdefault(delta.index, {
                "index": delta.index, "message": {"role": "assistant", "content": self.echo_text},
                "logprobs": {"content": []} if self.request.logprobs else None,
                "finish_reason": None, "stop_reason": None})
            choice["message"]["content"] += delta.text
            block = self._logprobs(delta)
            if block is not None:
                choice["logprobs"]["content"].extend(block["content"])
            if delta.finish_reason is not None:
                choice["finish_reason"], choice["stop_reason"] = delta.finish_reason, delta.stop_reason
        return {"id": self.run.request_id, "object": "chat.completion", "created": self.created,
                "model": self.model_name, "choices": [choices[i] for i in sorted(choices)],
                "usage": usage([self.run]), "system_fingerprint": None}

    async def stream(self, deltas: AsyncIterator) -> AsyncIterator[bytes]:
        options = self.request.stream_options
        include_usage = bool(options and options.include_usage)
        continuous = bool(include_usage and options.continuous_usage_stats)
        started: set[int] = set()
        try:
            async for delta in deltas:
                if delta.index not in started:   # OpenAI sends the role first, once per choice
                    started.add(delta.index)
                    yield sse(self._chunk([{"index": delta.index, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]))
                    if self.echo_text:
                        yield sse(self._chunk([{"index": delta.index, "delta": {"content": self.echo_text},
                                                "logprobs": None, "finish_reason": None}]))
                chunk = self._chunk([{"index": delta.index, "delta": {"content": delta.text},
                                      "logprobs": self._logprobs(delta),
                                      "finish_reason": delta.finish_reason,
                                      "stop_reason": delta.stop_reason}])
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
