"""Audio: WAV decoding, resampling, and Granite Speech's log-mel features, with numpy and torch.

Features are what GraniteSpeechFeatureExtractor computes (its torchaudio MelSpectrogram, here
torch.stft and our own HTK mel filterbank): a power spectrogram (Hann window of win_length
samples centred in n_fft, hop_length hop, reflect padding), mel_filters @ power, log10 with a
floor of 1e-10, clamped to (max - 8), then /4 + 1; an odd last frame is dropped and pairs of
frames are stacked, so each step of [2 * n_mels] features covers two hops.

    waveform [num_samples] float32 (16 kHz) -> features [num_steps, 2 * n_mels]

Waveforms at another rate are resampled first (band-limited: windowed-sinc interpolation).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loraplex.errors import ConfigError, InvalidRequestError

# Windowed-sinc resampling: zero crossings of the sinc kept on each side, and the low-pass cutoff
# as a fraction of the lower rate's Nyquist frequency.
_SINC_ZEROS, _ROLLOFF = 6, 0.99
_MAX_KERNEL_ELEMENTS = 20_000_000   # a rate pair needing a larger polyphase kernel is refused


def resample(wave: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """`wave` (1-D float) at `rate` Hz, resampled to `target_rate` Hz; float32."""
    if rate == target_rate:
        return wave.astype(np.float32, copy=False)
    common = math.gcd(rate, target_rate)
    step_in, step_out = rate // common, target_rate // common   # each block of step_in inputs -> step_out outputs
    # Low-pass cutoff relative to the input's Nyquist frequency (1: no filtering).
    cutoff = min(step_in, step_out) * _ROLLOFF / step_in
    half = math.ceil(_SINC_ZEROS / cutoff)
    taps = np.arange(-half, half + step_in)                     # input offsets one block's outputs read
    if step_out * taps.size > _MAX_KERNEL_ELEMENTS:
        raise InvalidRequestError(f"audio at {rate} Hz cannot be resampled to {target_rate} Hz here (the rates "
                                  f"share no large factor); resample it to {target_rate} Hz before sending it")
    # Output j of a block sits at input position j * step_in / step_out within the block.
    x = cutoff * (taps[None, :] - np.arange(step_out)[:, None] * step_in / step_out)   # [step_out, taps]
    x = np.clip(x, -_SINC_ZEROS, _SINC_ZEROS)
    kernel = cutoff * np.sinc(x) * np.cos(np.pi / 2 * x / _SINC_ZEROS) ** 2             # Hann-windowed sinc
    padded = np.pad(wave.astype(np.float64), (half, half + step_in))
    blocks = np.lib.stride_tricks.sliding_window_view(padded, taps.size)[::step_in]   # [num_blocks, taps]
    out = (blocks @ kernel.T).reshape(-1)                                              # block after block
    return out[:math.ceil(wave.size * step_out / step_in)].astype(np.float32)


def decode_wav(data: bytes, where: str) -> tuple[np.ndarray, int]:
    """(mono float32 waveform in [-1, 1], sample rate) of a WAV file (PCM 8/16/24/32-bit or float)."""
    def fail(reason: str) -> InvalidRequestError:
        return InvalidRequestError(f"{where} is not a readable WAV file ({reason}); send 16-bit PCM WAV audio")

    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise fail("no RIFF/WAVE header")
    fmt, samples, pos = None, None, 12
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]
        if chunk == b"fmt " and len(body) >= 16:
            fmt = struct.unpack("<HHIIHH", body[:16])
            if fmt[0] == 0xFFFE and len(body) >= 26:   # WAVE_FORMAT_EXTENSIBLE: the subformat says
                fmt = (struct.unpack("<H", body[24:26])[0],) + fmt[1:]
        elif chunk == b"data":
            samples = body
        pos += 8 + size + (size & 1)
    if fmt is None or samples is None:
        raise fail("no fmt or data chunk")
    tag, channels, rate, _, _, bits = fmt
    dtypes = {(1, 8): np.uint8, (1, 16): np.int16, (1, 32): np.int32, (3, 32): np.float32, (3, 64): np.float64}
    if channels < 1 or rate < 1:
        raise fail(f"{channels} channels at {rate} Hz")
    if (tag, bits) == (1, 24):
        raw = np.frombuffer(samples[:len(samples) // 3 * 3], dtype=np.uint8).reshape(-1, 3)
        ints = (raw[:, 0].astype(np.int32) | raw[:, 1].astype(np.int32) << 8 | raw[:, 2].astype(np.int32) << 16)
        wave = ((ints << 8) >> 8).astype(np.float64) / 2**23
    elif (tag, bits) in dtypes:
        dtype = np.dtype(dtypes[tag, bits]).newbyteorder("<")
        wave = np.frombuffer(samples[:len(samples) // dtype.itemsize * dtype.itemsize], dtype=dtype).astype(np.float64)
        if tag == 1:
            wave = (wave - 128) / 128 if bits == 8 else wave / 2 ** (bits - 1)
    else:
        raise fail(f"format tag {tag} with {bits}-bit samples is not supported")
    wave = wave[:wave.size // channels * channels].reshape(-1, channels).mean(axis=1)   # down-mix to mono
    return wave.astype(np.float32), rate


def mel_filterbank(num_freqs: int, num_mels: int, sample_rate: int, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """HTK-scale triangular filters, unnormalised, on the FFT bins: [num_freqs, num_mels]."""
    f_max = sample_rate / 2 if f_max is None else f_max
    bins = torch.linspace(0, sample_rate // 2, num_freqs, dtype=torch.float64)
    mel_lo, mel_hi = (2595.0 * math.log10(1.0 + f / 700.0) for f in (f_min, f_max))
    edges = 700.0 * (10 ** (torch.linspace(mel_lo, mel_hi, num_mels + 2, dtype=torch.float64) / 2595.0) - 1.0)
    widths = edges[1:] - edges[:-1]                                  # [num_mels + 1]
    rel = edges[None, :] - bins[:, None]                             # [num_freqs, num_mels + 2]
    rising, falling = -rel[:, :-2] / widths[:-1], rel[:, 2:] / widths[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


@dataclass(frozen=True)
class LogMelFeatures:
    sample_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 80
    window_size: int = 15            # the projector's window, in encoder steps
    downsample_rate: int = 5         # window_size / downsample_rate embeddings per window

    @classmethod
    def from_dir(cls, model_dir: str | Path, window_size: int, downsample_rate: int) -> "LogMelFeatures":
        path = Path(model_dir) / "preprocessor_config.json"
        raw = {}
        if path.is_file():
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON ({e}).") from e
        mel = dict(raw, **(raw.get("melspec_kwargs") or {}))
        return cls(sample_rate=int(mel.get("sample_rate", mel.get("sampling_rate", 16000))),
                   n_fft=int(mel.get("n_fft", 512)), win_length=int(mel.get("win_length", 400)),
                   hop_length=int(mel.get("hop_length", 160)), n_mels=int(mel.get("n_mels", 80)),
                   window_size=int(raw.get("projector_window_size", window_size)),
                   downsample_rate=int(raw.get("projector_downsample_rate", downsample_rate)))

    def num_tokens(self, num_samples: int) -> int:
        """Embeddings the projector makes of a clip of `num_samples` samples (at sample_rate)."""
        steps = (num_samples // self.hop_length + 1) // 2
        return math.ceil(steps / self.window_size) * (self.window_size // self.downsample_rate)

    def __call__(self, wave: np.ndarray) -> torch.Tensor:
        """[num_samples] float waveform at sample_rate -> features [num_steps, 2 * n_mels] float32."""
        audio = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
        window = torch.hann_window(self.win_length, periodic=True)
        spec = torch.stft(audio, self.n_fft, self.hop_length, self.win_length, window, center=True,
                          pad_mode="reflect", return_complex=True).abs() ** 2        # [n_fft/2 + 1, frames]
        filters = mel_filterbank(self.n_fft // 2 + 1, self.n_mels, self.sample_rate)
        logmel = (filters.T @ spec).T.clamp(min=1e-10).log10()                      # [frames, n_mels]
        logmel = torch.maximum(logmel, logmel.max() - 8.0) / 4 + 1
        frames = logmel.shape[0] // 2 * 2
        return logmel[:frames].reshape(frames // 2, 2 * self.n_mels)


def check_waveform(item, where: str) -> tuple[np.ndarray, int]:
    """A user's (waveform, sample_rate) pair, checked: a 1-D finite float array and a positive rate."""
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise InvalidRequestError(f"{where} must be a (waveform, sample_rate) pair, got {type(item).__name__}")
    wave, rate = item
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu().numpy()
    wave = np.asarray(wave)
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer)) or rate != int(rate) or \
            not 1000 <= rate <= 384000:
        raise InvalidRequestError(f"{where}: the sample rate must be a whole number of Hz in [1000, 384000], "
                                  f"got {rate!r}")
    if wave.ndim != 1 or wave.size == 0 or not np.issubdtype(wave.dtype, np.number):
        raise InvalidRequestError(f"{where}: the waveform must be a non-empty 1-D array of samples (mono), "
                                  f"got shape {wave.shape} of {wave.dtype}")
    wave = wave.astype(np.float32)
    if not np.isfinite(wave).all():
        raise InvalidRequestError(f"{where}: the waveform holds NaN or infinite samples")
    return wave, int(rate)


def load_audio_bytes(data: bytes, where: str) -> tuple[np.ndarray, int]:
    """Decode an audio file sent by a client (WAV only: no decoder for compressed formats is bundled)."""
    if data[:4] == b"RIFF":
        return decode_wav(data, where)
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0):
        raise InvalidRequestError(f"{where} is MP3, which loraplex does not decode; send WAV audio")
    raise InvalidRequestError(f"{where} is not WAV audio; send WAV (PCM or float) audio")



class AudioItems:
    """The processor of one model's audio: (waveform, rate) -> (log-mel features, placeholder tokens)."""

    modality = "audio"

    def __init__(self, features: LogMelFeatures):
        self.features = features

    def num_tokens(self, item, where: str, *, max_tokens: int | None = None) -> int:
        """Placeholder tokens of a clip; InvalidRequestError if it is malformed or takes more than max_tokens."""
        wave, rate = check_waveform(item, where)
        tokens = self.features.num_tokens(math.ceil(wave.size * self.features.sample_rate / rate))
        if max_tokens is not None and tokens > max_tokens:
            raise InvalidRequestError(
                f"{where} lasts {wave.size / rate:.1f} s, which makes {tokens} tokens, but only {max_tokens} are "
                f"left of max_model_len beside the rest of the prompt; send a shorter clip")
        return tokens

    def __call__(self, item, where: str, *, max_tokens: int) -> tuple[torch.Tensor, int]:
        tokens = self.num_tokens(item, where, max_tokens=max_tokens)   # before any resampling or feature work
        wave, rate = check_waveform(item, where)
        return self.features(resample(wave, rate, self.features.sample_rate)), tokens
