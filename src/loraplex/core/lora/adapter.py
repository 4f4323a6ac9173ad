"""Load a PEFT LoRA adapter directory into CPU tensors laid out like a device slot.

Validation is strict: every tensor must belong to a module the model has and adapts, with
the shape the model expects and finite values. The adapter is then packed once, on the
loading thread: per fused target, one A and one B covering every decoder layer, in the
model's dtype, with the scaling (alpha/r, or alpha/sqrt(r) with rsLoRA) folded into B in
float32 first. Activation is then one copy per tensor into a slot (slots.py), from pinned
memory when the slots are on a GPU, so it does not hold up the step that needs it.

A cold adapter's first token waits for this load, so it touches each byte few times and
takes the GIL back few times: tensors already in the model's dtype are read from the
safetensors file straight into their packed place, a few system calls per adapter
(safetensors_file.py says why that matters), and their scaling is applied to each packed B
at once; the rest are copied from a mapping of the file. One buffer (host_buffer.py) holds
every packed tensor, zero wherever the adapter writes nothing (fresh, or a recycled one
zeroed) and page-locked in place when the slots are on a GPU.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.core.lora.adapter_config import LoRAAdapterConfig, parse_adapter_config
from loraplex.core.lora.host_buffer import HostBuffer
from loraplex.core.lora.safetensors_file import FileTensor, SafetensorsFile
from loraplex.core.lora.targets import (KNOWN_UNSUPPORTED_MODULES, PEFT_MODULE_PARENT, PEFT_MODULE_TO_PACKED,
                                        SUPPORTED_PEFT_MODULES, LoRAModelSpec, LoRATarget)
from loraplex.errors import AdapterInvalidError
from loraplex.lora_request import LoRARequest
from loraplex.resolvers.validation import AdapterFiles, base_model_compatible, validate_adapter_dir

logger = logging.getLogger(__name__)

# PEFT's saved names: base_model.model.model.layers.<i>.<self_attn|mlp>.<module>.lora_<A|B>.weight; a
# multimodal model's language model sits under model.language_model. (or language_model.model.).
_TENSOR_NAME = re.compile(
    r"^(?:base_model\.model\.)?((?:model\.language_model\.|language_model\.model\.|model\.)layers\.(\d+)"
    r"\.(\w+)\.(\w+))\.lora_(A|B)\.weight$")
# Modules of a multimodal model's encoder towers, which loraplex does not adapt.
_TOWER_MODULES = ("vision_tower.", "multi_modal_projector.", "encoder.", "projector.")
@dataclass
class PackedLoRATarget:
    """One adapter's weights for one fused target (e.g. qkv_proj) in every decoder layer.

    The slot layout of slots.py, but padded to the adapter's own rank rather than
    max_lora_rank: slice i of a layer holds A rows i*rank : i*rank + rank_i and B rows
    slice_offsets[i] : slice_offsets[i+1], columns :rank_i. Everything else is zero (padding
    past a module's rank, slices and layers the adapter does not adapt)."""
    target: LoRATarget
    lora_a: torch.Tensor   # [num_layers, num_slices * rank, in_features]
    lora_b: torch.Tensor   # [num_layers, out_features, rank], scaling folded in


@dataclass
class LoRAAdapter:
    """A validated adapter held in CPU memory, ready to be copied into a device slot."""
    request: LoRARequest
    rank: int                                    # the largest rank of any module; the packing width
    targets: dict[str, PackedLoRATarget]         # fused target -> weights; targets not adapted are absent
    module_ranks: dict[tuple[int, str], int]     # (layer, PEFT module) -> rank of every adapted module
    host_buffer: HostBuffer | None = None        # the memory every packed tensor is a view of

    def record_use(self) -> None:
        """Call after queueing copies from the packed tensors (its memory outlives them)."""
        if self.host_buffer is not None:
            self.host_buffer.record_use()

    @property
    def lora_int_id(self) -> int:
        return self.request.lora_int_id

    @property
    def num_bytes(self) -> int:
        """CPU memory the adapter holds (its packed tensors)."""
        return sum(t.numel() * t.element_size() for p in self.targets.values() for t in (p.lora_a, p.lora_b))

    def module_weights(self, layer: int, peft_module: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Views of one PEFT module's A [rank_i, in_features] and B [out_i, rank_i] (scaled);
        None if the adapter does not adapt it."""
        rank = self.module_ranks.get((layer, peft_module))
        if rank is None:
            return None
        name, index = PEFT_MODULE_TO_PACKED[peft_module]
        packed = self.targets[name]
        offsets = packed.target.slice_offsets
        a = packed.lora_a[layer, index * self.rank: index * self.rank + rank]
        return a, packed.lora_b[layer, offsets[index]:offsets[index + 1], :rank]


def load_lora_adapter(request: LoRARequest, spec: LoRAModelSpec, *, max_lora_rank: int,
                      served_model_name: str | None = None, served_aliases: tuple[str, ...] = (),
                      allow_pickle: bool = False, dtype: torch.dtype = torch.float32,
                      pin_memory: bool = False) -> LoRAAdapter:
    """Read, validate and pack `request.lora_path`; raise AdapterInvalidError saying what is wrong.

    dtype: the slots' dtype (the model's); pin_memory: True when the slots are on a GPU
    (page-locked memory makes the copy into a slot asynchronous; it needs CUDA)."""
    where = f"{request.lora_name!r} ({request.lora_path})"
    files = validate_adapter_dir(request.lora_path, allow_pickle=allow_pickle)
    config = parse_adapter_config(files.config, where)
    _check_base_model(config, request, where, served_model_name, served_aliases)
    if config.max_rank > max_lora_rank:
        raise AdapterInvalidError(
            f"adapter {where} has rank {config.max_rank}, above max_lora_rank={max_lora_rank}; "
            f"start the engine with max_lora_rank >= {config.max_rank} (--max-lora-rank)")
    tensors, source = _read_tensors(files, where)
    modules = _validate(tensors, config, spec, where)
    if not modules:
        raise AdapterInvalidError(f"adapter {where} holds no LoRA weights")
    rank = max(a.shape[0] for a, _, _ in modules.values())
    targets, host_buffer, flat = _pack(modules, spec, rank, dtype, pin_memory, source)
    adapter = LoRAAdapter(request=request, rank=rank, targets=targets, host_buffer=host_buffer,
                          module_ranks={key: a.shape[0] for key, (a, _, _) in modules.items()})
    _check_finite(adapter, modules, where, flat, source)
    return adapter


def _check_base_model(config: LoRAAdapterConfig, request: LoRARequest, where: str,
                      served: str | None, aliases: tuple[str, ...]) -> None:
    for claimed in (config.base_model_name_or_path, request.base_model_name):
        if claimed and not base_model_compatible(claimed, served, aliases):
            raise AdapterInvalidError(
                f"adapter {where} was trained for base model {claimed!r}, but this engine serves "
                f"{served!r}; use an adapter trained on the served model")
    if not config.base_model_name_or_path and (request.lora_name, request.lora_path) not in _WARNED_NO_BASE:
        _WARNED_NO_BASE.add((request.lora_name, request.lora_path))
        logger.warning("adapter %s does not say which base model it was trained on (base_model_name_or_path "
                       "is empty); serving it on %r unchecked", where, served)


# Adapters (name, path) already warned about above: once per process, however the adapter came
# (a resolver, --lora-modules, the load endpoint) and however often it is read again (an
# adapter evicted from the CPU cache is, at its next request).
_WARNED_NO_BASE: set[tuple[str, str]] = set()


# A tensor of the adapter: located in its safetensors file (read later, into place) or, from
# pickle weights, already in memory.
AdapterTensor = FileTensor | torch.Tensor
Modules = dict[tuple[int, str], tuple[AdapterTensor, AdapterTensor, float]]


def _read_tensors(files: AdapterFiles, where: str) -> tuple[dict[str, AdapterTensor], SafetensorsFile | None]:
    path = files.weights_path
    if files.header is not None:
        source = SafetensorsFile(path, files.header, where)
        return dict(source.tensors), source
    try:
        # Reached only when pickle weights were explicitly allowed; weights_only refuses code.
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise AdapterInvalidError(f"adapter {where}: cannot read {path.name}: {e}") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise AdapterInvalidError(f"adapter {where}: {path.name} must hold a flat name -> tensor mapping")
    return tensors, None


def _as_tensor(t: AdapterTensor, source: SafetensorsFile | None) -> torch.Tensor:
    return source.tensor(t) if isinstance(t, FileTensor) else t


def _validate(tensors: dict[str, AdapterTensor], config: LoRAAdapterConfig, spec: LoRAModelSpec,
              where: str) -> Modules:
    """(layer, PEFT module) -> (A [rank, in], B [out, rank], scaling), every pair checked."""
    pairs: dict[tuple[int, str], dict[str, AdapterTensor]] = {}
    module_paths: dict[tuple[int, str], str] = {}   # as PEFT names it: what rank/alpha patterns match
    for name, tensor in tensors.items():
        path, layer, module, which = _parse_name(name, spec, where)
        module_paths[(layer, module)] = path
        if config.target_modules is not None and module not in {m.rsplit(".", 1)[-1] for m in config.target_modules}:
            raise AdapterInvalidError(f"adapter {where}: tensor {name!r} adapts {module!r}, which is not "
                                      f"in the adapter's target_modules {list(config.target_modules)}")
        pairs.setdefault((layer, module), {})[which] = tensor

    modules: Modules = {}
    for (layer, module), pair in sorted(pairs.items()):
        key = module_paths[(layer, module)]
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise AdapterInvalidError(f"adapter {where}: {key} has no {missing} weight")
        _check_pair(pair["A"], pair["B"], key, module, config, spec, where)
        modules[(layer, module)] = (pair["A"], pair["B"], config.scaling(key))
    return modules


def _pack(modules: Modules, spec: LoRAModelSpec, rank: int, dtype: torch.dtype, pin_memory: bool,
          source: SafetensorsFile | None) -> tuple[dict[str, PackedLoRATarget], HostBuffer, torch.Tensor]:
    """The packed targets, the buffer they are views of, and all of it as one flat tensor."""
    by_target: dict[str, list[tuple[int, int, AdapterTensor, AdapterTensor, float]]] = {}
    for (layer, module), (a, b, scaling) in modules.items():
        name, index = PEFT_MODULE_TO_PACKED[module]
        by_target.setdefault(name, []).append((layer, index, a, b, scaling))
    shapes = _packed_shapes(spec, by_target, rank)
    total = _numel(shapes)
    # One buffer for every tensor. Padding, unadapted layers and slices must hold zeros: a
    # fresh buffer does, a recycled one (host_buffer.py) is zeroed first unless this adapter
    # writes every element.
    buffer = HostBuffer.lease(total * dtype.itemsize, zeroed=not _writes_every_element(modules, by_target, spec, rank))
    flat = buffer.view_as_tensor(total, dtype)
    in_bytes = memoryview(buffer)

    def place(start: int, numel: int) -> memoryview:      # flat[start: start + numel] as bytes
        return in_bytes[start * dtype.itemsize: (start + numel) * dtype.itemsize]

    def unchanged(t: AdapterTensor) -> bool:               # its file bytes are its packed bytes
        return isinstance(t, FileTensor) and t.dtype == dtype

    targets: dict[str, PackedLoRATarget] = {}
    reads: list[tuple[FileTensor, memoryview]] = []
    to_scale: dict[str, list[tuple[int, int, int, float]]] = {}   # B read unscaled: (layer, index, rank, scaling)
    offset = 0
    for name, entries in by_target.items():
        target = spec.target(name)
        a_start, b_start = offset, offset + math.prod(shapes[name][0])
        views = []
        for shape in shapes[name]:
            views.append(flat[offset: offset + math.prod(shape)].view(shape))
            offset += math.prod(shape)
        packed = targets[name] = PackedLoRATarget(target=target, lora_a=views[0], lora_b=views[1])
        offsets = target.slice_offsets
        for layer, index, a, b, scaling in entries:
            module_rank = a.shape[0]
            # A's rows and, at the full rank, B's [out_i, rank] block are contiguous in place.
            if unchanged(a) and target.in_shard.is_whole:
                first_row = (layer * target.num_slices + index) * rank
                reads.append((a, place(a_start + first_row * target.in_features, module_rank * target.in_features)))
            else:
                # This rank's shard (all of it on one device): A's input columns.
                a = target.in_shard.take(_as_tensor(a, source), 1)
                packed.lora_a[layer, index * rank: index * rank + module_rank].copy_(a)
            if unchanged(b) and target.out_shards[index].is_whole and module_rank == rank:
                first = (layer * target.out_features + offsets[index]) * rank
                reads.append((b, place(b_start + first, (offsets[index + 1] - offsets[index]) * rank)))
                to_scale.setdefault(name, []).append((layer, index, module_rank, scaling))
                continue
            b = target.out_shards[index].take(_as_tensor(b, source), 0)   # B's output rows
            # Scaling folded in float32, then one rounding to the model's dtype: torch.mul
            # computes in b's dtype (float32 math for 16-bit types), so that holds when b
            # is float32 or already the model's dtype, and spares a float32 temporary.
            b_slot = packed.lora_b[layer, offsets[index]:offsets[index + 1], :module_rank]
            if b.dtype in (torch.float32, dtype):
                torch.mul(b, scaling, out=b_slot)
            else:
                b_slot.copy_(b.float() * scaling)
    if reads:
        source.read_into(reads)
    del reads, in_bytes
    # B read as it was saved, then scaled in place: the same one rounding as torch.mul above.
    for name, scaled in to_scale.items():
        packed, offsets = targets[name], targets[name].target.slice_offsets
        factors = {scaling for *_, scaling in scaled}
        if len(scaled) == len(by_target[name]) and len(factors) == 1:
            if (factor := factors.pop()) != 1.0:           # every B of the target: one op (zeros stay zero)
                packed.lora_b.mul_(factor)
            continue
        for layer, index, module_rank, scaling in scaled:
            packed.lora_b[layer, offsets[index]:offsets[index + 1], :module_rank].mul_(scaling)
    if pin_memory:
        buffer.register()
    return targets, buffer, flat


def _packed_shapes(spec: LoRAModelSpec, names, rank: int) -> dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """Each packed target's (A, B) shapes: A [layers, slices * rank, in], B [layers, out, rank]."""
    return {name: ((spec.num_layers, spec.target(name).num_slices * rank, spec.target(name).in_features),
                   (spec.num_layers, spec.target(name).out_features, rank)) for name in names}


def largest_packed_nbytes(spec: LoRAModelSpec, max_lora_rank: int, dtype: torch.dtype) -> int:
    """The host buffer of the largest adapter the slots take: every target at max_lora_rank."""
    return _numel(_packed_shapes(spec, [t.name for t in spec.targets], max_lora_rank)) * dtype.itemsize


def _numel(shapes: dict[str, tuple[tuple[int, ...], ...]]) -> int:
    return sum(math.prod(shape) for pair in shapes.values() for shape in pair)


def _writes_every_element(modules: Modules, by_target: dict[str, list], spec: LoRAModelSpec, rank: int) -> bool:
    """Whether packing fills its whole buffer: every layer and slice of each packed target
    adapted, at the full rank, unsharded."""
    return (all(a.shape[0] == rank for a, _, _ in modules.values())
            and all(spec.target(name).is_whole and len(entries) == spec.num_layers * spec.target(name).num_slices
                    for name, entries in by_target.items()))


def _parse_name(name: str, spec: LoRAModelSpec, where: str) -> tuple[str, int, str, str]:
    """(module path, layer, PEFT module, "A" | "B") of a tensor name."""
    match = _TENSOR_NAME.match(name)
    if match is None:
        local = name.removeprefix("base_model.model.").removeprefix("model.")
        if local.startswith(_TOWER_MODULES):
            raise AdapterInvalidError(
                f"adapter {where} adapts the model's {local.split('.')[0].replace('_', ' ')} (tensor {name!r}); "
                f"loraplex applies LoRA to the language model only. Retrain with target_modules limited to it, "
                f"e.g. the regex '.*language_model.*\\.(q_proj|v_proj)'")
        for module in KNOWN_UNSUPPORTED_MODULES:
            if f"{module}." in name:
                raise AdapterInvalidError(
                    f"adapter {where} adapts {module!r} (tensor {name!r}), which loraplex does not "
                    f"adapt; supported target modules: {', '.join(SUPPORTED_PEFT_MODULES)}")
        raise AdapterInvalidError(
            f"adapter {where} has an unexpected tensor {name!r}; expected PEFT LoRA names like "
            f"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    path, layer, parent, module, which = match[1], int(match[2]), match[3], match[4], match[5]
    if module not in PEFT_MODULE_TO_PACKED or PEFT_MODULE_PARENT[module] != parent:
        raise AdapterInvalidError(
            f"adapter {where}: tensor {name!r} adapts {parent}.{module}, which does not exist in this "
            f"model; supported target modules: {', '.join(SUPPORTED_PEFT_MODULES)}")
    if layer >= spec.num_layers:
        raise AdapterInvalidError(f"adapter {where}: tensor {name!r} is for layer {layer}, but the model "
                                  f"has {spec.num_layers} layers; was it trained on a larger model?")
    packed = PEFT_MODULE_TO_PACKED[module][0]
    if packed not in {t.name for t in spec.targets}:
        # Served as a plain LoRA without those weights, it would compute something else.
        raise AdapterInvalidError(
            f"adapter {where} adapts {module!r} (part of {packed}), but this engine applies LoRA only to "
            f"{', '.join(t.name for t in spec.targets)} (lora_target_modules, --lora-target-modules); "
            f"add {packed} there, or use an adapter trained without {module!r}")
    return path, layer, module, which


def _check_pair(a: AdapterTensor, b: AdapterTensor, key: str, module: str, config: LoRAAdapterConfig,
                spec: LoRAModelSpec, where: str) -> None:
    in_features, out_features = spec.peft_module_shape(module)
    rank, _ = config.rank_and_alpha(key)
    for tensor, expected, label in ((a, (rank, in_features), "lora_A"), (b, (out_features, rank), "lora_B")):
        if tuple(tensor.shape) != expected:
            raise AdapterInvalidError(
                f"adapter {where}: {key}.{label} has shape {list(tensor.shape)}, expected {list(expected)} "
                f"(rank {rank} for the model's {module} of {in_features} -> {out_features}); "
                f"the adapter does not fit this base model or its config's r/rank_pattern")
        if not tensor.dtype.is_floating_point:
            raise AdapterInvalidError(f"adapter {where}: {key}.{label} has dtype {tensor.dtype}; "
                                      f"expected floating-point weights")


def _check_finite(adapter: LoRAAdapter, modules: Modules, where: str, flat: torch.Tensor,
                  source: SafetensorsFile | None) -> None:
    """Refuse NaN or infinite weights, in the files or once scaled and cast to the model's dtype.
    `flat`: every packed tensor as one."""
    dtype = flat.dtype
    whole = all(p.target.is_whole for p in adapter.targets.values())
    # Fast path: min and max propagate NaN and inf, and one aminmax over the packed weights
    # (zero padding included) costs a fraction of an element-wise check of every module.
    # Only a failure looks closer. A tensor-parallel rank packs only its shard, but must
    # refuse exactly what one device would (every rank decides alike): it checks every
    # module's range in the files.
    if whole and torch.isfinite(torch.stack(torch.aminmax(flat))).all():
        return
    # The files' own tensors from here (a tensor-parallel shard, or a failure to explain).
    modules = {key: (_as_tensor(a, source), _as_tensor(b, source), scaling) for key, (a, b, scaling) in modules.items()}
    if not whole and all(_fits(a, 1.0, dtype) and _fits(b, scaling, dtype) for a, b, scaling in modules.values()):
        return
    for (layer, module), (a, b, _) in modules.items():
        for tensor, label in ((a, "lora_A"), (b, "lora_B")):
            if not torch.isfinite(tensor).all():
                raise AdapterInvalidError(f"adapter {where}: {_module_key(layer, module)}.{label} holds NaN or "
                                          f"infinite values; the adapter is corrupt (or diverged in training)")
    for (layer, module), (a, b, scaling) in modules.items():
        if whole:
            fits = [bool(torch.isfinite(t).all()) for t in adapter.module_weights(layer, module)]
        else:
            fits = [_fits(a, 1.0, dtype), _fits(b, scaling, dtype)]
        for ok, label in zip(fits, ("lora_A", "lora_B")):
            if not ok:
                raise AdapterInvalidError(
                    f"adapter {where}: {_module_key(layer, module)}.{label} has values beyond the range of "
                    f"the model's {dtype} once scaled; the adapter does not fit this model's dtype")


def _fits(tensor: torch.Tensor, scaling: float, dtype: torch.dtype) -> bool:
    """All of tensor * scaling finite and within dtype's range (one aminmax)."""
    low, high = (float(v) * scaling for v in torch.aminmax(tensor))
    limit = torch.finfo(dtype).max
    return math.isfinite(low) and math.isfinite(high) and max(abs(low), abs(high)) <= limit


def _module_key(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{PEFT_MODULE_PARENT[module]}.{module}"
