"""The error hierarchy. Every error a user can cause is one of these.

The server maps these classes to HTTP status codes in exactly one place
(loraplex.server.errors); everything else just raises them with a message that
says what was wrong and what to do.
"""


class LoraplexError(Exception):
    """Base class of every loraplex error."""


class ConfigError(LoraplexError, ValueError):
    """An engine or server setting is invalid (bad flag, env var, model dir)."""


class UnsupportedModelError(ConfigError):
    """The checkpoint's architecture is not one loraplex implements."""


class InvalidRequestError(LoraplexError, ValueError):
    """A generation request is malformed (bad sampling parameter, prompt too long...)."""


class AdapterError(LoraplexError):
    """Base class of errors about a LoRA adapter."""


class AdapterNameError(AdapterError, ValueError):
    """An adapter name is unsafe or malformed; rejected before any I/O."""


class AdapterNotFoundError(AdapterError, LookupError):
    """No resolver (or no loaded adapter) knows this name."""


class AdapterInvalidError(AdapterError, ValueError):
    """An adapter was found but is unusable (bad config, weights, shapes, base model)."""


class AdapterMismatchError(AdapterInvalidError):
    """What a resolver found is not a LoRA adapter for the served base model (another PEFT
    method, another base model). For a resolver that means "not mine": the chain asks the
    next one, and reports the reason only if none finds a usable adapter."""


class ResolverError(AdapterError):
    """Every resolver that was asked failed with an error (source down, refused...)."""


class AdapterCapacityError(AdapterError):
    """No device slot or CPU cache entry can be freed (all pinned or in use)."""


class KernelArgumentError(LoraplexError, ValueError):
    """A kernel launcher got tensors of the wrong shape, dtype, device or layout."""


class EngineDeadError(LoraplexError, RuntimeError):
    """The engine loop stopped (after an error, or shut down); in-flight and new requests fail."""


class TensorParallelError(EngineDeadError):
    """A rank of the tensor-parallel group died, hung past distributed_timeout_seconds or failed;
    the engine cannot continue and must be restarted."""
