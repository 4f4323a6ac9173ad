"""Write real PEFT-format LoRA adapter directories for tests (no model needed).

The files follow PEFT's on-disk format exactly (adapter_config.json +
adapter_model.safetensors with PEFT's key names), so anything that loads a PEFT
adapter loads these.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# Llama-family projection shapes as (in_features, out_features) of a tiny model.
TINY_SHAPES = {
    "q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
    "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64),
}
_MODULE_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                  "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_peft_adapter(path: str | Path, *, rank: int = 8, alpha: float = 16,
                       target_modules=("q_proj", "v_proj"), num_layers: int = 2,
                       shapes: dict | None = None, base_model_name_or_path: str = "tiny-base",
                       seed: int = 0, dtype=torch.float32, **config_overrides) -> Path:
    """Create `path` holding a PEFT LoRA adapter with random (non-zero) A and B."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shapes = shapes or TINY_SHAPES
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        for module in target_modules:
            in_f, out_f = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{_MODULE_PARENT[module]}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, in_f, generator=gen) / in_f**0.5).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_f, rank, generator=gen) / rank**0.5).to(dtype)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": list(target_modules), "base_model_name_or_path": base_model_name_or_path,
        "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "fan_in_fan_out": False, "inference_mode": True,
    }
    config.update(config_overrides)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path
