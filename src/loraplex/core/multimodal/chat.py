"""Chat messages with image and audio content parts -> what the chat template renders + multi_modal_data.

Content parts (OpenAI's, and vLLM's offline extras):

    {"type": "text", "text": ...}
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}   (or an http(s) URL, see media.py)
    {"type": "image_pil", "image_pil": PIL.Image}                             (offline)
    {"type": "input_audio", "input_audio": {"data": BASE64, "format": "wav"}}
    {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,..."}}

Templates come in two kinds, told apart as vLLM does, by whether the template loops over a
message's content:

- "openai" (LLaVA's): content is a list of parts (a plain string becomes one text part);
  media become {"type": "image"} / {"type": "audio"} and the template writes the placeholders;
- "string" (Granite's and most text templates): content becomes one string, the text parts
  joined, and each medium's placeholder ("<|audio|>") is put in front unless the text already
  holds enough of them (then the user placed them).

Media are returned in message order as multi_modal_data; the processor checks them against
the model (modality, limits, placeholder counts) like any other prompt's.
"""

from __future__ import annotations

from functools import lru_cache

import jinja2
from jinja2 import nodes

from loraplex.core.multimodal.media import MediaLoader
from loraplex.errors import InvalidRequestError

_MODALITY_OF_PART = {"image_url": "image", "image_pil": "image", "input_audio": "audio", "audio_url": "audio"}


@lru_cache(maxsize=16)
def content_format(template: str | None) -> str:
    """"openai" when the template iterates over a message's content, else "string"."""
    if not template:
        return "string"
    try:
        tree = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError:
        return "string"
    content_vars: set[str] = set()
    for assign in tree.find_all(nodes.Assign):   # {% set parts = message['content'] %}
        if isinstance(assign.target, nodes.Name) and _reads_content(assign.node, content_vars):
            content_vars.add(assign.target.name)
    return "openai" if any(_reads_content(loop.iter, content_vars) for loop in tree.find_all(nodes.For)) \
        else "string"


def _reads_content(node: nodes.Node, names: set[str]) -> bool:
    while isinstance(node, (nodes.Filter, nodes.Test)):
        node = node.node
    if isinstance(node, nodes.Getitem):
        return isinstance(node.arg, nodes.Const) and node.arg.value == "content"
    if isinstance(node, nodes.Getattr):
        return node.attr == "content"
    return isinstance(node, nodes.Name) and node.name in names


def parse_chat_messages(messages: list[dict], *, fmt: str, placeholders: dict[str, str],
                        media: MediaLoader) -> tuple[list[dict], dict[str, list]]:
    """(messages for the template, multi_modal_data) of a conversation."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise InvalidRequestError("messages must be a list of {'role': ..., 'content': ...} dicts")
    rendered, mm_data = [], {}
    for m_index, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str) and fmt == "openai":   # such templates expect parts, as vLLM gives them
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            rendered.append(message)
            continue
        parts, counts = [], {}
        for p_index, part in enumerate(content):
            where = f"messages[{m_index}].content[{p_index}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise InvalidRequestError(f"{where} is a text part without a 'text' string")
                parts.append({"type": "text", "text": part["text"]})
                continue
            modality = _MODALITY_OF_PART.get(kind)
            if modality is None:
                raise InvalidRequestError(f"{where} has type {kind!r}; loraplex takes text, image_url, image_pil, "
                                          f"input_audio and audio_url parts")
            if modality not in placeholders:
                raise InvalidRequestError(f"{where} is {modality} input, but this model takes "
                                          f"{' or '.join(placeholders) or 'text only'}; remove it")
            mm_data.setdefault(modality, []).append(_load(kind, part, media, where))
            counts[modality] = counts.get(modality, 0) + 1
            parts.append({"type": modality})
        rendered.append(dict(message, content=parts if fmt == "openai" else
                             _string_content(parts, counts, placeholders, m_index)))
    return rendered, mm_data


def _string_content(parts: list[dict], counts: dict[str, int], placeholders: dict[str, str], m_index: int) -> str:
    text = "".join(p["text"] for p in parts if p["type"] == "text")
    missing = []
    for modality, count in counts.items():
        present = text.count(placeholders[modality])
        if present > count:
            raise InvalidRequestError(f"messages[{m_index}] holds {present} {placeholders[modality]} placeholders "
                                      f"but {count} {modality} part(s); remove the extra placeholders")
        missing += [placeholders[modality]] * (count - present)
    return "\n".join(missing + [text]) if missing else text


def _load(kind: str, part: dict, media: MediaLoader, where: str):
    value = part.get(kind)
    if kind == "image_pil":
        return value
    if kind == "input_audio":
        if not isinstance(value, dict) or not isinstance(value.get("data"), str):
            raise InvalidRequestError(f"{where} needs input_audio: {{'data': BASE64, 'format': 'wav'}}")
        return media.input_audio(value["data"], value.get("format"), where)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise InvalidRequestError(f"{where} needs {kind}: {{'url': ...}}")
    return media.image(url, where) if kind == "image_url" else media.audio(url, where)
