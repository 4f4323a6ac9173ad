"""Resolver settings shared by every resolver, read from the environment in one place.

Each reader is called when a resolver or chain is built (not at import), so tests
and embedding applications can set the variables late. A malformed value is a
ConfigError naming the variable, never a silent default.
"""

from __future__ import annotations

import os

from typing import Mapping

from loraplex.errors import ConfigError

ALLOW_PICKLE_ENV = "LORAPLEX_ALLOW_PICKLE_LORA_WEIGHTS"
RESOLVER_TIMEOUT_ENV = "LORAPLEX_RESOLVER_TIMEOUT_S"
NEGATIVE_TTL_ENV = "LORAPLEX_RESOLVER_NEGATIVE_TTL_S"
INVALID_TTL_ENV = "LORAPLEX_RESOLVER_INVALID_TTL_S"

# Downloads of large adapters from S3 or the Hub can take minutes.
DEFAULT_RESOLVER_TIMEOUT_S = 300.0
DEFAULT_NEGATIVE_TTL_S = 30.0
DEFAULT_INVALID_TTL_S = 10.0

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def env_flag(name: str, default: bool = False) -> bool:
    """A boolean variable: 1/true/yes/on or 0/false/no/off (any case); unset = default."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use 1 or 0")


def env_seconds(name: str, default: float, *, allow_zero: bool, env: Mapping[str, str] | None = None) -> float:
    """A non-negative (or positive) number of seconds; unset or blank = default.
    `env` defaults to os.environ."""
    raw = (os.environ if env is None else env).get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None
    if value != value or value in (float("inf"), float("-inf")) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={raw!r} must be a finite number of seconds {bound}")
    return value


def allow_pickle_lora_weights() -> bool:
    """Whether resolvers may accept adapters whose only weights are a pickle
    (adapter_model.bin). Off by default: unpickling can run arbitrary code."""
    return env_flag(ALLOW_PICKLE_ENV, default=False)


def resolver_timeout_s() -> float:
    """How long one resolver may take for one name before the chain moves on."""
    return env_seconds(RESOLVER_TIMEOUT_ENV, DEFAULT_RESOLVER_TIMEOUT_S, allow_zero=False)


def negative_cache_ttl_s() -> float:
    """How long the chain remembers that no resolver knows a name (0 disables)."""
    return env_seconds(NEGATIVE_TTL_ENV, DEFAULT_NEGATIVE_TTL_S, allow_zero=True)


def invalid_cache_ttl_s() -> float:
    """How long a name whose adapter was found but is unusable answers with that error
    without being resolved and loaded again (0 disables)."""
    return env_seconds(INVALID_TTL_ENV, DEFAULT_INVALID_TTL_S, allow_zero=True)
