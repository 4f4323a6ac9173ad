"""Which linear layers of a Llama-family model take LoRA, and how PEFT names map onto them.

PEFT names the projections of the Hugging Face model (q_proj, k_proj, ...); our model
fuses some of them (qkv_proj = q|k|v, gate_up_proj = gate|up). A LoRATarget describes one
of our linear layers: its input width and the output widths of its slices, each slice
being one PEFT module.

Under tensor parallelism a target is one rank's shard of the layer, and its LoRA is sharded
the same way (the shards of core/parallel/layout.py): a column-parallel layer (qkv, gate_up)
keeps all of A and the rows of B of its output columns; a row-parallel layer (o, down) keeps
the columns of A of its input columns and all of B, so its shrink gives a partial sum of the
rank-r intermediate, and its expand a partial sum of the output, which the base layer's own
all-reduce completes (docs/engine.md, "Tensor parallelism", says why not an extra collective).
Adapters are validated against the full PEFT shapes (`peft_module_shape`), then packed per shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from loraplex.core.parallel.layout import LayerShards, Shard

# PEFT module name -> (our packed module, slice index inside it).
PEFT_MODULE_TO_PACKED: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}
# Parent module of each PEFT module in the Hugging Face layout (model.layers.N.<parent>.<module>).
PEFT_MODULE_PARENT: dict[str, str] = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
SUPPORTED_PEFT_MODULES = tuple(PEFT_MODULE_TO_PACKED)
# Modules that exist in the model but that loraplex does not adapt.
KNOWN_UNSUPPORTED_MODULES = ("embed_tokens", "lm_head", "input_layernorm", "post_attention_layernorm",
                             "norm", "rotary_emb")


@dataclass(frozen=True)
class LoRATarget:
    """One LoRA-capable linear layer (per decoder layer), e.g. qkv_proj with slices q, k, v."""
    name: str                        # our module name: qkv_proj, o_proj, gate_up_proj, down_proj
    peft_modules: tuple[str, ...]    # PEFT module of each slice, in output order
    in_shard: Shard                  # the input columns this rank holds (all of them on one device)
    out_shards: tuple[Shard, ...]    # per slice, the output rows this rank holds

    @property
    def in_features(self) -> int:
        return self.in_shard.size

    @property
    def slice_sizes(self) -> tuple[int, ...]:
        """This rank's output width of each slice."""
        return tuple(s.size for s in self.out_shards)

    @property
    def is_whole(self) -> bool:
        """Not sharded (one device, or a tensor-parallel group of one)."""
        return self.in_shard.is_whole and all(s.is_whole for s in self.out_shards)

    @property
    def num_slices(self) -> int:
        return len(self.slice_sizes)

    @property
    def out_features(self) -> int:
        return sum(self.slice_sizes)

    @cached_property   # read by every LoRA layer call
    def slice_offsets(self) -> tuple[int, ...]:
        """Output column where each slice starts, plus the total: (0, q, q+k, q+k+v)."""
        offsets = [0]
        for size in self.slice_sizes:
            offsets.append(offsets[-1] + size)
        return tuple(offsets)


# Our fused layers, in model order: the names `lora_target_modules` restricts LoRA to.
PACKED_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def packed_target_names(modules) -> tuple[str, ...]:
    """The fused layers that `modules` name (fused names, as vLLM's --lora-target-modules
    takes, or PEFT names: q_proj means qkv_proj), in model order; ValueError if unknown."""
    names = set()
    for module in modules:
        if module in PACKED_MODULES:
            names.add(module)
        elif module in PEFT_MODULE_TO_PACKED:
            names.add(PEFT_MODULE_TO_PACKED[module][0])
        else:
            raise ValueError(f"{module!r} is not a LoRA target module of this model; choose from "
                             f"{', '.join(PACKED_MODULES)} (or the PEFT names {', '.join(SUPPORTED_PEFT_MODULES)})")
    return tuple(n for n in PACKED_MODULES if n in names)


@dataclass(frozen=True)
class LoRAModelSpec:
    """The LoRA targets of a model: the same in every decoder layer."""
    num_layers: int
    targets: tuple[LoRATarget, ...]

    def target(self, name: str) -> LoRATarget:
        for t in self.targets:
            if t.name == name:
                return t
        raise KeyError(name)

    def restricted(self, names: tuple[str, ...]) -> "LoRAModelSpec":
        """The same model with LoRA on the fused layers `names` only."""
        return LoRAModelSpec(self.num_layers, tuple(t for t in self.targets if t.name in names))

    def peft_module_shape(self, peft_module: str) -> tuple[int, int]:
        """(in_features, out_features) of a whole PEFT module, e.g. k_proj -> (hidden, kv_heads*head_dim)."""
        packed, index = PEFT_MODULE_TO_PACKED[peft_module]
        t = self.target(packed)
        return t.in_shard.full, t.out_shards[index].full


_TARGET_MODULES = (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("o_proj", ("o_proj",)),
                   ("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",)))


def llama_lora_spec(*, num_layers: int, hidden_size: int, num_heads: int, num_kv_heads: int,
                    head_dim: int, intermediate_size: int, tp_rank: int = 0, tp_size: int = 1) -> LoRAModelSpec:
    """The LoRA targets of a Llama/Mistral/Qwen2 decoder (they share the projection layout), as
    rank `tp_rank` of a tensor-parallel group of `tp_size` holds them."""
    shards = LayerShards.for_rank(hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                  head_dim=head_dim, intermediate_size=intermediate_size, rank=tp_rank, size=tp_size)
    targets = []
    for name, peft_modules in _TARGET_MODULES:
        projection = shards.projection(name)
        targets.append(LoRATarget(name, peft_modules, projection.in_shard, projection.out_shards))
    return LoRAModelSpec(num_layers=num_layers, targets=tuple(targets))
