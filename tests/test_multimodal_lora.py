"""LoRA on multimodal models offline: adapters on the language model against PEFT, and
default_mm_loras (vLLM's rules: one registered modality applies its adapter, an explicit adapter
wins, text-only prompts are unaffected; several registered modalities apply none)."""

from __future__ import annotations

import logging

import pytest
from plugin_helpers import isolated_plugins  # noqa: F401
from mm_models import (IMAGE_TOKEN, hf_granite_speech, hf_granite_speech_greedy, hf_llava, hf_llava_greedy,
                       hf_llava_processor, random_audio, random_image, with_adapter, write_mm_peft_lora)

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.core.multimodal.default_loras import DefaultLoRAs
from loraplex.errors import AdapterInvalidError, ConfigError

MAX_TOKENS = 6
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
LLAVA_PROMPT = f"USER: {IMAGE_TOKEN}\nwhat is in the picture? ASSISTANT:"
SPEECH_PROMPT = "<|user|><|audio|>what is said?</s><|assistant|>"
TEXT_PROMPT = "<|user|>hello there</s><|assistant|>"


@pytest.fixture(scope="module")
def speech(tiny_granite_speech, tmp_path_factory):
    """The Granite Speech reference model, its tokenizer, and two PEFT adapters on its language model."""
    from transformers import AutoTokenizer

    model = hf_granite_speech(tiny_granite_speech)
    audio_lora = write_mm_peft_lora(model, tmp_path_factory.mktemp("audio-lora"), target_modules=["q_proj", "v_proj"])
    other_lora = write_mm_peft_lora(model, tmp_path_factory.mktemp("other-lora"), seed=5)
    return model, AutoTokenizer.from_pretrained(str(tiny_granite_speech)), audio_lora, other_lora


def test_llava_adapter_named_explicitly_matches_peft(tiny_llava, tmp_path):
    model, processor = hf_llava(tiny_llava), hf_llava_processor(tiny_llava)
    adapter = write_mm_peft_lora(model, tmp_path / "lora")
    llm = LLM(model=str(tiny_llava), device="cpu", max_model_len=128, enable_lora=True, max_lora_rank=8)
    image = random_image(1)
    lora = LoRARequest("vision-chat", 1, str(adapter))
    outs = llm.generate([{"prompt": LLAVA_PROMPT, "multi_modal_data": {"image": image}}] * 2, GREEDY,
                        lora_request=[lora, None], use_tqdm=False)
    _, with_lora = hf_llava_greedy(with_adapter(model, adapter), processor, LLAVA_PROMPT, [image], MAX_TOKENS)
    _, without = hf_llava_greedy(model, processor, LLAVA_PROMPT, [image], MAX_TOKENS)
    assert with_lora != without
    assert [o.outputs[0].token_ids for o in outs] == [with_lora, without]


def test_adapter_on_the_vision_tower_is_refused(tiny_llava, tmp_path):
    # PEFT's target_modules=["q_proj", "v_proj"] also adapts CLIP's q_proj / v_proj.
    adapter = write_mm_peft_lora(hf_llava(tiny_llava), tmp_path / "lora", target_modules=["q_proj", "v_proj"])
    llm = LLM(model=str(tiny_llava), device="cpu", max_model_len=128, enable_lora=True, max_lora_rank=8)
    with pytest.raises(AdapterInvalidError, match="adapts the model's vision tower .*language model only"):
        llm.add_lora(LoRARequest("towers", 1, str(adapter)))


def test_granite_speech_adapter_matches_peft(tiny_granite_speech, speech):
    model, tokenizer, audio_lora, _ = speech
    llm = LLM(model=str(tiny_granite_speech), device="cpu", max_model_len=256, enable_lora=True, max_lora_rank=8)
    wave = random_audio(0, 1.37)
    out = llm.generate({"prompt": SPEECH_PROMPT, "multi_modal_data": {"audio": (wave, 16000)}}, GREEDY,
                       lora_request=LoRARequest("speech", 1, str(audio_lora)), use_tqdm=False)[0]
    _, expected = hf_granite_speech_greedy(with_adapter(model, audio_lora), tokenizer, SPEECH_PROMPT, wave, MAX_TOKENS)
    assert out.outputs[0].token_ids == expected


def test_default_mm_lora_rules_offline(tiny_granite_speech, speech):
    model, tokenizer, audio_lora, other_lora = speech
    llm = LLM(model=str(tiny_granite_speech), device="cpu", max_model_len=256, enable_lora=True, max_lora_rank=8,
              default_mm_loras={"audio": str(audio_lora)})
    wave = random_audio(0, 1.37)
    audio_prompt = {"prompt": SPEECH_PROMPT, "multi_modal_data": {"audio": (wave, 16000)}}
    other = LoRARequest("other", 7, str(other_lora))
    with_audio, text_only, explicit = llm.generate([audio_prompt, TEXT_PROMPT, audio_prompt], GREEDY,
                                                   lora_request=[None, None, other], use_tqdm=False)
    # The audio prompt gets the audio adapter without naming it; vLLM names it after the modality.
    _, expected = hf_granite_speech_greedy(with_adapter(model, audio_lora), tokenizer, SPEECH_PROMPT, wave, MAX_TOKENS)
    assert with_audio.outputs[0].token_ids == expected
    assert with_audio.lora_request.lora_name == "audio"
    # A text-only prompt runs on the base model.
    _, expected = hf_granite_speech_greedy(model, tokenizer, TEXT_PROMPT, None, MAX_TOKENS)
    assert text_only.outputs[0].token_ids == expected and text_only.lora_request is None
    # An explicitly named adapter wins over the default.
    _, expected = hf_granite_speech_greedy(with_adapter(model, other_lora), tokenizer, SPEECH_PROMPT, wave, MAX_TOKENS)
    assert explicit.outputs[0].token_ids == expected and explicit.lora_request.lora_name == "other"
    # chat() applies it too (content parts; Granite's template takes string content, so the
    # <|audio|> placeholder is put in front of the text).
    import base64
    import io
    import wave as wavelib

    buffer = io.BytesIO()
    with wavelib.open(buffer, "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(16000)
        f.writeframes((wave * 32767).astype("<i2").tobytes())
    data = base64.b64encode(buffer.getvalue()).decode()
    chat = llm.chat([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
                                                   {"type": "text", "text": "what is said?"}]}],
                    GREEDY, use_tqdm=False)[0]
    assert chat.lora_request.lora_name == "audio"
    assert "<|audio|>\nwhat is said?" in chat.prompt


def test_several_registered_modalities_apply_none_and_log_once(caplog):
    """The rule itself: neither model family takes two modalities in one prompt, so a prompt
    with both cannot reach the engine; the rule is the one the server and LLM call."""
    rule, defaults = DefaultLoRAs(), {"image": "image-lora", "audio": "audio-lora"}
    assert rule.pick({"audio"}, defaults) == "audio-lora"
    assert rule.pick({"image"}, {"audio": "audio-lora"}) is None
    assert rule.pick(set(), defaults) is None
    with caplog.at_level(logging.WARNING, logger="loraplex.core.multimodal.default_loras"):
        assert rule.pick({"image", "audio"}, defaults) is None
        assert rule.pick({"audio", "image"}, defaults) is None
    assert len([r for r in caplog.records if "each with a default LoRA adapter" in r.message]) == 1


def test_default_mm_lora_settings_are_checked(tiny_llava, tiny_granite_speech, tmp_path, isolated_plugins):
    with pytest.raises(ConfigError, match="needs enable_lora=True"):
        LLM(model=str(tiny_llava), device="cpu", default_mm_loras={"image": str(tmp_path)})
    with pytest.raises(ConfigError, match="'image' adapter, but this model takes audio input"):
        LLM(model=str(tiny_granite_speech), device="cpu", enable_lora=True, default_mm_loras={"image": str(tmp_path)})
    with pytest.raises(ConfigError, match="names the modality 'video'"):
        LLM(model=str(tiny_llava), device="cpu", enable_lora=True, default_mm_loras={"video": str(tmp_path)})
    with pytest.raises(ConfigError, match="no resolver found it"):
        LLM(model=str(tiny_llava), device="cpu", enable_lora=True, default_mm_loras={"image": "no-such-adapter"})


def test_default_mm_lora_may_be_a_name_a_resolver_finds(tiny_granite_speech, speech, tmp_path, monkeypatch,
                                                       isolated_plugins):
    import shutil

    model, tokenizer, audio_lora, _ = speech
    shutil.copytree(audio_lora, tmp_path / "granite-audio")
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")
    monkeypatch.setenv("VLLM_LORA_RESOLVER_CACHE_DIR", str(tmp_path))
    llm = LLM(model=str(tiny_granite_speech), device="cpu", max_model_len=256, enable_lora=True, max_lora_rank=8,
              default_mm_loras={"audio": "granite-audio"})
    wave = random_audio(0, 1.37)
    out = llm.generate({"prompt": SPEECH_PROMPT, "multi_modal_data": {"audio": (wave, 16000)}}, GREEDY,
                       use_tqdm=False)[0]
    assert out.lora_request.lora_path == str(tmp_path / "granite-audio")
    _, expected = hf_granite_speech_greedy(with_adapter(model, audio_lora), tokenizer, SPEECH_PROMPT, wave, MAX_TOKENS)
    assert out.outputs[0].token_ids == expected
