"""Multimodal chat completions through `loraplex serve` with the official openai client: image_url,
input_audio and audio_url parts, default LoRAs per modality, limits and bad input (400s), outputs
compared with the offline LLM (itself tested against transformers and PEFT)."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time

import numpy as np
import openai
import pytest
from mm_models import (data_url, hf_granite_speech, hf_llava, png_bytes, random_audio, random_image, wav_bytes,
                       write_mm_peft_lora)

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.lora_request import lora_id_for_name
from server.harness import API_KEY
from server.real_server import real_server

MAX_TOKENS = 5
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


class MediaHandler(http.server.BaseHTTPRequestHandler):
    """/ok.png: an image; /big.png: more bytes than the server accepts (/unsized.png: without saying
    so in Content-Length); /slow.png: too slow."""
    image = b""

    def do_GET(self):
        if self.path == "/slow.png":
            time.sleep(2.5)
        body = self.image * (40 if self.path in ("/big.png", "/unsized.png") else 1)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if self.path != "/unsized.png":   # HTTP/1.0: the body ends when the connection closes
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def media_server():
    MediaHandler.image = png_bytes(random_image(11))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MediaHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0)


def _image_part(image) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(png_bytes(image), "image/png")}}


def _audio_part(wave) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav_bytes(wave)).decode(), "format": "wav"}}


def _chat(client, content, model="base", **kwargs) -> str:
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                         max_tokens=MAX_TOKENS, temperature=0, **kwargs)
    return out.choices[0].message.content


def _offline(llm: LLM, content, lora=None) -> str:
    return llm.chat([{"role": "user", "content": content}], GREEDY, lora_request=lora, use_tqdm=False)[0].outputs[0].text


@pytest.fixture(scope="module")
def llava_server(tiny_llava, tmp_path_factory):
    model = hf_llava(tiny_llava)
    root = tmp_path_factory.mktemp("llava-loras")
    image_lora, other_lora = write_mm_peft_lora(model, root / "image"), write_mm_peft_lora(model, root / "other", seed=3)
    argv = ["serve", str(tiny_llava), "--served-model-name", "base", "--device", "cpu", "--max-model-len", "128",
            "--enable-lora", "--max-lora-rank", "8", "--lora-modules", f"other={other_lora}",
            "--default-mm-loras", json.dumps({"image": str(image_lora)}), "--limit-mm-per-prompt", '{"image": 2}',
            "--allow-remote-media", "--allowed-media-domains", "127.0.0.1", "--media-fetch-timeout", "1",
            "--max-media-bytes", str(len(png_bytes(random_image(11))) * 10), "--api-key", API_KEY]
    offline = LLM(str(tiny_llava), device="cpu", max_model_len=128, enable_lora=True, max_lora_rank=8,
                  default_mm_loras={"image": str(image_lora)})
    with real_server(argv, {}) as server:
        yield {"server": server, "offline": offline, "image_lora": str(image_lora), "other_lora": str(other_lora)}


@pytest.fixture(scope="module")
def speech_server(tiny_granite_speech, tmp_path_factory):
    lora = write_mm_peft_lora(hf_granite_speech(tiny_granite_speech), tmp_path_factory.mktemp("audio-lora"),
                              target_modules=["q_proj", "v_proj"])
    argv = ["serve", str(tiny_granite_speech), "--served-model-name", "base", "--device", "cpu",
            "--max-model-len", "256", "--enable-lora", "--max-lora-rank", "8",
            "--default-mm-loras", json.dumps({"audio": str(lora)}), "--api-key", API_KEY]
    offline = LLM(str(tiny_granite_speech), device="cpu", max_model_len=256, enable_lora=True, max_lora_rank=8,
                  default_mm_loras={"audio": str(lora)})
    with real_server(argv, {}) as server:
        yield {"server": server, "offline": offline, "lora": str(lora)}


def test_default_adapters_are_listed_like_lora_modules(llava_server, speech_server):
    for setup, modality, path in ((llava_server, "image", llava_server["image_lora"]),
                                  (speech_server, "audio", speech_server["lora"])):
        models = {m.id: m for m in _client(setup["server"]).models.list().data}
        assert (models[modality].root, models[modality].parent) == (path, "base")


def test_image_chat_matches_offline_with_the_default_adapter(llava_server):
    client, offline = _client(llava_server["server"]), llava_server["offline"]
    content = [_image_part(random_image(1)), {"type": "text", "text": "what is in the picture?"}]
    served = _chat(client, content)
    assert served == _offline(offline, content)
    # The default adapter applied: the base model alone answers otherwise.
    base_only = LLM(offline.llm_engine.config.model, device="cpu", max_model_len=128)
    assert served != _offline(base_only, content)
    # Two images, and streaming.
    two = [_image_part(random_image(2)), _image_part(random_image(3)), {"type": "text", "text": "compare"}]
    stream = client.chat.completions.create(model="base", messages=[{"role": "user", "content": two}],
                                            max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == _offline(offline, two)


def test_responses_api_takes_images_as_chat_does(llava_server):
    """/v1/responses' input_image parts reach the model as chat's image_url parts: the same answer,
    the modality's default adapter included."""
    client = _client(llava_server["server"])
    image = _image_part(random_image(4))
    chat = client.chat.completions.create(model="base", max_tokens=MAX_TOKENS, temperature=0, messages=[
        {"role": "user", "content": [image, {"type": "text", "text": "what is in the picture?"}]}])
    out = client.responses.create(model="base", max_output_tokens=MAX_TOKENS, temperature=0, input=[{
        "role": "user", "content": [{"type": "input_image", "image_url": image["image_url"]["url"]},
                                    {"type": "input_text", "text": "what is in the picture?"}]}])
    assert out.output_text == chat.choices[0].message.content
    assert out.usage.input_tokens == chat.usage.prompt_tokens          # the image's tokens counted alike


def test_explicit_adapter_wins_and_text_only_is_unaffected(llava_server):
    client, offline = _client(llava_server["server"]), llava_server["offline"]
    content = [_image_part(random_image(1)), {"type": "text", "text": "what is in the picture?"}]
    other = LoRARequest("other", lora_id_for_name("other"), llava_server["other_lora"])
    assert _chat(client, content, model="other") == _offline(offline, content, lora=other)
    assert _chat(client, content, model="other") != _chat(client, content)
    text = [{"type": "text", "text": "hello there"}]
    base_only = LLM(offline.llm_engine.config.model, device="cpu", max_model_len=128)
    assert _chat(client, text) == _chat(client, "hello there") == _offline(base_only, text)


def test_audio_chat_matches_offline_with_the_default_adapter(speech_server):
    client, offline = _client(speech_server["server"]), speech_server["offline"]
    wave = random_audio(0, 1.37)
    for part in (_audio_part(wave), {"type": "audio_url", "audio_url": {"url": data_url(wav_bytes(wave), "audio/wav")}}):
        content = [part, {"type": "text", "text": "what is said?"}]
        out = client.chat.completions.create(model="base", messages=[{"role": "user", "content": content}],
                                             max_tokens=MAX_TOKENS, temperature=0)
        assert out.choices[0].message.content == _offline(offline, content)
        # usage counts the expanded prompt: every audio embedding is a prompt token
        assert out.usage.prompt_tokens > 30
    reference = offline.chat([{"role": "user", "content": [_audio_part(wave)]}], GREEDY, use_tqdm=False)[0]
    assert reference.lora_request.lora_name == "audio"


def test_remote_images_only_from_allowed_hosts_within_limits(llava_server, speech_server, media_server):
    client = _client(llava_server["server"])
    ok = [{"type": "image_url", "image_url": {"url": media_server + "/ok.png"}}, {"type": "text", "text": "hi"}]
    inline = [_image_part(random_image(11)), {"type": "text", "text": "hi"}]
    assert _chat(client, ok) == _chat(client, inline)
    for path, message in (("/big.png", "larger than the"), ("/unsized.png", "larger than the"),
                          ("/slow.png", "could not be fetched within 1 s")):
        part = {"type": "image_url", "image_url": {"url": media_server + path}}
        with pytest.raises(openai.BadRequestError, match=message):
            _chat(client, [part, {"type": "text", "text": "hi"}])
    with pytest.raises(openai.BadRequestError, match="not one of the allowed media domains"):
        _chat(client, [{"type": "image_url", "image_url": {"url": media_server.replace("127.0.0.1", "localhost")
                                                             + "/ok.png"}}])
    # Without --allow-remote-media, http URLs are refused.
    with pytest.raises(openai.BadRequestError, match="does not fetch remote media"):
        _chat(_client(speech_server["server"]), [{"type": "audio_url", "audio_url": {"url": media_server + "/a.wav"}}])


@pytest.mark.parametrize("content,message", [
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"nope").decode()}}],
     "could not be decoded as an image"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}], "not valid base64"),
    ([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}], "has a file: URL"),
    ([_audio_part(np.zeros(1600, dtype=np.float32))], "is audio input, but this model takes image"),
    ("TOO_MANY", r"3 image item\(s\) but at most 2 are allowed"),
    ([{"type": "text", "text": "<image> typed by hand"}], "placeholder token"),
    ([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}], "video_url"),
])
def test_bad_llava_input_is_a_400_and_the_server_keeps_serving(llava_server, content, message):
    client = _client(llava_server["server"])
    if content == "TOO_MANY":
        content = [_image_part(random_image(i)) for i in range(3)]
    with pytest.raises(openai.BadRequestError, match=message):
        _chat(client, content)
    assert _chat(client, "hello there")


@pytest.mark.parametrize("content,message", [
    ([_audio_part(np.zeros(16000 * 120, dtype=np.float32))], r"lasts 120.0 s, which makes \d+ tokens"),
    ([{"type": "input_audio", "input_audio": {"data": base64.b64encode(b"ID3xxxx").decode(), "format": "mp3"}}],
     "decodes 'wav' audio only"),
    ([{"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFFxxxxWAVE").decode()}}],
     "not a readable WAV file"),
    ([_image_part(random_image(0))], "is image input, but this model takes audio"),
])
def test_bad_audio_input_is_a_400(speech_server, content, message):
    client = _client(speech_server["server"])
    with pytest.raises(openai.BadRequestError, match=message):
        _chat(client, content)
    assert _chat(client, "hello there")


def test_server_rule_with_two_registered_modalities_applies_none(tmp_path):
    """Neither model takes image and audio together, so the server's rule is checked on a
    backend that serves a default adapter for each."""
    import asyncio

    from adapters import write_peft_adapter
    from loraplex.core.multimodal.media import MediaLoader
    from loraplex.server.backend import ServingBackend
    from loraplex.server.multimodal import ServerMultimodal
    from server.fake_engine import FakeEngine

    backend = ServingBackend(FakeEngine(), served_model_names=["base"], model_path="base")
    for name in ("image", "audio"):
        asyncio.run(backend.load_adapter(name, str(write_peft_adapter(tmp_path / name))))
    multimodal = ServerMultimodal({"image": "<image>", "audio": "<|audio|>"}, MediaLoader(),
                                  {"image": "x", "audio": "y"})
    def pick(modalities):
        return asyncio.run(multimodal.default_lora(backend, modalities))

    assert pick({"audio"}).lora_name == "audio"
    assert pick({"image"}).lora_name == "image"
    assert pick({"image", "audio"}) is None
    assert pick(set()) is None
