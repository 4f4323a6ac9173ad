"""ModelConfig: the architecture read from a checkpoint's config.json, and the dtype rule.

A multimodal checkpoint (LLaVA, Granite Speech) nests its language model's config under
`text_config`: that is what ModelConfig describes, and the whole config.json is kept in
`multimodal` for the encoder towers (core/models/).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.errors import ConfigError, UnsupportedModelError

# All four share one model implementation; they differ only in config fields
# (Qwen2: q/k/v bias; Mistral: sliding window; Granite: four scalar multipliers).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GraniteForCausalLM")
# Vision/audio towers in front of one of the language models above (core/models/).
MULTIMODAL_ARCHITECTURES = ("LlavaForConditionalGeneration", "GraniteSpeechForConditionalGeneration")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ARCH_OF_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                       "granite": "GraniteForCausalLM", "llava": "LlavaForConditionalGeneration",
                       "granite_speech": "GraniteSpeechForConditionalGeneration"}
# transformers' defaults for the fields a nested text_config may leave out (llava-1.5-7b-hf's
# names only a few): the sub-config's class fills them in, so the checkpoint relies on them.
_TEXT_CONFIG_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6),
    "granite": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6),
}
# Whether a multimodal checkpoint ties lm_head to the embeddings when config.json does not say.
_MULTIMODAL_TIE_DEFAULT = {"LlavaForConditionalGeneration": False, "GraniteSpeechForConditionalGeneration": True}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict | None        # None, or {"rope_type": "linear"|"llama3", ...}
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool                     # Llama/Mistral attention_bias covers o_proj too; Qwen2's bias does not
    mlp_bias: bool
    sliding_window: int | None       # tokens a query may look back (Mistral), None = unlimited
    checkpoint_dtype: str | None     # torch_dtype of config.json, e.g. "bfloat16"
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # Granite's multipliers (1.0 / None elsewhere): embeddings are scaled by embedding_multiplier,
    # each sublayer's output by residual_multiplier before it joins the residual stream,
    # attention scores by attention_multiplier (None: head_dim ** -0.5), logits divided by logits_scaling.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    # A multimodal checkpoint's whole config.json (its towers are built from it); None for text models.
    multimodal: dict | None = None

    @property
    def language_architecture(self) -> str:
        """The architecture of the language model (the checkpoint's own, for a text model)."""
        if self.multimodal is None:
            return self.architecture
        return _architecture(self.multimodal["text_config"], SUPPORTED_ARCHITECTURES)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        model_dir = Path(model_dir)
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise ConfigError(f"{model_dir} is not a model checkpoint: it has no config.json. "
                              "Pass the directory of a Hugging Face checkpoint.")
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config_path} is not valid JSON ({e}); re-download the checkpoint.") from e
        generation = model_dir / "generation_config.json"
        generation_raw = json.loads(generation.read_text()) if generation.is_file() else {}
        return cls.from_dict(raw, generation_raw)

    @classmethod
    def from_dict(cls, raw: dict, generation: dict | None = None) -> "ModelConfig":
        arch = _architecture(raw, SUPPORTED_ARCHITECTURES + MULTIMODAL_ARCHITECTURES)
        if arch in MULTIMODAL_ARCHITECTURES:
            return cls._from_multimodal(arch, raw, generation)
        return cls._from_text(arch, raw, generation)

    @classmethod
    def _from_multimodal(cls, arch: str, raw: dict, generation: dict | None) -> "ModelConfig":
        text = raw.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"config.json of a {arch} lacks its language model's text_config.")
        text = dict(_TEXT_CONFIG_DEFAULTS.get(text.get("model_type"), {}), **text)
        language = _architecture(text, SUPPORTED_ARCHITECTURES)
        tie = bool(raw.get("tie_word_embeddings", _MULTIMODAL_TIE_DEFAULT[arch])) or \
            bool(text.get("tie_word_embeddings", False))
        # Special token ids and the dtype are often only at the top level.
        for key in ("bos_token_id", "eos_token_id", "torch_dtype", "dtype"):
            if text.get(key) is None and raw.get(key) is not None:
                text[key] = raw[key]
        lm = cls._from_text(language, dict(text, tie_word_embeddings=tie), generation)
        return dataclasses.replace(lm, architecture=arch, multimodal=raw)

    @classmethod
    def _from_text(cls, arch: str, raw: dict, generation: dict | None) -> "ModelConfig":
        hidden_act = raw.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise UnsupportedModelError(f"hidden_act {hidden_act!r} is not supported; only 'silu' is.")
        try:
            num_heads = int(raw["num_attention_heads"])
            hidden_size = int(raw["hidden_size"])
            fields = dict(
                vocab_size=int(raw["vocab_size"]), hidden_size=hidden_size,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]), num_heads=num_heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
                head_dim=int(raw.get("head_dim") or hidden_size // num_heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the required field {e.args[0]!r}.") from e
        if fields["num_heads"] % fields["num_kv_heads"]:
            raise ConfigError(f"num_attention_heads ({num_heads}) must be a multiple of "
                              f"num_key_value_heads ({fields['num_kv_heads']}).")
        rope_theta, rope_scaling = _read_rope(raw)
        sliding_window = raw.get("sliding_window")
        if arch == "Qwen2ForCausalLM" and not raw.get("use_sliding_window", False):
            sliding_window = None
        if arch == "Qwen2ForCausalLM" and sliding_window is not None:
            raise UnsupportedModelError("Qwen2 with use_sliding_window=true (per-layer windows) is not supported.")
        return cls(
            architecture=arch, **fields, rope_theta=rope_theta, rope_scaling=rope_scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
            o_bias=arch != "Qwen2ForCausalLM" and bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            sliding_window=int(sliding_window) if sliding_window else None,
            checkpoint_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_eos_ids(raw, generation or {}),
            **_granite_multipliers(raw, arch),
        )


def _architecture(raw: dict, supported: tuple[str, ...]) -> str:
    # Some hand-written configs name only model_type.
    architectures = raw.get("architectures") or [_ARCH_OF_MODEL_TYPE.get(raw.get("model_type"), "")]
    arch = next((a for a in architectures if a in supported), None)
    if arch is None:
        raise UnsupportedModelError(
            f"architecture {raw.get('architectures') or raw.get('model_type')!r} is not supported; "
            f"loraplex implements {', '.join(supported)}.")
    return arch


def _granite_multipliers(raw: dict, arch: str) -> dict:
    if arch != "GraniteForCausalLM":
        return {}
    values = {}
    for name in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
        value = raw.get(name, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"config.json {name} must be a positive number, got {value!r}.")
        values[name] = float(value)
    return values


def _read_rope(raw: dict) -> tuple[float, dict | None]:
    """RoPE settings from either the old (rope_theta + rope_scaling) or new (rope_parameters) format."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"rope scaling type {rope_type!r} is not supported; "
                                    f"loraplex implements {', '.join(SUPPORTED_ROPE_TYPES)}.")
    if rope_type == "default":
        return theta, None
    params["rope_type"] = rope_type
    params.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings", 2048))
    required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}[rope_type]
    missing = [k for k in required if k not in params]
    if missing:
        raise ConfigError(f"rope scaling {rope_type!r} in config.json lacks {', '.join(missing)}.")
    return theta, params


def _eos_ids(raw: dict, generation: dict) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (raw.get("eos_token_id"), generation.get("eos_token_id")):
        for i in source if isinstance(source, list) else [source]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return tuple(ids)


def resolve_dtype(requested: str, checkpoint_dtype: str | None, device: torch.device) -> torch.dtype:
    """The dtype weights and activations use.

    "auto" on CPU is float32 (CPU half-precision matmuls are slow and lossy); on GPU it is the
    checkpoint's torch_dtype, or bfloat16 when config.json does not say. An explicit
    "float32" / "float16" / "bfloat16" always wins.
    """
    if requested != "auto":
        if requested not in _DTYPES:
            raise ConfigError(f"dtype must be one of auto, {', '.join(_DTYPES)}, got {requested!r}")
        return _DTYPES[requested]
    if device.type == "cpu":
        return torch.float32
    if checkpoint_dtype is None:
        return torch.bfloat16
    if checkpoint_dtype not in _DTYPES:
        raise ConfigError(f"config.json torch_dtype {checkpoint_dtype!r} is not one of {', '.join(_DTYPES)}; "
                          "pass dtype='bfloat16' (or another) explicitly.")
    return _DTYPES[checkpoint_dtype]
