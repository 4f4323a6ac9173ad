"""Default sampling parameters recommended by the checkpoint's generation_config.json.

vLLM's `--generation-config` (default "auto"): a request that leaves temperature, top_p,
top_k, min_p or repetition_penalty unset gets the value the model's creator put in
generation_config.json, and its `max_new_tokens` caps max_tokens, as in vLLM. A value the
file sets is a recommendation (what transformers' GenerationConfig.to_diff_dict keeps: since
transformers 5 every sampling default is unset). "vllm" ignores the file (the engine's
neutral defaults); a directory reads that directory's file instead.
`override_generation_config` ({"temperature": 0.5, ...}) is applied on top, either way.

The server reads them once at start-up (server/sampling.py fills what a request leaves
unset); LLM.generate uses them when it is given no SamplingParams
(LLM.get_default_sampling_params).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from loraplex.errors import ConfigError, InvalidRequestError

logger = logging.getLogger(__name__)

# The generation_config.json keys vLLM reads.
KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def generation_defaults(model_dir: str | Path, generation_config: str = "auto",
                        overrides: dict | None = None) -> dict:
    """{SamplingParams field: value} a request gets for what it leaves unset ({} for none)."""
    if generation_config == "vllm":
        recommended = {}
    else:
        directory = Path(model_dir if generation_config == "auto" else generation_config)
        if generation_config != "auto" and not (directory / "generation_config.json").is_file():
            raise ConfigError(f"generation_config {generation_config!r} is not a directory holding a "
                              f"generation_config.json; pass 'auto' (the model's), 'vllm' (none) or such a directory")
        recommended = _read(directory / "generation_config.json")
    unknown = sorted(set(overrides or {}) - set(KEYS))
    if unknown:
        raise ConfigError(f"override_generation_config: unknown key(s) {', '.join(unknown)}; it takes "
                          f"{', '.join(KEYS)}")
    config = {**recommended, **(overrides or {})}
    defaults = {key: config[key] for key in KEYS if config.get(key) is not None}
    if "max_new_tokens" in defaults:
        defaults["max_tokens"] = defaults.pop("max_new_tokens")   # transformers' name for it
    from loraplex.core.sampling_params import SamplingParams
    try:
        SamplingParams(**defaults)
    except InvalidRequestError as e:
        raise ConfigError(f"the default sampling parameters {defaults} (generation_config "
                          f"{generation_config!r}) are not valid: {e}") from None
    if defaults:
        logger.warning("default sampling parameters from the model's generation config: %s (requests that set "
                       "them keep theirs; --generation-config vllm ignores the file)", defaults)
    return defaults


def _read(path: Path) -> dict:
    """The sampling values a generation_config.json sets."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return {key: raw[key] for key in KEYS if raw.get(key) is not None}
