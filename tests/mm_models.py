"""Tiny but real multimodal checkpoints (LLaVA, Granite Speech) for tests, built with transformers.

Like tests/models.py: the model is built by transformers (random init), saved with
save_pretrained, and transformers is the reference for what it computes. Weights are
scaled up from transformers' tiny default init so that the image or audio actually
changes the language model's output (a dropped or misplaced embedding must show), and
BatchNorm statistics are random so that using the wrong ones shows too.

The language models are tests/models.py's tiny Llama and Granite (hidden 64, 2 layers), so
adapters from tests/adapters.py fit them; their vocabulary ends with the placeholder tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from models import TINY_CONFIG, TINY_VOCAB_SIZE, write_tiny_tokenizer

IMAGE_TOKEN, AUDIO_TOKEN = "<image>", "<|audio|>"
IMAGE_TOKEN_ID, AUDIO_TOKEN_ID = TINY_VOCAB_SIZE, TINY_VOCAB_SIZE + 1
MM_VOCAB_SIZE = TINY_VOCAB_SIZE + 4
IMAGE_SIZE, PATCH_SIZE = 32, 8            # 16 patches: 16 <image> tokens per image
# LLaVA-1.5's template (the Hub's, without transformers' {% generation %} tag): it loops over
# each message's content parts, images first.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
TEXT_CONFIG = dict(TINY_CONFIG, vocab_size=MM_VOCAB_SIZE)
# Granite's four multipliers, all away from 1 (milder than tests/models.py's: with those, this tiny
# model's answer hardly depends on the audio, and a test that ignored the audio would pass).
GRANITE_SPEECH_MULTIPLIERS = dict(embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.25,
                                  logits_scaling=0.5)
GRANITE_SPEECH_FEATURES = dict(feature_extractor_type="GraniteSpeechFeatureExtractor", sampling_rate=16000,
                               melspec_kwargs=dict(sample_rate=16000, n_fft=512, win_length=400, hop_length=160,
                                                   n_mels=80),
                               projector_window_size=15, projector_downsample_rate=5)


def _scale_up(model, seed: int, scale: float = 1.5) -> None:
    """Larger towers and random norm/BatchNorm statistics (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "language_model" in name and "norm" not in name:
                continue            # the language model keeps transformers' init, like tests/models.py's
            if "norm" in name.lower() and name.endswith(".weight"):
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
            else:
                param.mul_(scale)
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.3 * torch.randn(buffer.shape, generator=gen))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=gen))


def make_tiny_llava(path, *, seed: int = 0, vision_feature_layer=-2, strategy: str = "default") -> Path:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration

    path = Path(path)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**TEXT_CONFIG), image_token_index=IMAGE_TOKEN_ID,
                         vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=strategy,
                         image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    _scale_up(model, seed)
    model.eval().save_pretrained(path)
    write_tiny_tokenizer(path, extra_special_tokens=(IMAGE_TOKEN, AUDIO_TOKEN), chat_template=LLAVA_CHAT_TEMPLATE)
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                          crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    return path


def make_tiny_granite_speech(path, *, seed: int = 0) -> Path:
    from transformers import GraniteConfig, GraniteSpeechConfig, GraniteSpeechForConditionalGeneration

    path = Path(path)
    text = GraniteConfig(**TEXT_CONFIG, **GRANITE_SPEECH_MULTIPLIERS, tie_word_embeddings=False)
    encoder = dict(input_dim=160, num_layers=2, hidden_dim=32, feedforward_mult=2, num_heads=4, dim_head=8,
                   output_dim=12, context_size=20, max_pos_emb=32, conv_kernel_size=5)
    projector = dict(model_type="blip_2_qformer", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, encoder_hidden_size=32, cross_attention_frequency=1)
    config = GraniteSpeechConfig(text_config=text, encoder_config=encoder, projector_config=projector,
                                 audio_token_index=AUDIO_TOKEN_ID, has_lora_adapter=False, window_size=15,
                                 downsample_rate=5, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = GraniteSpeechForConditionalGeneration(config)
    _scale_up(model, seed)
    model.eval().save_pretrained(path)
    write_tiny_tokenizer(path, extra_special_tokens=(IMAGE_TOKEN, AUDIO_TOKEN))
    (path / "preprocessor_config.json").write_text(json.dumps(GRANITE_SPEECH_FEATURES, indent=2))
    return path


def random_image(seed: int, size: tuple[int, int] = (48, 40)):
    """A PIL image (width, height) of random colours, not square, so resize and crop matter."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def random_audio(seed: int, seconds: float, rate: int = 16000) -> np.ndarray:
    """A float32 waveform in [-1, 1]: a few tones and noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = sum(rng.uniform(0.1, 0.4) * np.sin(2 * np.pi * rng.uniform(100, 3000) * t) for _ in range(3))
    return (wave + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


# ---- transformers as the reference ----------------------------------------------------------

def hf_llava(path):
    from transformers import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_llava_processor(path):
    """transformers' LlavaProcessor for the tiny checkpoint (PIL image backend: torchvision is not installed)."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaProcessor
    return LlavaProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(str(path)),
                          tokenizer=AutoTokenizer.from_pretrained(str(path)), patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


@torch.no_grad()
def hf_llava_greedy(model, processor, prompt: str, images: list, max_new_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt token ids after expansion, greedy tokens) of transformers' LLaVA."""
    inputs = processor(text=prompt, images=images or None, return_tensors="pt")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                         pad_token_id=0)
    return inputs.input_ids[0].tolist(), out[0, inputs.input_ids.shape[1]:].tolist()


def hf_granite_speech(path):
    from transformers import GraniteSpeechForConditionalGeneration
    return GraniteSpeechForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()


def reference_log_mel(wave: np.ndarray) -> torch.Tensor:
    """GraniteSpeechFeatureExtractor's features, computed without torchaudio (not installed, and
    the extractor requires it): transformers' numpy spectrogram and HTK mel filter bank (which
    reproduce torchaudio's MelSpectrogram), then the extractor's own post-processing steps."""
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    cfg = GRANITE_SPEECH_FEATURES["melspec_kwargs"]
    filters = mel_filter_bank(num_frequency_bins=cfg["n_fft"] // 2 + 1, num_mel_filters=cfg["n_mels"],
                              min_frequency=0.0, max_frequency=cfg["sample_rate"] / 2,
                              sampling_rate=cfg["sample_rate"], norm=None, mel_scale="htk")
    window = window_function(cfg["win_length"], "hann", frame_length=cfg["n_fft"], periodic=True)
    mel = spectrogram(wave.astype(np.float64), window, frame_length=cfg["n_fft"], hop_length=cfg["hop_length"],
                      fft_length=cfg["n_fft"], power=2.0, center=True, pad_mode="reflect", mel_filters=filters)
    logmel = torch.from_numpy(mel.T).clamp(min=1e-10).log10()          # [frames, n_mels]
    logmel = torch.maximum(logmel, logmel.max() - 8.0) / 4 + 1
    frames = logmel.shape[0] // 2 * 2
    return logmel[:frames].reshape(frames // 2, 2 * cfg["n_mels"]).float()


def reference_audio_tokens(num_samples: int) -> int:
    """Placeholder tokens of a clip, by GraniteSpeechFeatureExtractor's own method (which needs no torchaudio)."""
    from types import SimpleNamespace

    from transformers.models.granite_speech.feature_extraction_granite_speech import GraniteSpeechFeatureExtractor
    settings = SimpleNamespace(melspec_kwargs=GRANITE_SPEECH_FEATURES["melspec_kwargs"],
                               projector_window_size=GRANITE_SPEECH_FEATURES["projector_window_size"],
                               projector_downsample_rate=GRANITE_SPEECH_FEATURES["projector_downsample_rate"])
    return GraniteSpeechFeatureExtractor._get_num_audio_features(settings, [num_samples])[0]


@torch.no_grad()
def hf_granite_speech_greedy(model, tokenizer, prompt: str, wave: np.ndarray | None,
                             max_new_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt token ids after expansion, greedy tokens) of transformers' Granite Speech for a
    prompt with one <|audio|> (or none, wave None)."""
    features = None
    if wave is not None:
        prompt = prompt.replace(AUDIO_TOKEN, AUDIO_TOKEN * reference_audio_tokens(wave.size))
        features = reference_log_mel(wave)[None]
    ids = tokenizer(prompt).input_ids
    out = model.generate(torch.tensor([ids]), input_features=features, do_sample=False,
                         max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=0)
    return ids, out[0, len(ids):].tolist()


# ---- PEFT adapters on the language model ------------------------------------------------------

LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def write_mm_peft_lora(model, out_dir, *, target_modules=LM_TARGETS, rank: int = 8, alpha: float = 16,
                       seed: int = 0) -> Path:
    """PEFT's own adapter for a transformers multimodal model (get_peft_model, random lora_B, saved)."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules,
                                                           lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
    peft.save_pretrained(out_dir)
    return Path(out_dir)


def with_adapter(model, adapter_dir):
    """`model` (a fresh copy) with the PEFT adapter applied."""
    import copy

    from peft import PeftModel
    return PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir)).eval()


# ---- media as clients send them --------------------------------------------------------------------

def png_bytes(image) -> bytes:
    import io
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def wav_bytes(wave: np.ndarray, rate: int = 16000) -> bytes:
    """16-bit PCM mono WAV."""
    import io
    import wave as wavelib
    buffer = io.BytesIO()
    with wavelib.open(buffer, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.clip(wave * 32767, -32768, 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def data_url(data: bytes, mime: str) -> str:
    import base64
    return f"data:{mime};base64," + base64.b64encode(data).decode()
