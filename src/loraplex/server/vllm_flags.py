"""`vllm serve` flags that loraplex does not implement, so that a vLLM launch command starts here too.

Every flag below is parsed (a vLLM command line is not an argparse error) and then either
accepted without effect, because what it changes cannot arise in loraplex (logged once at
start-up with the reason), or refused with exit status 2 and the reason, because serving
without its effect would serve something else than the user asked for. A refused flag set
to its "off" value (vLLM's default) is accepted. docs/server.md, "vLLM flags", lists them;
a test checks the two agree. Flags vLLM does not have stay argparse errors.
"""

from __future__ import annotations

import argparse
import logging
from typing import NamedTuple

from loraplex.errors import ConfigError

logger = logging.getLogger("loraplex.server")


class VLLMFlag(NamedTuple):
    names: tuple[str, ...]
    takes_value: bool
    why: str
    off: tuple = ()          # refused flags: the values that mean "not used" (accepted)


# Accepted, without effect (each says why).
WITHOUT_EFFECT = [
    VLLMFlag(("--trust-remote-code",), False,
             "loraplex runs its own model code, never code shipped with a checkpoint"),
    VLLMFlag(("--disable-log-requests", "--enable-log-requests"), False,
             "loraplex never logs requests' prompts or parameters"),
    VLLMFlag(("--max-log-len",), True, "loraplex never logs prompts"),
    VLLMFlag(("--disable-log-stats",), False, "loraplex logs no periodic stats (they are in /metrics)"),
    VLLMFlag(("--enable-chunked-prefill", "--no-enable-chunked-prefill"), False,
             "prompts are always computed in chunks of at most --max-num-batched-tokens (the outputs are "
             "the same either way)"),
    VLLMFlag(("--swap-space",), True, "preempted requests are recomputed, never swapped to CPU memory"),
]

# Refused unless off: serving without their effect would not be what was asked for.
REFUSED = [
    VLLMFlag(("--quantization", "-q"), True,
             "loraplex serves unquantized float32, float16 or bfloat16 weights", off=(None, "None", "none")),
    VLLMFlag(("--kv-cache-dtype",), True, "the KV cache holds the model's dtype", off=(None, "auto")),
    VLLMFlag(("--pipeline-parallel-size", "-pp"), True,
             "one host only: split a model with --tensor-parallel-size", off=(None, "1")),
    VLLMFlag(("--speculative-config",), True, "loraplex has no speculative decoding", off=(None,)),
    VLLMFlag(("--tokenizer",), True,   # MODEL itself is accepted too
             "the tokenizer is read from MODEL's directory; put the tokenizer files there", off=(None,)),
    VLLMFlag(("--enable-auto-tool-choice",), False,
             "tool calls are not parsed out of the output (tools render into the chat template only)"),
    VLLMFlag(("--tool-call-parser", "--reasoning-parser"), True,
             "tool calls and reasoning are not parsed out of the output", off=(None,)),
    VLLMFlag(("--api-server-count", "-asc"), True,
             "one API server process serves each engine (docs/performance.md: it streams about 9,000 tokens/s "
             "a core, and --stream-interval lowers its cost per token)", off=(None, "1")),
    VLLMFlag(("--data-parallel-size", "-dp"), True,
             "one engine per server: run several with `loraplex serve-ray --replicas N`", off=(None, "1")),
]


def _dest(flag: VLLMFlag) -> str:
    return "vllm_" + flag.names[0].lstrip("-").replace("-", "_")


def add_vllm_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("vLLM flags without an implementation (docs/server.md, \"vLLM flags\")")
    for flag in WITHOUT_EFFECT + REFUSED:
        meaning = f"accepted without effect: {flag.why}" if flag in WITHOUT_EFFECT else f"refused: {flag.why}"
        if flag.takes_value:
            group.add_argument(*flag.names, dest=_dest(flag), default=None, metavar="VALUE", help=meaning)
        else:
            group.add_argument(*flag.names, dest=_dest(flag), action="store_true", help=meaning)


def check_vllm_flags(args: argparse.Namespace) -> None:
    """Refuse the refused flags that are set (ConfigError: exit status 2); log the others."""
    for flag in REFUSED:
        value = getattr(args, _dest(flag), None)
        if flag.names[0] == "--tokenizer" and value is not None and value == getattr(args, "model", None):
            continue
        if flag.takes_value and value not in flag.off or not flag.takes_value and value:
            shown = flag.names[0] + (f" {value}" if flag.takes_value else "")
            raise ConfigError(f"{shown} is not supported by loraplex: {flag.why}; remove it from the command")
    for flag in WITHOUT_EFFECT:
        value = getattr(args, _dest(flag), None)
        if value not in (None, False):
            logger.info("%s has no effect in loraplex: %s", "/".join(flag.names), flag.why)
