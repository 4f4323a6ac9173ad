"""Request bodies of the OpenAI-compatible API: every field vLLM's server accepts, implemented or refused.

Responses are plain dicts built in completions.py / chat.py; only requests need validation.

The inventory (docs/server.md, "Request fields", lists it; a test checks the two agree):

- Fields declared with their types below are implemented (server/sampling.py maps them to
  SamplingParams, the routes read the others). ACCEPTED_WITHOUT_EFFECT names the few whose
  effect cannot arise in loraplex, and why.
- UNSUPPORTED: fields vLLM accepts whose meaning loraplex does not implement. Each is declared
  (so a request is parsed the same as by vLLM) and refused with a 400 naming it when set to
  anything but its "off" values (check_unsupported).
- Any other field is one vLLM does not know either: vLLM accepts and ignores it (OpenAI
  clients send extras), and so does loraplex, logging its name once (unknown_fields).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal, NamedTuple, Union

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

logger = logging.getLogger(__name__)


TokenIds = list[Annotated[int, Field(ge=0)]]
NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]
INT64 = dict(ge=-(2**63), le=2**63 - 1)


class StreamOptions(BaseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str = "schema"
    description: str | None = None
    # OpenAI's key is "schema", which BaseModel reserves.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.json_schema is None):
            raise ValueError("When response_format type is 'json_schema', the 'json_schema' field (with its "
                             "'schema') must be provided.")
        return self


class Unsupported(NamedTuple):
    off: tuple                  # values that mean "not used": accepted
    why: str                    # said in the 400


# vLLM's request fields whose meaning loraplex does not implement: 400 naming the field unless
# it holds one of its "off" values.
UNSUPPORTED: dict[str, Unsupported] = {
    "use_beam_search": Unsupported((False, None), "beam search is not implemented"),
    "length_penalty": Unsupported((1.0, 1, None), "it applies to beam search, which is not implemented"),
    "watermarking": Unsupported((False, None), "watermarking is not implemented"),
    "logprob_token_ids": Unsupported((None,), "use logprobs / top_logprobs"),
    "prompt_embeds": Unsupported((None,), "prompts are text or token ids"),
    "kv_transfer_params": Unsupported((None, {}), "there is no disaggregated serving"),
    "ec_transfer_params": Unsupported((None, {}), "there is no disaggregated serving"),
    "vllm_xargs": Unsupported((None, {}), "there are no custom sampling extensions"),
    "repetition_detection": Unsupported((None,), "repetition detection is not implemented"),
    "thinking_token_budget": Unsupported((None, -1), "there is no reasoning parser"),
    "routed_experts_prompt_start": Unsupported((0, None), "no served model is a mixture of experts"),
    "suffix": Unsupported((None, ""), "put the whole text in prompt"),
    # tools with tool_choice "none" are rendered into the chat template (check_unsupported).
    "tools": Unsupported((None,), "tool calls are not parsed; send tool_choice 'none' to only render the "
                                  "tools into the chat template"),
    "tool_choice": Unsupported(("none", None), "tool calls are not parsed"),
    "functions": Unsupported((None, []), "tool calls are not parsed"),
    "function_call": Unsupported((None, "none"), "tool calls are not parsed"),
    "chat_template": Unsupported((None,), "the server does not trust chat templates sent with requests "
                                          "(vLLM's default without --trust-request-chat-template)"),
    "mm_processor_kwargs": Unsupported((None, {}), "per-request processor settings are not trusted (vLLM's "
                                                   "default without --trust-request-mm-kwargs)"),
    "media_io_kwargs": Unsupported((None, {}), "per-request media settings are not trusted (vLLM's default "
                                               "without --trust-request-mm-kwargs)"),
    "priority": Unsupported((0, None), "the scheduler is first come, first served (vLLM refuses it too "
                                       "without --scheduling-policy priority)"),
    "return_weight_versions": Unsupported((False, None), "loraplex keeps no weight-version labels"),
    "guided_decoding_backend": Unsupported((None, "", "auto", "guidance", "llguidance"),
                                           "the grammar engine is llguidance ('guidance')"),
}

# Fields loraplex accepts whose effect cannot arise here, and why (docs/server.md lists them).
ACCEPTED_WITHOUT_EFFECT: dict[str, str] = {
    "user": "vLLM ignores it too",
    "session_id": "there is no session-aware routing or KV transfer to key on it",
    "return_token_offsets": "vLLM honours it only on its /render endpoints",
    "return_mm_kwargs": "vLLM honours it only on its /render endpoints",
    "mm_payload": "vLLM honours it only on its /render endpoints",
    "include_reasoning": "there is no reasoning parser: everything is content, as in vLLM without one",
    "parallel_tool_calls": "tool calls are not parsed (tools render into the template only)",
}

_warned_unknown: set[str] = set()
_MAX_WARNED = 1024


def unknown_fields(request: BaseModel) -> list[str]:
    """Fields of `request` that neither vLLM nor loraplex knows: ignored, as vLLM does; each name is
    logged once (bounded), so a client's typo shows in the server log."""
    names = sorted(request.model_extra or ())
    new = [n for n in names if n not in _warned_unknown]
    if new and len(_warned_unknown) < _MAX_WARNED:
        _warned_unknown.update(new)
        logger.warning("request fields ignored (unknown to vLLM and loraplex): %s", ", ".join(new))
    return names


def check_unsupported(request: BaseModel) -> None:
    """400 naming the first field of UNSUPPORTED that the request sets to something other than off."""
    from loraplex.server.errors import HTTPError
    for name, rule in UNSUPPORTED.items():
        if name not in type(request).model_fields or name not in request.model_fields_set:
            continue
        value = getattr(request, name)
        if name == "tools" and getattr(request, "tool_choice", None) == "none":
            continue
        if not any(value == off and type(value) is type(off) or value is off for off in rule.off):
            raise HTTPError(400, f"'{name}' is not supported by loraplex ({rule.why}); remove it from the "
                                 f"request (docs/server.md, \"Request fields\")", param=name)


class SamplingFields(BaseModel):
    """The fields shared by /v1/completions and /v1/chat/completions."""
    model_config = ConfigDict(extra="allow")

    # "" and null mean the base model, as in vLLM.
    model: StrictStr | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1)] | None = 1
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: TokenIds | None = None
    # torch generators take 64-bit seeds; vLLM's range.
    seed: Annotated[int, Field(**INT64)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    ignore_eos: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stream_interval: Annotated[int, Field(ge=1)] | None = None     # at least the server's --stream-interval
    logit_bias: dict[str, float] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: Annotated[int, Field(ge=-1, le=2**63 - 1)] | None = None
    truncation_side: Literal["left", "right"] | None = None
    allowed_token_ids: TokenIds | None = None
    bad_words: list[StrictStr] | None = None
    prompt_logprobs: Annotated[int, Field(ge=0)] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    # vLLM before 0.12 named structured outputs guided_*: still honoured.
    guided_json: str | dict[str, Any] | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None
    guided_whitespace_pattern: StrictStr | None = None
    request_id: NonEmptyStr | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    # prefix caching shares blocks only between requests of the same salt
    cache_salt: Annotated[StrictStr, Field(min_length=1, max_length=128)] | None = None
    # Accepted without effect (ACCEPTED_WITHOUT_EFFECT).
    user: str | None = None
    session_id: str | None = None
    return_token_offsets: bool | None = False
    return_mm_kwargs: bool = True
    mm_payload: Any = "tensors"
    # Refused unless off (UNSUPPORTED); declared so they parse as in vLLM.
    use_beam_search: Any = False
    length_penalty: Any = 1.0
    watermarking: Any = None
    logprob_token_ids: Any = None
    prompt_embeds: Any = None
    kv_transfer_params: Any = None
    ec_transfer_params: Any = None
    vllm_xargs: Any = None
    repetition_detection: Any = None
    thinking_token_budget: Any = None
    routed_experts_prompt_start: Any = 0
    priority: Any = 0
    guided_decoding_backend: Any = None
    return_weight_versions: Any = False

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("Stream options can only be defined when `stream=True`; drop stream_options or set "
                             "stream")
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("`prompt_logprobs` are not available when `stream=True`.")
        if self.cache_salt is not None and any(c in self.cache_salt for c in ("@", "/", "\\", "\x00")):
            raise ValueError("cache_salt must not contain '@', '/', '\\' or NUL")
        return self


class CompletionRequest(SamplingFields):
    # A string, a batch of strings, one token list, or a batch of token lists.
    prompt: Union[StrictStr, list[StrictStr], TokenIds, list[TokenIds]]
    logprobs: Annotated[int, Field(ge=0)] | None = None
    echo: bool | None = False
    add_special_tokens: bool = True
    # Older vLLM and OpenAI: refused unless equal to n (sampling.py).
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: Any = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class MediaURL(BaseModel):
    url: NonEmptyStr                # data:<mime>;base64,... (or http(s) where the server allows it)
    detail: str | None = None       # OpenAI's image detail hint; accepted, not used


class ImageURLPart(BaseModel):
    type: Literal["image_url"]
    image_url: MediaURL


class InputAudio(BaseModel):
    data: NonEmptyStr               # base64 of the file
    format: StrictStr = "wav"


class InputAudioPart(BaseModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioURLPart(BaseModel):
    type: Literal["audio_url"]
    audio_url: MediaURL


ContentPart = Annotated[Union[TextPart, ImageURLPart, InputAudioPart, AudioURLPart], Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    @property
    def has_media(self) -> bool:
        return isinstance(self.content, list) and any(not isinstance(p, TextPart) for p in self.content)

    def template_message(self) -> dict:
        """{"role", "content"} with content parts as plain dicts, for core/multimodal/chat.py."""
        content = self.content if not isinstance(self.content, list) else \
            [part.model_dump(exclude_none=True) for part in self.content]
        return {"role": self.role, "content": content}


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0)] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, str]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    return_prompt_text: bool | None = None
    # Accepted without effect (ACCEPTED_WITHOUT_EFFECT).
    include_reasoning: bool = True
    parallel_tool_calls: bool | None = True
    # Refused unless off (UNSUPPORTED); tools with tool_choice "none" only render into the template.
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    chat_template: Any = None
    mm_processor_kwargs: Any = None
    media_io_kwargs: Any = None


class TokenizeCompletionRequest(BaseModel):
    """POST /tokenize with a prompt (vLLM's)."""
    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(BaseModel):
    """POST /tokenize with chat messages, rendered as /v1/chat/completions renders them (vLLM's)."""
    model: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    documents: list[dict[str, str]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's)."""
    model: StrictStr | None = None
    tokens: TokenIds


# Empty names and paths pass validation here: the routes refuse them with vLLM's
# InvalidUserInput error.
class LoadLoRAAdapterRequest(BaseModel):
    lora_name: StrictStr
    lora_path: StrictStr
    load_inplace: bool = False
    base_model_name: StrictStr | None = None


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: StrictStr = ""
    lora_int_id: int | None = None
