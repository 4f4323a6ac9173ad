"""Request bodies of the OpenAI-compatible API (the fields vLLM accepts that loraplex serves).

Responses are plain dicts built in completions.py / chat.py; only requests need
validation. Unknown fields are ignored, as OpenAI clients send extras freely.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

MAX_LOGPROBS = 20

TokenIds = list[Annotated[int, Field(ge=0)]]
NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


# OpenAI/vLLM fields loraplex does not implement: refused (400) when set to anything but
# their "off" value, rather than silently ignored. Value: what "off" looks like.
UNSUPPORTED_FIELDS: dict[str, Any] = {
    "logit_bias": ({}, None), "tools": ([], None), "functions": ([], None),
    "tool_choice": ("none", None), "response_format": ({"type": "text"}, None),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "prompt_logprobs": (None,), "use_beam_search": (False, None), "lora_request": (None,),
}


class SamplingFields(BaseModel):
    """The sampling fields shared by /v1/completions and /v1/chat/completions."""
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, off in UNSUPPORTED_FIELDS.items():
                if name in data and not any(data[name] == o for o in off):
                    raise ValueError(f"'{name}' is not supported by loraplex; remove it from the request")
        return data

    model: NonEmptyStr | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: TokenIds | None = None
    # torch generators take 64-bit seeds; vLLM's range.
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true; drop it or set stream")
        return self


class CompletionRequest(SamplingFields):
    # A string, a batch of strings, one token list, or a batch of token lists.
    prompt: Union[StrictStr, list[StrictStr], TokenIds, list[TokenIds]]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None


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
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = False


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
