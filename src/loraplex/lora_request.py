"""LoRARequest: which adapter a request uses, and where its files are."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from loraplex.errors import InvalidRequestError


@dataclass(eq=False)
class LoRARequest:
    """A LoRA adapter to apply to a request (vLLM-compatible).

    Two requests are equal when their names are equal: the name is the adapter's
    identity for the engine and the server, the id its slot key. Bad fields raise
    InvalidRequestError (a ValueError).
    """

    lora_name: str
    lora_int_id: int
    lora_path: str
    base_model_name: str | None = None

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
