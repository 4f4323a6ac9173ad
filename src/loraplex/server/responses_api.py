"""POST /v1/responses: OpenAI's Responses API over the chat endpoint's machinery.

A request becomes the chat request it means (`instructions` a system message first, `input`
the conversation, `max_output_tokens` the output bound, `text.format` the response format,
`reasoning.effort` the template's reasoning_effort) and runs as one: the same chat template,
sampling defaults, adapter resolution and metrics. The answer is a Response object, or its
stream of events (response.created ... response.output_text.delta ... response.completed).

Output logprobs come with `include: ["message.output_text.logprobs"]` (and `top_logprobs`
alternatives), as in vLLM; a multimodal model takes input_image and input_audio parts as chat
takes image_url and input_audio. What it does not do is refused by name (400): tools and
function calls, files, a stored conversation (previous_response_id: the server keeps no
responses, as vLLM without its response store), background runs, other `include` items.
`store` is accepted and answered `false`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError
from starlette.requests import Request

from loraplex.server.chat import engine_prompt, render_chat_prompt, respond
from loraplex.server.errors import HTTPError, exception_to_body
from loraplex.server.generation import PromptRun, run_prompt
from loraplex.server.protocol import ChatCompletionRequest, unknown_fields
from loraplex.server.responses import TokenText, chat_logprobs, new_id, now, request_id_for
from loraplex.server.sampling import chat_sampling_params
from loraplex.server.state import ServerState

# Chat request fields a Responses request passes on as they are (vLLM's Responses extras included).
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "stop", "repetition_penalty", "ignore_eos",
                    "logit_bias", "skip_special_tokens", "include_stop_str_in_output", "cache_salt",
                    "structured_outputs", "user")
# The chat machinery's names for what a 400 is about, in this API's words.
_PARAMS = {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens", "messages": "input",
           "response_format": "text", "reasoning_effort": "reasoning", "tools": "tools"}
OUTPUT_LOGPROBS = "message.output_text.logprobs"     # the one `include` item answered here
_TEXT_PART_TYPES = ("input_text", "output_text", "text")


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    input: StrictStr | Annotated[list[dict[str, Any]], Field(min_length=1)]
    instructions: StrictStr | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    stream: bool | None = False
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, StrictStr] | None = None
    store: bool | None = True
    truncation: Literal["auto", "disabled"] | None = "disabled"
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] | None = None
    parallel_tool_calls: bool | None = True
    service_tier: str | None = "auto"
    request_id: StrictStr | None = None
    # Accepted without effect, as vLLM does.
    prompt_cache_key: str | None = None
    max_tool_calls: int | None = None
    # Sampling, checked as the chat request's fields of the same names (chat_request_for).
    temperature: Any = None
    top_p: Any = None
    top_k: Any = None
    seed: Any = None
    stop: Any = None
    repetition_penalty: Any = None
    ignore_eos: Any = None
    logit_bias: Any = None
    skip_special_tokens: Any = None
    include_stop_str_in_output: Any = None
    cache_salt: Any = None
    structured_outputs: Any = None
    user: Any = None
    # With include ["message.output_text.logprobs"]: how many alternatives each token lists.
    top_logprobs: Annotated[int, Field(ge=0)] | None = 0
    include: list[StrictStr] | None = None
    previous_response_id: Any = None
    conversation: Any = None
    background: Any = False
    prompt: Any = None
    previous_input_messages: Any = None
    previous_response: Any = None
    priority: Any = 0


_REFUSED = {
    "previous_response_id": (None,), "conversation": (None,), "previous_input_messages": (None,),
    "previous_response": (None,), "background": (False, None), "prompt": (None,), "priority": (0, None),
}
_WHY = {
    "previous_response_id": "this server keeps no responses (no response store); send the whole conversation in "
                            "`input`",
    "conversation": "this server keeps no conversations; send the whole conversation in `input`",
    "previous_input_messages": "send the whole conversation in `input`",
    "previous_response": "send the whole conversation in `input`",
    "background": "responses run in the foreground only; drop background or set it to false",
    "prompt": "stored prompt templates are not supported; send the text in `input`",
    "priority": "requests are scheduled first come, first served",
}


def check_unsupported(request: ResponsesRequest) -> None:
    for name, off in _REFUSED.items():
        value = getattr(request, name)
        if name in request.model_fields_set and not any(value == o and type(value) is type(o) for o in off):
            raise HTTPError(400, f"{name} is not supported by loraplex's /v1/responses: {_WHY[name]}", param=name)
    if any(item != OUTPUT_LOGPROBS for item in request.include or ()):
        raise HTTPError(400, f"include may only list {OUTPUT_LOGPROBS!r} here: no reasoning content, tool results "
                             f"or images are produced", param="include")
    if request.tools and request.tool_choice != "none":
        raise HTTPError(400, "tools are not supported by loraplex's /v1/responses (no tool calls are parsed out of "
                             "the output); drop tools or set tool_choice to \"none\"", param="tools")
    if request.tool_choice not in ("auto", "none", None):
        raise HTTPError(400, "tool_choice must be \"auto\" or \"none\": there are no tools to call", param="tool_choice")


def chat_request_for(request: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request a Responses request means; a 400 naming what cannot be said as one."""
    messages = [{"role": "system", "content": request.instructions}] if request.instructions else []
    messages += _messages(request.input)
    fields: dict[str, Any] = {name: getattr(request, name) for name in _SAMPLING_FIELDS
                              if name in request.model_fields_set}
    fields.update(model=request.model, messages=messages, max_completion_tokens=request.max_output_tokens,
                  stream=False)
    text_format = (request.text or {}).get("format")
    if text_format is not None:
        fields["response_format"] = _response_format(text_format)
    if wants_logprobs(request):
        fields.update(logprobs=True, top_logprobs=request.top_logprobs or 0)
    if request.tools:   # with tool_choice "none" (check_unsupported): they only render into the template
        fields.update(tool_choice="none", tools=[{"type": "function", "function": {
            key: tool[key] for key in ("name", "description", "parameters") if key in tool}}
            for tool in request.tools])
    effort = (request.reasoning or {}).get("effort")
    if effort is not None:
        fields["reasoning_effort"] = effort
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as e:
        error = e.errors()[0]
        loc = error["loc"]
        param = _PARAMS.get(str(loc[0]), str(loc[0])) if loc else "input"
        where = {"reasoning_effort": "reasoning.effort", "response_format": "text.format"}.get(str(loc[0]), param)
        if loc[:1] == ("messages",) and len(loc) >= 3 and isinstance(loc[1], int):
            item = loc[1] - (1 if request.instructions else 0)      # as the client numbered its input
            where = "instructions" if item < 0 else f"input[{item}].{loc[2]}"
        raise HTTPError(400, f"{where}: {error['msg']}", param=param) from None


def wants_logprobs(request: ResponsesRequest) -> bool:
    """vLLM's rule: output logprobs only when `include` asks (top_logprobs alone changes nothing)."""
    return OUTPUT_LOGPROBS in (request.include or ())


def _messages(given: str | list[dict]) -> list[dict]:
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    messages = []
    for i, item in enumerate(given):
        kind = item.get("type", "message")
        if kind != "message" or "role" not in item:
            raise HTTPError(400, f"input[{i}] is of type {kind!r}: loraplex's /v1/responses takes messages "
                                 f"(role and content) only", param="input")
        content = item.get("content")
        if isinstance(content, list):
            parts = [_chat_part(part, i) for part in content]
            # Text alone stays one string: the template renders it as chat renders a text message.
            content = "".join(p["text"] for p in parts) if all(p["type"] == "text" for p in parts) else parts
        elif not isinstance(content, str):
            raise HTTPError(400, f"input[{i}].content must be a string or a list of content parts", param="input")
        messages.append({"role": item["role"], "content": content})
    return messages


def _chat_part(part: Any, i: int) -> dict:
    """A Responses content part as chat's: text, an image (input_image's image_url, a data: URL
    or one the server may fetch), or audio (input_audio); for a multimodal model (docs/multimodal.md)."""
    part_type = part.get("type") if isinstance(part, dict) else None
    if part_type in _TEXT_PART_TYPES:
        if not isinstance(part.get("text"), str):
            raise HTTPError(400, f"input[{i}]: its {part_type} part needs a string `text`", param="input")
        return {"type": "text", "text": part["text"]}
    if part_type == "input_image":
        if not isinstance(part.get("image_url"), str):
            raise HTTPError(400, f"input[{i}]: an input_image part needs `image_url` (a data: URL, or http(s) where "
                                 f"the server allows it); file_id is not supported", param="input")
        return {"type": "image_url", "image_url": {"url": part["image_url"], "detail": part.get("detail")}}
    if part_type == "input_audio":
        return {"type": "input_audio", "input_audio": part.get("input_audio")}
    raise HTTPError(400, f"input[{i}] has a content part of type {part_type!r}: the parts taken here are "
                         f"{', '.join(_TEXT_PART_TYPES)}, input_image and input_audio", param="input")


def _drop_oldest_turns(chat: ChatCompletionRequest, backend, room_wanted: int) -> ChatCompletionRequest:
    """truncation "auto" (OpenAI's): while the conversation leaves less than room_wanted tokens of
    the context, drop its oldest turn (system messages stay), and render it again. Measured on
    its text (a turn's images add their tokens later: an answer that still does not fit is a 400)."""
    prompt_ids = render_chat_prompt(backend.tokenizer, chat)
    messages = list(chat.messages)
    while len(prompt_ids) + room_wanted > backend.max_model_len:
        oldest = next((i for i, m in enumerate(messages[:-1]) if m.role not in ("system", "developer")), None)
        if oldest is None:
            break          # one turn left: the 400 that follows says the prompt is too long
        del messages[oldest]
        chat = chat.model_copy(update={"messages": messages})
        prompt_ids = render_chat_prompt(backend.tokenizer, chat)
    return chat


def _response_format(text_format: dict) -> dict:
    """Responses' text.format ({"type": "json_schema", "name", "schema", "strict"}) as chat's response_format."""
    kind = text_format.get("type")
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {key: text_format[key] for key in
                                                       ("name", "description", "schema", "strict")
                                                       if key in text_format}}
    if kind in ("text", "json_object"):
        return {"type": kind}
    raise HTTPError(400, f"text.format type {kind!r} is not supported: use \"text\", \"json_object\" or "
                         f"\"json_schema\"", param="text")


def _in_this_api(error: HTTPError) -> HTTPError:
    if error.param in _PARAMS:
        message = str(error).replace("max_tokens", "max_output_tokens")
        return HTTPError(error.status, message, param=_PARAMS[error.param], error_type=error.error_type)
    return error


async def create_response(request: ResponsesRequest, raw: Request, state: ServerState):
    check_unsupported(request)
    unknown_fields(request)
    chat = chat_request_for(request)
    backend = state.backend
    lora_request = await backend.lora_request_for(request.model)
    model_name = backend.response_model_name(request.model, lora_request)
    try:
        if request.truncation == "auto":
            chat = _drop_oldest_turns(chat, backend, request.max_output_tokens or 1)
        prompt = await engine_prompt(chat, state, lora_request)
        params = chat_sampling_params(chat, prompt.num_prompt_tokens, backend.max_model_len,
                                      defaults=state.request_defaults)
    except HTTPError as e:
        raise _in_this_api(e) from None
    response_id = request_id_for("resp", request, raw, sep="_")
    run = PromptRun(0, new_id(response_id))   # an engine id of its own, as chat's
    deltas = run_prompt(backend, run, prompt.prompt, params, prompt.lora_request, 1)
    return await respond(_Answer(request, state, model_name, run, response_id), deltas, bool(request.stream),
                         raw, state)


class _Answer:
    """The Response object as its text grows, and the events that tell a stream so."""

    def __init__(self, request: ResponsesRequest, state: ServerState, model_name: str, run: PromptRun,
                 response_id: str) -> None:
        self.request, self.state, self.model_name, self.run, self.id = request, state, model_name, run, response_id
        self.message_id = new_id("msg", sep="_")
        self.created = now()
        self.text = ""
        self.logprobs: list[dict] = []
        self.token_text = TokenText(state.backend.tokenizer)
        self.finish_reason: str | None = None
        self.sequence = 0

    def add(self, delta) -> list[dict]:
        """Take one delta; its tokens' logprobs (when asked for) in the Responses format."""
        self.text += delta.text
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if not wants_logprobs(self.request):
            return []
        block = chat_logprobs(self.token_text, delta.token_ids, delta.logprobs, self.request.top_logprobs or 0)
        self.logprobs += block["content"]
        return block["content"]

    async def collect(self, deltas: AsyncIterator) -> dict:
        async for delta in deltas:
            self.add(delta)
        return self.response("done")

    def _part(self) -> dict:
        return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": self.logprobs}

    def _message(self, status: str) -> dict:
        return {"id": self.message_id, "type": "message", "role": "assistant", "status": status,
                "content": [self._part()] if status == "completed" else []}

    def response(self, stage: Literal["started", "done"]) -> dict:
        incomplete = stage == "done" and self.finish_reason == "length"
        status = "in_progress" if stage == "started" else "incomplete" if incomplete else "completed"
        request = self.request
        body = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.model_name, "output": [] if stage == "started" else [self._message("completed")],
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
            "metadata": request.metadata or {}, "parallel_tool_calls": request.parallel_tool_calls,
            "temperature": request.temperature, "top_p": request.top_p,
            "tool_choice": request.tool_choice or "auto", "tools": request.tools or [],
            "text": request.text or {"format": {"type": "text"}}, "reasoning": request.reasoning,
            "truncation": request.truncation, "previous_response_id": None, "background": False,
            "top_logprobs": request.top_logprobs,
            "store": False, "service_tier": request.service_tier, "user": request.user,
            "usage": None,
        }
        if stage == "done":
            prompt, output = len(self.run.prompt_token_ids), self.run.num_output_tokens
            body["usage"] = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
                             "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": prompt + output}
        return body

    def _event(self, kind: str, **fields) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()

    async def stream(self, deltas: AsyncIterator) -> AsyncIterator[bytes]:
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        try:
            yield self._event("response.created", response=self.response("started"))
            yield self._event("response.in_progress", response=self.response("started"))
            yield self._event("response.output_item.added", output_index=0, item=self._message("in_progress"))
            yield self._event("response.content_part.added", **where,
                              part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            async for delta in deltas:
                logprobs = self.add(delta)
                if delta.text:
                    yield self._event("response.output_text.delta", **where, delta=delta.text, logprobs=logprobs)
            yield self._event("response.output_text.done", **where, text=self.text, logprobs=self.logprobs)
            yield self._event("response.content_part.done", **where, part=self._part())
            yield self._event("response.output_item.done", output_index=0, item=self._message("completed"))
            done = self.response("done")
            yield self._event(f"response.{done['status']}", response=done)
        except Exception as e:   # the status line is sent: report the error in the stream
            error = exception_to_body(e)[1]["error"]
            yield self._event("error", code=error.get("code"), message=error.get("message"),
                              param=error.get("param"))
        finally:
            await deltas.aclose()
            self.state.metrics.observe_prompt_run(self.model_name, self.run)


def not_stored(response_id: str) -> HTTPError:
    return HTTPError(404, f"Response {response_id!r} not found: this server keeps no responses (no response "
                          f"store), so they cannot be retrieved, cancelled or deleted", param="response_id")
