"""Load a PEFT LoRA adapter directory into CPU tensors laid out for our fused layers.

Validation is strict: every tensor must belong to a module the model has and adapts, with
the shape the model expects and finite values; the scaling (alpha/r, or alpha/sqrt(r) with
rsLoRA) is folded into B here so that activation is a plain copy into a device slot.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loraplex.core.lora.adapter_config import LoRAAdapterConfig, parse_adapter_config
from loraplex.core.lora.targets import (KNOWN_UNSUPPORTED_MODULES, PEFT_MODULE_PARENT, PEFT_MODULE_TO_PACKED,
                                        SUPPORTED_PEFT_MODULES, LoRAModelSpec)
from loraplex.errors import AdapterInvalidError
from loraplex.lora_request import LoRARequest
from loraplex.resolvers.validation import PICKLE_FILE, base_model_compatible, validate_adapter_dir

logger = logging.getLogger(__name__)

# PEFT's saved names: base_model.model.model.layers.<i>.<self_attn|mlp>.<module>.lora_<A|B>.weight
_TENSOR_NAME = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(\w+)\.(\w+)\.lora_(A|B)\.weight$")


@dataclass
class PackedLoRAWeights:
    """One adapter's weights for one fused layer of one decoder layer; None = slice not adapted."""
    lora_a: list[torch.Tensor | None]   # per slice: [rank_i, in_features]
    lora_b: list[torch.Tensor | None]   # per slice: [out_i, rank_i], scaling folded in


@dataclass
class LoRAAdapter:
    """A validated adapter held in CPU memory, ready to be copied into a device slot."""
    request: LoRARequest
    rank: int                                            # the largest rank of any module
    weights: dict[tuple[int, str], PackedLoRAWeights]    # (layer, packed module) -> weights

    @property
    def lora_int_id(self) -> int:
        return self.request.lora_int_id

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in self.weights.values()
                   for t in (*w.lora_a, *w.lora_b) if t is not None)


def load_lora_adapter(request: LoRARequest, spec: LoRAModelSpec, *, max_lora_rank: int,
                      served_model_name: str | None = None, served_aliases: tuple[str, ...] = (),
                      allow_pickle: bool = False) -> LoRAAdapter:
    """Read and validate `request.lora_path`; raise AdapterInvalidError saying what is wrong."""
    where = f"{request.lora_name!r} ({request.lora_path})"
    files = validate_adapter_dir(request.lora_path, allow_pickle=allow_pickle)
    config = parse_adapter_config(files.config, where)
    _check_base_model(config, request, where, served_model_name, served_aliases)
    if config.max_rank > max_lora_rank:
        raise AdapterInvalidError(
            f"adapter {where} has rank {config.max_rank}, above max_lora_rank={max_lora_rank}; "
            f"start the engine with max_lora_rank >= {config.max_rank} (--max-lora-rank)")
    tensors = _read_tensors(files.weights_path, where)
    weights = _pack(tensors, config, spec, where)
    if not weights:
        raise AdapterInvalidError(f"adapter {where} holds no LoRA weights")
    rank = max(t.shape[0] for w in weights.values() for t in w.lora_a if t is not None)
    return LoRAAdapter(request=request, rank=rank, weights=weights)


def _check_base_model(config: LoRAAdapterConfig, request: LoRARequest, where: str,
                      served: str | None, aliases: tuple[str, ...]) -> None:
    for claimed in (config.base_model_name_or_path, request.base_model_name):
        if claimed and not base_model_compatible(claimed, served, aliases):
            raise AdapterInvalidError(
                f"adapter {where} was trained for base model {claimed!r}, but this engine serves "
                f"{served!r}; use an adapter trained on the served model")
    if not config.base_model_name_or_path:
        logger.warning("adapter %s does not name its base model; assuming it fits %r", where, served)


def _read_tensors(path, where: str) -> dict[str, torch.Tensor]:
    try:
        if path.name == PICKLE_FILE:
            # Reached only when pickle weights were explicitly allowed; weights_only refuses code.
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        else:
            tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise AdapterInvalidError(f"adapter {where}: cannot read {path.name}: {e}") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise AdapterInvalidError(f"adapter {where}: {path.name} must hold a flat name -> tensor mapping")
    return tensors


def _pack(tensors: dict[str, torch.Tensor], config: LoRAAdapterConfig, spec: LoRAModelSpec,
          where: str) -> dict[tuple[int, str], PackedLoRAWeights]:
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        layer, module, which = _parse_name(name, spec, where)
        if config.target_modules is not None and module not in {m.rsplit(".", 1)[-1] for m in config.target_modules}:
            raise AdapterInvalidError(f"adapter {where}: tensor {name!r} adapts {module!r}, which is not "
                                      f"in the adapter's target_modules {list(config.target_modules)}")
        pairs.setdefault((layer, module), {})[which] = tensor

    weights: dict[tuple[int, str], PackedLoRAWeights] = {}
    for (layer, module), pair in sorted(pairs.items()):
        key = f"model.layers.{layer}.{PEFT_MODULE_PARENT[module]}.{module}"
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise AdapterInvalidError(f"adapter {where}: {key} has no {missing} weight")
        a, b = _check_pair(pair["A"], pair["B"], key, module, config, spec, where)
        packed, index = PEFT_MODULE_TO_PACKED[module]
        num_slices = spec.target(packed).num_slices
        entry = weights.setdefault((layer, packed), PackedLoRAWeights([None] * num_slices, [None] * num_slices))
        entry.lora_a[index] = a
        entry.lora_b[index] = b * config.scaling(key)
    return weights


def _parse_name(name: str, spec: LoRAModelSpec, where: str) -> tuple[int, str, str]:
    match = _TENSOR_NAME.match(name)
    if match is None:
        for module in KNOWN_UNSUPPORTED_MODULES:
            if f"{module}." in name:
                raise AdapterInvalidError(
                    f"adapter {where} adapts {module!r} (tensor {name!r}), which loraplex does not "
                    f"adapt; supported target modules: {', '.join(SUPPORTED_PEFT_MODULES)}")
        raise AdapterInvalidError(
            f"adapter {where} has an unexpected tensor {name!r}; expected PEFT LoRA names like "
            f"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    layer, parent, module, which = int(match[1]), match[2], match[3], match[4]
    if module not in PEFT_MODULE_TO_PACKED or PEFT_MODULE_PARENT[module] != parent:
        raise AdapterInvalidError(
            f"adapter {where}: tensor {name!r} adapts {parent}.{module}, which does not exist in this "
            f"model; supported target modules: {', '.join(SUPPORTED_PEFT_MODULES)}")
    if layer >= spec.num_layers:
        raise AdapterInvalidError(f"adapter {where}: tensor {name!r} is for layer {layer}, but the model "
                                  f"has {spec.num_layers} layers; was it trained on a larger model?")
    return layer, module, which


def _check_pair(a: torch.Tensor, b: torch.Tensor, key: str, module: str, config: LoRAAdapterConfig,
                spec: LoRAModelSpec, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    in_features, out_features = spec.peft_module_shape(module)
    rank, _ = config.rank_and_alpha(key)
    for tensor, expected, label in ((a, (rank, in_features), "lora_A"), (b, (out_features, rank), "lora_B")):
        if tuple(tensor.shape) != expected:
            raise AdapterInvalidError(
                f"adapter {where}: {key}.{label} has shape {list(tensor.shape)}, expected {list(expected)} "
                f"(rank {rank} for the model's {module} of {in_features} -> {out_features}); "
                f"the adapter does not fit this base model or its config's r/rank_pattern")
        if not tensor.is_floating_point():
            raise AdapterInvalidError(f"adapter {where}: {key}.{label} has dtype {tensor.dtype}; "
                                      f"expected floating-point weights")
        if not torch.isfinite(tensor).all():
            raise AdapterInvalidError(f"adapter {where}: {key}.{label} holds NaN or infinite values; "
                                      f"the adapter is corrupt (or diverged in training)")
    # fp32 on the CPU: scaling is folded in at full precision, the slot copy casts to the model dtype.
    return a.float().contiguous(), b.float()
