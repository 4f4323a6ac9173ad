"""Multimodal models offline: LLaVA images and Granite Speech audio, against transformers.

The tiny checkpoints (tests/mm_models.py) are built and saved by transformers; its models,
image processor and audio reference (transformers' numpy mel code, since the Granite Speech
feature extractor needs torchaudio, which is not installed) define the right answers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mm_models import (AUDIO_TOKEN, IMAGE_SIZE, hf_granite_speech, hf_granite_speech_greedy, hf_llava,
                       hf_llava_greedy, hf_llava_processor, random_audio, random_image, reference_audio_tokens,
                       reference_log_mel)
from PIL import Image

from loraplex import LLM, SamplingParams
from loraplex.core.multimodal.audio import LogMelFeatures, decode_wav, resample
from loraplex.core.multimodal.image import ImagePreprocessor
from loraplex.errors import InvalidRequestError

MAX_TOKENS = 6
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
LLAVA_PROMPT = "USER: <image>\nwhat is in the picture? ASSISTANT:"
LLAVA_TWO = "USER: <image> and <image>\ncompare them ASSISTANT:"
SPEECH_PROMPT = "<|user|><|audio|>what is said?</s><|assistant|>"


@pytest.fixture(scope="module")
def llava_llm(tiny_llava):
    return LLM(model=str(tiny_llava), device="cpu", max_model_len=128, block_size=4)


@pytest.fixture(scope="module")
def speech_llm(tiny_granite_speech):
    return LLM(model=str(tiny_granite_speech), device="cpu", max_model_len=256, block_size=4)


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


# ---- preprocessing against transformers --------------------------------------------------------

@pytest.mark.parametrize("size,mode", [((48, 40), "RGB"), ((30, 90), "RGB"), ((32, 32), "L"), ((64, 50), "RGBA"),
                                       ((20, 12), "RGB")])
def test_image_preprocessing_matches_clip_image_processor(tiny_llava, size, mode):
    from transformers import CLIPImageProcessorPil

    image = random_image(7, size).convert(mode)
    if mode == "RGBA":   # some transparency, composited onto white
        image.putalpha(Image.fromarray(np.random.default_rng(0).integers(0, 256, size[::-1], dtype=np.uint8)))
    ours = ImagePreprocessor.from_dir(tiny_llava, IMAGE_SIZE)(image)
    theirs = CLIPImageProcessorPil.from_pretrained(str(tiny_llava))(image, return_tensors="pt").pixel_values[0]
    assert ours.shape == theirs.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("seconds", [0.31, 1.37, 2.0])
def test_log_mel_features_match_granite_speech_extractor(seconds):
    wave = random_audio(3, seconds)
    ours = LogMelFeatures()(wave)
    theirs = reference_log_mel(wave)
    assert ours.shape == theirs.shape
    assert float((ours - theirs).abs().max()) < 1e-4
    assert LogMelFeatures().num_tokens(wave.size) == reference_audio_tokens(wave.size)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampling_keeps_a_tone(rate):
    t = np.arange(2 * rate) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    out = resample(tone, rate, 16000)
    assert out.size == 32000
    expected = 0.5 * np.sin(2 * np.pi * 440.0 * np.arange(out.size) / 16000)
    assert np.abs(out - expected)[100:-100].max() < 2e-3     # edges see the zero padding


def test_wav_decoding_pcm16_stereo_and_float(tmp_path):
    import wave as wavelib

    samples = (np.sin(np.linspace(0, 20, 800)) * 20000).astype(np.int16)
    path = tmp_path / "a.wav"
    with wavelib.open(str(path), "wb") as f:
        f.setnchannels(2), f.setsampwidth(2), f.setframerate(8000)
        f.writeframes(np.stack([samples, samples // 2], axis=1).tobytes())
    decoded, rate = decode_wav(path.read_bytes(), "the audio")
    assert rate == 8000 and decoded.shape == (800,)
    assert np.allclose(decoded, (samples.astype(np.float64) + samples // 2) / 2 / 32768, atol=1e-6)
    with pytest.raises(InvalidRequestError, match="not a readable WAV"):
        decode_wav(b"RIFF\x00\x00\x00\x00WAVEjunk", "the audio")


# ---- the encoders -------------------------------------------------------------------------------

def test_encoder_outputs_match_transformers(llava_llm, speech_llm, tiny_llava, tiny_granite_speech):
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    ours = torch.stack(llava_llm.llm_engine.runner.mm_encoder.encoder(list(pixels)))
    theirs = torch.stack(list(hf_llava(tiny_llava).model.get_image_features(pixel_values=pixels).pooler_output))
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)

    # Two clips of one length batched together, one of another alone; 47 steps leave a partial
    # attention block (context 20) and a partial projector window (15).
    clips = [torch.randn(47, 160), torch.randn(47, 160), torch.randn(30, 160)]
    ours = speech_llm.llm_engine.runner.mm_encoder.encoder(clips)
    reference = hf_granite_speech(tiny_granite_speech)
    for clip, out in zip(clips, ours):
        expected = reference.model.get_audio_features(clip[None]).pooler_output[0]
        assert out.shape == expected.shape
        assert torch.allclose(out, expected, atol=1e-5, rtol=1e-4)


# ---- generation against transformers -----------------------------------------------------------

def test_llava_one_and_two_images_and_text_match_transformers(llava_llm, tiny_llava):
    one, two, three = random_image(1), random_image(2, (30, 60)), random_image(3, (80, 33))
    cases = [(LLAVA_PROMPT, [one]), (LLAVA_TWO, [two, three]), ("USER: hello there ASSISTANT:", [])]
    prompts = [{"prompt": text, "multi_modal_data": {"image": images}} if images else text for text, images in cases]
    outputs = llava_llm.generate(prompts, GREEDY, use_tqdm=False)     # one mixed batch
    model, processor = hf_llava(tiny_llava), hf_llava_processor(tiny_llava)
    for output, (text, images) in zip(outputs, cases):
        prompt_ids, expected = hf_llava_greedy(model, processor, text, images, MAX_TOKENS)
        assert output.prompt_token_ids == prompt_ids
        assert output.outputs[0].token_ids == expected, text
    # The image matters: another image, another answer (else the comparison above proves little).
    other = llava_llm.generate({"prompt": LLAVA_PROMPT, "multi_modal_data": {"image": two}}, GREEDY, use_tqdm=False)
    assert _tokens(other) != _tokens(outputs[:1])


def test_granite_speech_audio_and_text_match_transformers(speech_llm, tiny_granite_speech):
    from transformers import AutoTokenizer

    wave = random_audio(0, 1.37)
    outputs = speech_llm.generate([{"prompt": SPEECH_PROMPT, "multi_modal_data": {"audio": (wave, 16000)}},
                                   "<|user|>hello there</s><|assistant|>"], GREEDY, use_tqdm=False)
    model, tokenizer = hf_granite_speech(tiny_granite_speech), AutoTokenizer.from_pretrained(str(tiny_granite_speech))
    for output, (text, clip) in zip(outputs, [(SPEECH_PROMPT, wave), ("<|user|>hello there</s><|assistant|>", None)]):
        prompt_ids, expected = hf_granite_speech_greedy(model, tokenizer, text, clip, MAX_TOKENS)
        assert output.prompt_token_ids == prompt_ids
        assert output.outputs[0].token_ids == expected
    other = speech_llm.generate({"prompt": SPEECH_PROMPT, "multi_modal_data": {"audio": (random_audio(5, 2.9), 16000)}},
                                GREEDY, use_tqdm=False)
    assert _tokens(other) != _tokens(outputs[:1])


def test_audio_at_another_rate_is_resampled(speech_llm):
    wave16 = random_audio(2, 1.0)
    wave8 = resample(wave16, 16000, 8000)
    [at16], [at8] = (speech_llm.llm_engine.process_request("r", {"prompt": SPEECH_PROMPT,
                                                                 "multi_modal_data": {"audio": (w, r)}}).mm_inputs.items
                     for w, r in ((wave16, 16000), (wave8, 8000)))
    assert at8.length == at16.length and at8.data.shape == at16.data.shape
    # Band-limited to 4 kHz and back: the low bins agree.
    assert float((at8.data[:, :40] - at16.data[:, :40]).abs().mean()) < 0.05


def test_chunked_prefill_and_preemption_reuse_encoder_outputs(tiny_llava):
    """Prompts chunked through their images, and preempted after them, give the same tokens,
    and every image goes through the encoder once."""
    images = [random_image(s) for s in range(4)]
    prompts = [{"prompt": LLAVA_PROMPT, "multi_modal_data": {"image": image}} for image in images]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    roomy = LLM(model=str(tiny_llava), device="cpu", max_model_len=128, block_size=4)
    expected = _tokens(roomy.generate(prompts, params, use_tqdm=False))
    # 7-token steps cut every 16-token image into chunks; 24 blocks of 4 tokens cannot hold four
    # sequences of 50 tokens, so some are preempted and recomputed.
    tight = LLM(model=str(tiny_llava), device="cpu", max_model_len=96, block_size=4,
                max_num_batched_tokens=7, kv_cache_bytes=24 * 4 * 2 * 2 * 2 * 16 * 4)
    assert tight.llm_engine.block_manager.num_blocks == 24
    assert _tokens(tight.generate(prompts, params, use_tqdm=False)) == expected
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert tight.llm_engine.runner.mm_encoder.num_items_encoded == len(images)


def test_n_samples_share_one_encoding(llava_llm):
    runner = llava_llm.llm_engine.runner.mm_encoder
    before = runner.num_items_encoded
    out = llava_llm.generate({"prompt": LLAVA_PROMPT, "multi_modal_data": {"image": random_image(9)}},
                             SamplingParams(n=3, temperature=1.0, seed=4, max_tokens=3, ignore_eos=True),
                             use_tqdm=False)[0]
    assert [len(c.token_ids) for c in out.outputs] == [3, 3, 3]
    assert runner.num_items_encoded - before == 1


def test_expanded_placeholders_are_accepted(llava_llm):
    image = random_image(4)
    tokenizer = llava_llm.get_tokenizer()
    single = llava_llm.llm_engine.process_request("a", {"prompt": LLAVA_PROMPT, "multi_modal_data": {"image": image}})
    expanded = tokenizer.encode(LLAVA_PROMPT.replace("<image>", "<image>" * 16))
    again = llava_llm.llm_engine.process_request("b", {"prompt_token_ids": expanded,
                                                       "multi_modal_data": {"image": image}})
    assert again.prompt_token_ids == single.prompt_token_ids
    assert again.mm_inputs.items[0].offset == single.mm_inputs.items[0].offset


# ---- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt,match", [
    ({"prompt": "USER: no placeholder ASSISTANT:", "multi_modal_data": {"image": "IMG"}},
     r"0 <image> placeholder token\(s\) but multi_modal_data has 1 image"),
    ({"prompt": LLAVA_TWO, "multi_modal_data": {"image": "IMG"}},
     r"2 <image> placeholder token\(s\) but multi_modal_data has 1 image"),
    ({"prompt": LLAVA_PROMPT}, r"1 <image> placeholder token\(s\) but no image was given"),
    ({"prompt": LLAVA_PROMPT, "multi_modal_data": {"audio": (np.zeros(1600), 16000)}},
     "takes image input only, not audio"),
    ({"prompt": LLAVA_PROMPT, "multi_modal_data": {"video": []}}, "unknown modality 'video'"),
    ({"prompt": LLAVA_PROMPT, "multi_modal_data": {"image": "not an image"}}, "must be a PIL.Image.Image, got str"),
    ({"prompt": LLAVA_PROMPT, "multi_modal_data": ["IMG"]}, "multi_modal_data must be a dict"),
])
def test_llava_bad_input_is_a_clear_error(llava_llm, prompt, match):
    if "multi_modal_data" in prompt and isinstance(prompt["multi_modal_data"], dict) and \
            prompt["multi_modal_data"].get("image") == "IMG":
        prompt = dict(prompt, multi_modal_data={"image": random_image(0)})
    with pytest.raises(InvalidRequestError, match=match):
        llava_llm.generate(prompt, GREEDY, use_tqdm=False)
    assert not llava_llm.llm_engine.has_unfinished_requests()


def test_limit_mm_per_prompt(tiny_llava):
    llm = LLM(model=str(tiny_llava), device="cpu", max_model_len=128, limit_mm_per_prompt={"image": 1})
    with pytest.raises(InvalidRequestError, match=r"2 image item\(s\) but at most 1 are allowed per prompt"):
        llm.generate({"prompt": LLAVA_TWO, "multi_modal_data": {"image": [random_image(0), random_image(1)]}},
                     GREEDY, use_tqdm=False)
    assert _tokens(llm.generate({"prompt": LLAVA_PROMPT, "multi_modal_data": {"image": random_image(0)}},
                                GREEDY, use_tqdm=False))


@pytest.mark.parametrize("audio,match", [
    ((np.zeros(16000 * 200, dtype=np.float32), 16000), r"lasts 200.0 s, which makes \d+ tokens"),
    ((np.zeros((2, 1600)), 16000), "must be a non-empty 1-D array"),
    ((np.array([0.0, np.nan] * 800), 16000), "NaN or infinite"),
    ((np.zeros(1600), 0), "sample rate must be a whole number"),
    (np.zeros(1600), r"must be a \(waveform, sample_rate\) pair"),
])
def test_speech_bad_audio_is_a_clear_error(speech_llm, audio, match):
    with pytest.raises(InvalidRequestError, match=match):
        speech_llm.generate({"prompt": SPEECH_PROMPT, "multi_modal_data": {"audio": audio}}, GREEDY, use_tqdm=False)


def test_text_model_refuses_multimodal_data(tiny_checkpoint):
    llm = LLM(model=str(tiny_checkpoint("llama")), device="cpu", max_model_len=64)
    with pytest.raises(InvalidRequestError, match="this model takes text only"):
        llm.generate({"prompt": "hi", "multi_modal_data": {"image": random_image(0)}}, GREEDY, use_tqdm=False)


def test_audio_placeholder_text_comes_from_the_tokenizer(speech_llm):
    assert speech_llm.llm_engine.mm_processor.placeholder_text == AUDIO_TOKEN


def test_processed_requests_are_plain_picklable_data(llava_llm, speech_llm):
    """Requests cross to the engine (its own process when serving) as plain data."""
    import pickle

    for llm, prompt in ((llava_llm, {"prompt": LLAVA_TWO, "multi_modal_data": {"image": [random_image(0),
                                                                                          random_image(1)]}}),
                        (speech_llm, {"prompt": SPEECH_PROMPT, "multi_modal_data": {"audio": (random_audio(0, 1.0),
                                                                                              16000)}})):
        request = llm.llm_engine.process_request("r", prompt)
        copy = pickle.loads(pickle.dumps(request))
        assert [(i.modality, i.offset, i.length) for i in copy.mm_inputs.items] == \
            [(i.modality, i.offset, i.length) for i in request.mm_inputs.items]
        assert all(torch.equal(a.data, b.data) for a, b in zip(copy.mm_inputs.items, request.mm_inputs.items))


def test_tensor_parallel_ranks_get_the_encoder_outputs(tiny_llava, tiny_granite_speech, llava_llm, speech_llm):
    """With 2 ranks (gloo, CPU) only rank 0 encodes; the others receive its rows by broadcast.
    Chunked steps cut through the image so steps mix placeholder rows with text and decodes."""
    cases = [(tiny_llava, llava_llm, {"prompt": LLAVA_TWO, "multi_modal_data": {"image": [random_image(1),
                                                                                         random_image(2)]}}),
             (tiny_granite_speech, speech_llm, {"prompt": SPEECH_PROMPT,
                                                "multi_modal_data": {"audio": (random_audio(0, 1.37), 16000)}})]
    for path, one_device, prompt in cases:
        expected = _tokens(one_device.generate([prompt, "hello there"], GREEDY, use_tqdm=False))
        tp = LLM(model=str(path), device="cpu", max_model_len=256, block_size=4, tensor_parallel_size=2,
                 max_num_batched_tokens=12, distributed_timeout_seconds=60)
        try:
            assert tp.llm_engine.runner.local.mm_encoder is not None
            assert _tokens(tp.generate([prompt, "hello there"], GREEDY, use_tqdm=False)) == expected
        finally:
            tp.llm_engine.runner.shutdown()


def test_engine_process_takes_images_and_audio(tiny_llava, tiny_granite_speech, llava_llm, speech_llm):
    """`loraplex serve`'s engine process: the API side preprocesses the media (its own
    MultimodalProcessor, what the server renders chat media with), the tensors cross the pipe
    with the request, and the answers equal the offline LLM's."""
    import asyncio

    from loraplex.core.async_engine import AsyncEngine
    from loraplex.core.config import EngineConfig

    cases = [(tiny_llava, llava_llm, 128, {"prompt": LLAVA_TWO, "multi_modal_data": {"image": [random_image(1),
                                                                                              random_image(2)]}}),
             (tiny_granite_speech, speech_llm, 256, {"prompt": SPEECH_PROMPT,
                                                     "multi_modal_data": {"audio": (random_audio(0, 1.37), 16000)}})]

    async def run(engine, prompts) -> list[list[int]]:
        async def one(i, prompt):
            async for out in engine.generate(prompt, GREEDY, f"r{i}"):
                final = out
            return final.outputs[0].token_ids
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    for path, offline, max_model_len, prompt in cases:
        prompts = [prompt, "hello there", prompt]
        expected = _tokens(offline.generate(prompts, GREEDY, use_tqdm=False))
        engine = AsyncEngine.from_config(EngineConfig(model=str(path), device="cpu", max_model_len=max_model_len,
                                                      block_size=4), engine_process=True)
        try:
            assert engine.engine_pid is not None
            assert engine.mm_processor.placeholder_text == offline.llm_engine.mm_processor.placeholder_text
            assert asyncio.run(run(engine, prompts)) == expected
        finally:
            engine.shutdown()
