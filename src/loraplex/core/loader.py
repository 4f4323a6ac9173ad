"""Load a Hugging Face safetensors checkpoint into LlamaForCausalLM (or a multimodal checkpoint's modules).

Files are memory-mapped (safe_open) and each tensor is copied straight into its slot of
the device parameter, converting dtype on the way, so the host never holds a second copy
of the model. Checkpoint quirks are resolved here, never in forward():
q/k/v and gate/up matrices are written into the slices of the fused projections, tied
embeddings need no lm_head, stale buffers (rotary_emb.inv_freq) are skipped. A model with a
`checkpoint_name(name)` method (core/models' MultimodalCheckpoint) says where each checkpoint
tensor goes, or that it is deliberately unused; other modules' parameters and persistent
buffers (the encoder towers' biases, BatchNorm statistics...) load whole under their own names.

Under tensor parallelism each rank reads only its shard of each tensor (the layers'
`in_shard` / `out_shards` / `vocab`, see core/parallel/layout.py), straight from the file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from loraplex.core.layers import Embedding, Linear
from loraplex.core.parallel.layout import Shard
from loraplex.errors import ConfigError

logger = logging.getLogger(__name__)

# Tensors some checkpoints carry that the model recomputes; safe to skip.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# A PEFT adapter shipped inside the model directory (Granite Speech's audio LoRA) is not model weights.
_ADAPTER_FILE_PREFIX = "adapter_model"


@dataclass
class _Target:
    param: torch.Tensor
    start: int                 # row offset inside param (fused projections)
    shape: tuple[int, ...]     # of the checkpoint tensor
    shards: tuple[Shard, ...]  # the part of each of its dims this rank holds


def _whole(shape: tuple[int, ...]) -> tuple[Shard, ...]:
    return tuple(Shard.whole(n) for n in shape)


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, from model.safetensors.index.json when present."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"{model_dir}: shard(s) {', '.join(missing)} listed in "
                              "model.safetensors.index.json are missing; re-download the checkpoint.")
        return files
    files = sorted(f for f in model_dir.glob("*.safetensors") if not f.name.startswith(_ADAPTER_FILE_PREFIX))
    if not files:
        hint = " (it has PyTorch .bin weights; convert them to safetensors)" if any(model_dir.glob("*.bin")) else ""
        raise ConfigError(f"{model_dir} has no *.safetensors weights{hint}.")
    return files


def _checkpoint_targets(model: nn.Module) -> dict[str, _Target]:
    """Map every checkpoint tensor name the model needs to where it goes."""
    targets: dict[str, _Target] = {}
    for path, module in model.named_modules():  # tied lm_head is the embedding: listed once
        if isinstance(module, Linear):
            parent = path.rsplit(".", 1)[0]
            for slice_name, out in zip(module.slice_names, module.out_shards):
                start = module.slice_offset(slice_name)[0]
                ckpt_module = f"{parent}.{slice_name}_proj" if len(module.slice_names) > 1 else path
                targets[f"{ckpt_module}.weight"] = _Target(module.weight, start, (out.full, module.in_shard.full),
                                                           (out, module.in_shard))
                if module.bias is not None:
                    targets[f"{ckpt_module}.bias"] = _Target(module.bias, start, (out.full,), (out,))
        elif isinstance(module, Embedding):
            hidden = Shard.whole(module.weight.shape[1])
            targets[f"{path}.weight"] = _Target(module.weight, 0, (module.vocab.full, hidden.full),
                                                (module.vocab, hidden))
        else:
            prefix = f"{path}." if path else ""
            persistent = [(n, b) for n, b in module.named_buffers(recurse=False)
                          if n not in module._non_persistent_buffers_set]
            for name, tensor in [*module.named_parameters(recurse=False), *persistent]:
                shape = tuple(tensor.shape)
                targets[prefix + name] = _Target(tensor, 0, shape, _whole(shape))
    return targets


def load_weights(model: nn.Module, model_dir: str | Path) -> None:
    """Fill every parameter of `model` from the checkpoint in `model_dir`.

    Raises ConfigError naming the tensor when one is missing, unexpected or mis-shaped.
    """
    from loraplex.core.models import UNUSED

    targets = _checkpoint_targets(model)
    tie = getattr(model.config, "tie_word_embeddings", False)
    rename = getattr(model, "checkpoint_name", lambda name: name)
    loaded: set[str] = set()
    with torch.no_grad():
        for file in checkpoint_files(model_dir):
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for checkpoint_name in f.keys():
                    name = rename(checkpoint_name) or checkpoint_name
                    target = targets.get(name)
                    if target is None:
                        if name == UNUSED or name.endswith(_IGNORED_SUFFIXES) or \
                                (tie and name.endswith("lm_head.weight")):
                            continue
                        raise ConfigError(f"checkpoint tensor {checkpoint_name!r} (in {file.name}) is not part of a "
                                          f"{model.config.architecture}; the checkpoint does not match its config.json.")
                    tensor = f.get_slice(checkpoint_name)
                    if tuple(tensor.get_shape()) != target.shape:
                        raise ConfigError(f"checkpoint tensor {checkpoint_name!r} has shape "
                                          f"{tuple(tensor.get_shape())}, config.json implies {target.shape}; "
                                          f"the checkpoint does not match its config.")
                    if not target.shape:   # a scalar (BatchNorm's num_batches_tracked)
                        target.param.copy_(f.get_tensor(checkpoint_name))
                        loaded.add(name)
                        continue
                    # Only this rank's shard is read (all of it without tensor parallelism).
                    part = tensor[tuple(slice(s.start, s.start + s.num_valid) for s in target.shards)]
                    rows = target.param[target.start:target.start + target.shards[0].size]
                    rows[:part.shape[0]].copy_(part)
                    rows[part.shape[0]:].zero_()   # the vocab's padding rows on its last rank
                    loaded.add(name)
    missing = sorted(set(targets) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(f"checkpoint {model_dir} lacks tensor(s) {shown}; it is incomplete or not a "
                          f"{model.config.architecture} checkpoint.")
    logger.info("loaded %d tensors from %s", len(loaded), model_dir)


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights for load_format="dummy" (benchmarks at real shapes without a checkpoint):
    matrices ~ N(0, 0.02), norm weights ~ 1, BatchNorm statistics those of a fresh layer.
    Drawn on the parameters' device."""
    generator = None
    with torch.no_grad():
        for name, param in model.named_parameters():
            if generator is None or generator.device != param.device:
                generator = torch.Generator(device=param.device).manual_seed(seed)
            if param.dim() == 1:
                param.uniform_(0.9, 1.1, generator=generator) if name.lower().endswith("norm.weight") else \
                    param.normal_(0.0, 0.02, generator=generator)
            else:
                param.normal_(0.0, 0.02, generator=generator)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
    logger.info("initialised %s with random weights (load_format='dummy')", model.config.architecture)
