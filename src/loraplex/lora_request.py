"""LoRARequest: which adapter a request uses, and where its files are."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from loraplex.errors import InvalidRequestError


@dataclass(eq=False)
class LoRARequest:
    """A LoRA adapter to apply to a request, with vLLM's fields and field order.

    Two requests are equal when their names are equal: the name is the adapter's
    identity for the engine and the server, the id its slot key. Bad fields raise
    InvalidRequestError (a ValueError).

    - `lora_path`: the local adapter directory. It has a default ("") as in vLLM, so
      it may be passed by keyword after `lora_int_id`, but it must be set.
    - `load_inplace`: load the adapter again even when one with this id is loaded,
      replacing it (the new files are validated before the old weights are dropped).
    - `is_3d_lora_weight`: vLLM's marker for MoE adapters stored as fused 3D expert
      tensors. loraplex serves no MoE model, so it changes nothing here, as in vLLM
      for every model that is not MoE; it is accepted so vLLM code runs unchanged.
    - `tensorizer_config_dict`: adapters serialized with tensorizer are not supported;
      a request that sets it is refused rather than served from other files.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None
    tensorizer_config_dict: dict | None = None
    load_inplace: bool = False
    is_3d_lora_weight: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name.strip():
            raise InvalidRequestError(f"LoRARequest.lora_name must be a non-empty string, got {self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise InvalidRequestError(
                f"LoRARequest.lora_int_id must be an integer >= 1 (0 means the base model), "
                f"got {self.lora_int_id!r}; use loraplex.lora_request.lora_id_for_name(name) "
                f"for a stable id")
        if not isinstance(self.lora_path, str) or not self.lora_path.strip():
            raise InvalidRequestError(f"LoRARequest.lora_path must be a non-empty path, got {self.lora_path!r}")
        if self.base_model_name is not None and not isinstance(self.base_model_name, str):
            raise InvalidRequestError(f"LoRARequest.base_model_name must be a string or None, "
                                      f"got {self.base_model_name!r}")
        if self.tensorizer_config_dict is not None:
            raise InvalidRequestError(
                f"LoRARequest.tensorizer_config_dict is set for adapter {self.lora_name!r}, but loraplex "
                f"cannot load tensorizer-serialized adapters; save the adapter in PEFT format "
                f"(adapter_config.json + adapter_model.safetensors) and pass its directory as lora_path")
        for flag in ("load_inplace", "is_3d_lora_weight"):
            if not isinstance(getattr(self, flag), bool):
                raise InvalidRequestError(f"LoRARequest.{flag} must be True or False, got {getattr(self, flag)!r}")

    # vLLM's aliases
    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoRARequest) and self.lora_name == other.lora_name

    def __hash__(self) -> int:
        return hash(self.lora_name)


def lora_id_for_name(name: str) -> int:
    """A stable adapter id in [1, 2**31) derived from the name.

    Not hash(): Python salts string hashes per process, and ids must agree
    across processes and restarts.
    """
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2**31 - 1) + 1
