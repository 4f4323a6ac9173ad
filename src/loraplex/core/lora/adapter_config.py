"""LoRAAdapterConfig: the parts of a PEFT adapter_config.json that change what the adapter computes.

Everything a LoRA variant adds on top of plain `B @ A * scaling` (DoRA, bias terms, extra
trained modules, ...) is rejected here with an AdapterInvalidError that names the field:
serving such an adapter as a plain LoRA would silently give different outputs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from loraplex.core.lora.targets import KNOWN_UNSUPPORTED_MODULES, SUPPORTED_PEFT_MODULES
from loraplex.errors import AdapterInvalidError

# Config fields of LoRA variants whose forward pass is not plain LoRA; any truthy value is refused.
_UNSUPPORTED_VARIANT_FIELDS = {
    "use_dora": "DoRA adapters (use_dora=true) are not supported; merge the adapter into the base model "
                "or retrain it without DoRA",
    "lora_bias": "adapters with a bias on lora_B (lora_bias=true) are not supported; retrain with lora_bias=false",
    "modules_to_save": "adapters with fully trained extra modules (modules_to_save={value!r}) are not "
                       "supported: those modules would replace base-model weights; merge the adapter "
                       "and serve it as its own model",
    "trainable_token_indices": "adapters with trained token embeddings (trainable_token_indices) are not supported",
    "layer_replication": "adapters with layer_replication are not supported",
    "target_parameters": "adapters that target parameters directly (target_parameters) are not supported",
    "use_qalora": "QA-LoRA adapters (use_qalora=true) are not supported",
    "alora_invocation_tokens": "activated-LoRA adapters (alora_invocation_tokens) are not supported",
    "use_bdlora": "BD-LoRA adapters (use_bdlora) are not supported",
    "arrow_config": "Arrow adapters (arrow_config) are not supported",
    "kasa_config": "KaSA adapters (kasa_config) are not supported",
    "velora_config": "VeLoRA adapters (velora_config) are not supported",
    "monteclora_config": "MonteCLoRA adapters (monteclora_config) are not supported",
}


@dataclass(frozen=True)
class LoRAAdapterConfig:
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | None   # None when PEFT's target_modules is a regex string
    base_model_name_or_path: str | None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def rank_and_alpha(self, module_key: str) -> tuple[int, float]:
        """Rank and alpha of one module, e.g. "model.layers.3.self_attn.q_proj", as PEFT resolves them."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, module_key), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module_key), self.lora_alpha)
        return r, alpha

    def scaling(self, module_key: str) -> float:
        """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r, alpha = self.rank_and_alpha(module_key)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def max_rank(self) -> int:
        return max([self.r, *self.rank_pattern.values()])


def _pattern_key(patterns: dict, module_key: str) -> str | None:
    # PEFT matches a pattern against the end of the module name, on a '.' boundary.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_key):
            return key
    return None


def parse_adapter_config(config: dict, where: str) -> LoRAAdapterConfig:
    """Validate a parsed adapter_config.json; `where` names the adapter in error messages."""
    for name, message in _UNSUPPORTED_VARIANT_FIELDS.items():
        value = config.get(name)
        if value:
            raise AdapterInvalidError(f"adapter {where}: " + message.format(value=value))
    bias = config.get("bias", "none")
    if bias != "none":
        raise AdapterInvalidError(f"adapter {where} has bias={bias!r}; only bias='none' is supported "
                                  f"(trained biases would change base-model weights)")
    r = _positive_int(config.get("r"), "r", where)
    alpha = _number(config.get("lora_alpha", r), "lora_alpha", where)
    rank_pattern = _pattern_dict(config.get("rank_pattern"), "rank_pattern", where, _positive_int)
    alpha_pattern = _pattern_dict(config.get("alpha_pattern"), "alpha_pattern", where, _number)
    return LoRAAdapterConfig(
        r=r, lora_alpha=alpha, use_rslora=bool(config.get("use_rslora", False)),
        target_modules=_target_modules(config.get("target_modules"), where),
        base_model_name_or_path=config.get("base_model_name_or_path") or None,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def _target_modules(value, where: str) -> tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        # A regex (or nothing): the weight names decide which modules are adapted.
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, str) for m in value):
        raise AdapterInvalidError(f"adapter {where}: target_modules must be a list of module names "
                                  f"or a regex string, got {value!r}")
    supported = ", ".join(SUPPORTED_PEFT_MODULES)
    for module in value:
        short = module.rsplit(".", 1)[-1]
        if short in SUPPORTED_PEFT_MODULES:
            continue
        if short in KNOWN_UNSUPPORTED_MODULES:
            raise AdapterInvalidError(f"adapter {where} targets {module!r}, which loraplex does not "
                                      f"adapt; supported target modules: {supported}")
        raise AdapterInvalidError(f"adapter {where} targets {module!r}, which does not exist in this "
                                  f"model (Llama-family layout); supported target modules: {supported}. "
                                  f"Was the adapter trained for a different architecture?")
    return tuple(value)


def _positive_int(value, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterInvalidError(f"adapter {where}: {name} must be a positive integer, got {value!r}")
    return value


def _number(value, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterInvalidError(f"adapter {where}: {name} must be a finite number, got {value!r}")
    return float(value)


def _pattern_dict(value, name: str, where: str, check) -> dict:
    if not value:
        return {}
    if not isinstance(value, dict):
        raise AdapterInvalidError(f"adapter {where}: {name} must be an object mapping module "
                                  f"patterns to values, got {value!r}")
    for key in value:
        try:
            re.compile(key)
        except re.error as e:
            raise AdapterInvalidError(f"adapter {where}: {name} key {key!r} is not a valid pattern: {e}") from None
    return {key: check(v, f"{name}[{key!r}]", where) for key, v in value.items()}
