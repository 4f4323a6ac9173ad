"""EngineConfig: every engine setting, validated once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from loraplex.errors import ConfigError

_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class EngineConfig:
    model: str
    dtype: str = "auto"                 # "auto" reads torch_dtype from config.json
    device: str | None = None           # None: "cuda" when available, else "cpu"
    seed: int = 0
    block_size: int = 16                # tokens per KV-cache block
    gpu_memory_utilization: float = 0.9 # fraction of GPU memory the engine may use
    kv_cache_bytes: int | None = None   # explicit KV budget (the CPU path's budget)
    max_model_len: int | None = None    # None: the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    # vLLM's: the most tokens one prompt computes in a step (0: up to the step's budget), so
    # that a long prompt shares steps with the others' instead of filling them (scheduler.py).
    long_prefill_token_threshold: int = 0
    enforce_eager: bool = False         # True: never use CUDA graphs
    attention_backend: str = "auto"     # "auto": Triton on CUDA, torch elsewhere; or "torch" / "triton"
    load_format: str = "auto"           # "dummy": random weights from config.json alone (benchmarks)
    # Overlap the host's work on step N with the device's on step N+1 (engine_core.py).
    async_scheduling: bool = True
    # Share the cached keys and values of prompt prefixes between requests (block_manager.py).
    enable_prefix_caching: bool = False
    # Default sampling parameters (core/generation_defaults.py): "auto" the model's
    # generation_config.json, "vllm" none, or a directory holding one; then these on top.
    generation_config: str = "auto"
    override_generation_config: dict | None = None
    # The most top tokens per position a request's logprobs / prompt_logprobs may ask for
    # (vLLM's default 20; -1: the whole vocabulary).
    max_logprobs: int = 20
    # Tensor parallelism (issue 18): ranks (GPUs, or CPU processes) the model is split over,
    # and how long a collective may wait for a peer before the engine stops with an error.
    tensor_parallel_size: int = 1
    distributed_timeout_seconds: float = 600.0
    # LoRA (issue 4)
    enable_lora: bool = False
    max_loras: int = 1                  # vLLM's default
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    allow_pickle_lora_weights: bool = False
    # vLLM's lora_dtype: "auto" is the model's dtype, the only one the LoRA kernels take;
    # naming another is refused when the model's dtype is known (LoRARuntime).
    lora_dtype: str = "auto"
    # vLLM's --lora-target-modules: None for every supported layer, else the fused layers
    # (qkv_proj, o_proj, gate_up_proj, down_proj; PEFT names map to theirs) that get LoRA.
    lora_target_modules: tuple[str, ...] | None = None
    # Multimodal models (docs/multimodal.md)
    limit_mm_per_prompt: dict[str, int] | None = None   # most items per prompt, per modality (None: no cap)
    default_mm_loras: dict[str, str] | None = None      # modality -> adapter path (or a resolver's name)
    allow_remote_media: bool = False                    # fetch http(s) image/audio URLs in chat messages
    allowed_media_domains: list[str] | None = None      # with allow_remote_media: only these hosts
    media_fetch_timeout: float = 5.0                    # seconds for one remote media download
    max_media_bytes: int = 25 * 2**20                   # largest image or audio file accepted

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < -1:
            raise ConfigError(f"max_logprobs must be an integer >= 0, or -1 for the whole vocabulary, "
                              f"got {self.max_logprobs!r}")
        if not isinstance(self.generation_config, str) or not self.generation_config:
            raise ConfigError(f"generation_config must be 'auto', 'vllm' or a directory, got {self.generation_config!r}")
        if self.override_generation_config is not None and not isinstance(self.override_generation_config, dict):
            raise ConfigError(f"override_generation_config must be a dict like {{\"temperature\": 0.5}}, "
                              f"got {self.override_generation_config!r}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ConfigError(f"attention_backend must be 'auto', 'torch' or 'triton', got {self.attention_backend!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError(f"load_format must be 'auto' (read the checkpoint) or 'dummy' (random weights), "
                              f"got {self.load_format!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ConfigError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if self.distributed_timeout_seconds <= 0:
            raise ConfigError(f"distributed_timeout_seconds must be positive, got {self.distributed_timeout_seconds}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_loras", "max_lora_rank", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.long_prefill_token_threshold, bool) or not isinstance(self.long_prefill_token_threshold, int) \
                or self.long_prefill_token_threshold < 0:
            raise ConfigError(f"long_prefill_token_threshold must be an integer >= 0 (0: no cap), "
                              f"got {self.long_prefill_token_threshold!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.lora_dtype not in _DTYPES:
            raise ConfigError(f"lora_dtype must be one of {', '.join(_DTYPES)}, got {self.lora_dtype!r}")
        if self.lora_target_modules is not None:
            from loraplex.core.lora.targets import packed_target_names
            if isinstance(self.lora_target_modules, str) or not self.lora_target_modules:
                raise ConfigError(f"lora_target_modules must be a non-empty list of module names, "
                                  f"got {self.lora_target_modules!r}")
            try:
                self.lora_target_modules = packed_target_names(self.lora_target_modules)
            except ValueError as e:
                raise ConfigError(f"lora_target_modules: {e}") from None
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        self._check_multimodal()
        if self.max_cpu_loras < self.max_loras:
            raise ConfigError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")

    def _check_multimodal(self) -> None:
        from loraplex.core.multimodal.inputs import MODALITIES

        for name, mapping, check in (("limit_mm_per_prompt", self.limit_mm_per_prompt, _is_count),
                                     ("default_mm_loras", self.default_mm_loras, _is_path)):
            if mapping is None:
                continue
            if not isinstance(mapping, dict):
                raise ConfigError(f"{name} must map modalities to values, e.g. {{\"image\": ...}}, got {mapping!r}")
            for modality, value in mapping.items():
                if modality not in MODALITIES:
                    raise ConfigError(f"{name} names the modality {modality!r}; known: {', '.join(MODALITIES)}")
                if not check(value):
                    raise ConfigError(f"{name}[{modality!r}] must be {check.__doc__}, got {value!r}")
        if self.default_mm_loras and not self.enable_lora:
            raise ConfigError("default_mm_loras needs enable_lora=True (--enable-lora)")
        if not self.media_fetch_timeout > 0:
            raise ConfigError(f"media_fetch_timeout must be > 0 seconds, got {self.media_fetch_timeout}")
        if self.max_media_bytes < 1:
            raise ConfigError(f"max_media_bytes must be >= 1, got {self.max_media_bytes}")
        if self.allowed_media_domains is not None and not all(
                isinstance(d, str) and d for d in self.allowed_media_domains):
            raise ConfigError(f"allowed_media_domains must be a list of host names, got {self.allowed_media_domains!r}")


def _is_count(value) -> bool:
    """an integer >= 0"""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_path(value) -> bool:
    """a non-empty adapter path or name"""
    return isinstance(value, str) and bool(value.strip())
