"""PEFT as the reference for LoRA tests: adapters written by peft itself, outputs computed by it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    rank: int
    alpha: float
    targets: tuple[str, ...]
    use_rslora: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()


# Ranks 4..32, different target sets, some rsLoRA: what one mixed batch must serve.
ADAPTER_SPECS = (
    AdapterSpec("r4-qv", 4, 8, ("q_proj", "v_proj")),
    AdapterSpec("r8-attn-rs", 8, 16, ("q_proj", "k_proj", "v_proj", "o_proj"), use_rslora=True),
    AdapterSpec("r16-mlp", 16, 8, ("gate_proj", "up_proj", "down_proj")),
    AdapterSpec("r32-all-rs", 32, 32, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                        "down_proj"), use_rslora=True),
)


def load_base(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def write_peft_lora(model_dir: Path, out_dir: Path, spec: AdapterSpec, seed: int) -> Path:
    """get_peft_model + random non-zero lora_B + save_pretrained: exactly PEFT's on-disk format."""
    torch.manual_seed(seed)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                        use_rslora=spec.use_rslora, lora_dropout=0.0, task_type="CAUSAL_LM",
                        rank_pattern=dict(spec.rank_pattern), alpha_pattern=dict(spec.alpha_pattern))
    model = get_peft_model(load_base(model_dir), config)
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(out_dir)
    return out_dir


def peft_model(model_dir: Path, adapter_dir: Path | None):
    base = load_base(model_dir)
    return base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir).eval()


@torch.no_grad()
def reference_greedy(model, prompt: list[int], num_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation (full recompute each token) and the logits of the prompt's last token."""
    ids = list(prompt)
    first_logits = None
    for _ in range(num_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        if first_logits is None:
            first_logits = logits
        ids.append(int(logits.argmax()))
    return ids[len(prompt):], first_logits
