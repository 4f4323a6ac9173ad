"""Pieces the encoder towers share: activations by their config names, and building a tower
without initialising it (the loader fills every parameter, so random init is wasted work)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.errors import ConfigError, UnsupportedModelError

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,                                              # exact (erf)
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),        # CLIP's
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


def activation(name: str, where: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"{where} activation {name!r} is not supported; loraplex implements "
                                    f"{', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def build_uninitialised(factory: Callable[[], nn.Module], *, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The module `factory()` builds, with storage on `device` in `dtype` (floating tensors) but
    no values: built on the meta device, then given real, uninitialised memory."""
    with torch.device("meta"):
        module = factory()
    return module.to_empty(device=device).to(dtype).eval()


def config_int(config: dict, key: str, where: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"config.json {where}.{key} must be a positive integer, got {value!r}.")
    return value
