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
import json
import logging
from typing import NamedTuple

from loraplex.errors import ConfigError

logger = logging.getLogger("loraplex.server")


class VLLMFlag(NamedTuple):
    names: tuple[str, ...]
    takes_value: bool
    why: str
    off: tuple = ()          # refused flags: the values that mean "not used" (accepted)


_GRAPHS = ("loraplex compiles nothing with torch.compile; it captures CUDA graphs of its own, decode batch sizes "
           "and mixed-step token buckets (docs/engine.md); the outputs are the same")
_WEIGHTS = "the weights are memory-mapped from MODEL's safetensors files, in one process"
_LOCAL_MODEL = "MODEL is a local checkpoint directory: nothing of the base model is downloaded"
_HTTPTOOLS = "the HTTP server parses requests with httptools, not h11"

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
    VLLMFlag(("--optimization-level",), True, _GRAPHS),
    VLLMFlag(("--compilation-config", "-cc"), True, _GRAPHS),
    VLLMFlag(("--cudagraph-capture-sizes",), True, _GRAPHS),
    VLLMFlag(("--max-cudagraph-capture-size",), True, _GRAPHS),
    VLLMFlag(("--max-parallel-loading-workers",), True, _WEIGHTS),
    VLLMFlag(("--safetensors-load-strategy",), True, _WEIGHTS),
    VLLMFlag(("--safetensors-prefetch-num-threads",), True, _WEIGHTS),
    VLLMFlag(("--safetensors-prefetch-block-size",), True, _WEIGHTS),
    VLLMFlag(("--use-tqdm-on-load",), False, "loading shows no progress bar"),
    VLLMFlag(("--download-dir",), True, _LOCAL_MODEL),
    VLLMFlag(("--revision",), True, _LOCAL_MODEL),
    VLLMFlag(("--code-revision",), True, _LOCAL_MODEL),
    VLLMFlag(("--tokenizer-revision",), True, _LOCAL_MODEL),
    VLLMFlag(("--disable-custom-all-reduce",), False, "tensor-parallel all-reduces go through NCCL"),
    VLLMFlag(("--enable-log-outputs",), False, "loraplex never logs outputs"),
    VLLMFlag(("--enable-log-deltas",), False, "loraplex never logs outputs"),
    VLLMFlag(("--h11-max-incomplete-event-size",), True, _HTTPTOOLS),
    VLLMFlag(("--h11-max-header-count",), True, _HTTPTOOLS),
]

# Refused unless off: serving without their effect would not be what was asked for.
REFUSED = [
    VLLMFlag(("--quantization", "-q"), True,
             "loraplex serves unquantized float32, float16 or bfloat16 weights", off=(None, "None", "none")),
    VLLMFlag(("--kv-cache-dtype",), True, "the KV cache holds the model's dtype", off=(None, "auto")),
    VLLMFlag(("--pipeline-parallel-size", "-pp"), True,
             "one host only: split a model with --tensor-parallel-size", off=(None, "1")),
    VLLMFlag(("--speculative-config", "-sc"), True, "loraplex has no speculative decoding", off=(None,)),
    VLLMFlag(("--tokenizer",), True,   # MODEL itself is accepted too
             "the tokenizer is read from MODEL's directory; put the tokenizer files there", off=(None,)),
    VLLMFlag(("--enable-auto-tool-choice",), False,
             "tool calls are not parsed out of the output (tools render into the chat template only)"),
    VLLMFlag(("--tool-call-parser", "--reasoning-parser"), True,
             "tool calls and reasoning are not parsed out of the output", off=(None,)),
    VLLMFlag(("--api-server-count", "-asc"), True,
             "one API server process serves each engine (docs/performance.md: at 9,200 tokens/s on an H100 it "
             "used 0.38 of a core, and --stream-interval lowers its cost per token)", off=(None, "1")),
    VLLMFlag(("--data-parallel-size", "-dp"), True,
             "one engine per server: run several with `loraplex serve-ray --replicas N`", off=(None, "1")),
]


def _dest(flag: VLLMFlag) -> str:
    return "vllm_" + flag.names[0].lstrip("-").replace("-", "_")


def add_vllm_flags(parser: argparse.ArgumentParser) -> None:
    from loraplex.server.vllm_flag_list import VLLM_SERVE_FLAGS

    kinds = {row[0][0]: row[1] for row in VLLM_SERVE_FLAGS}   # a flag's kind, by its first spelling
    group = parser.add_argument_group("vLLM flags without an implementation (docs/server.md, \"vLLM flags\")")
    for flag in WITHOUT_EFFECT + REFUSED:
        meaning = f"accepted without effect: {flag.why}" if flag in WITHOUT_EFFECT else f"refused: {flag.why}"
        if flag.takes_value:
            group.add_argument(*flag.names, dest=_dest(flag), default=None, metavar="VALUE", help=meaning,
                               nargs="+" if kinds.get(flag.names[0]) == "values" else None)
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
    check_vllm_only_flags(getattr(args, "vllm_only_flags", []))


# ---- every other option of `vllm serve` (vllm_flag_list.py) -------------------------------------
# Not registered with argparse: take_vllm_only_flags lifts them out of the command line first.
# At vLLM's default (or a switch's "off" spelling: the feature loraplex lacks stays off) they are
# accepted and logged; otherwise refused, all of them at once, with the part of vLLM they belong to.

_WHY_BY_SECTION = {
    "ParallelConfig": "loraplex runs one engine per server on one host, split only by --tensor-parallel-size "
                      "(replicas: `loraplex serve-ray`)",
    "CacheConfig": "the KV cache is loraplex's own: --block-size, --gpu-memory-utilization, --kv-cache-bytes "
                   "and --enable-prefix-caching set it",
    "OffloadConfig": "weights and the KV cache stay in device memory",
    "SchedulerConfig": "loraplex schedules first come, first served under --max-num-seqs, "
                       "--max-num-batched-tokens and --long-prefill-token-threshold",
    "MultiModalConfig": "multimodal inputs are handled as docs/multimodal.md says (--limit-mm-per-prompt, "
                        "--allow-remote-media)",
    "MambaConfig": "loraplex serves transformer models without Mamba layers",
    "KernelConfig": "loraplex runs its own kernels (Triton attention and LoRA) and CUDA graphs",
    "AttentionConfig": "loraplex runs its own attention kernels",
    "CompilationConfig": _GRAPHS,
    "LoadConfig": "the weights are read from MODEL's safetensors files (or random, --load-format dummy)",
    "ModelConfig": "the model is read from MODEL's directory as it is",
    "LoRAConfig": "it is not one of loraplex's LoRA settings (docs/server.md)",
    "ObservabilityConfig": "loraplex's metrics are its own (/metrics, docs/server.md) and it exports no traces",
    "LoggingConfig": "loraplex logs through --log-level",
    "StructuredOutputsConfig": "tool calls and reasoning are not parsed out of the output",
    "VllmConfig": "loraplex has no such subsystem (speculative decoding, KV or encoder transfer, profilers, "
                  "watermarks)",
    "Frontend": "loraplex's API server does not implement it",
    "serve CLI": "one API server process serves one engine, over HTTP",
}
_WHY_BY_FLAG = {
    "--allowed-local-media-path": "media come as data: URLs or, with --allow-remote-media, http(s) URLs; "
                                  "files of the server are not read",
    "--scheduling-policy": "loraplex schedules first come, first served (request priorities are refused)",
    "--tokenizer-mode": "the tokenizer is MODEL's tokenizer.json, read with the tokenizers library",
    "--num-gpu-blocks-override": "size the KV cache with --kv-cache-bytes or --gpu-memory-utilization",
    "--hf-overrides": "the model's config.json is read as it is",
    "--disable-sliding-window": "a sliding-window model attends as its config.json says",
    "--enable-sleep-mode": "loraplex has no sleep mode (/sleep, /wake_up)",
    "--uds": "loraplex listens on TCP (--host, --port)",
    "--logits-processors": "loraplex loads no logits-processor classes",
}


def take_vllm_only_flags(argv: list[str], known: set[str]) -> tuple[list[str], list[tuple[str, object, tuple]]]:
    """argv without the `vllm serve` options loraplex's parser does not know, and those options as
    (spelling, value, row of VLLM_SERVE_FLAGS). Long options may use underscores (vLLM's parser
    accepts --max_model_len), -O3 is --optimization-level 3, and --flag.key value (vLLM's dotted
    JSON) counts as --flag."""
    from loraplex.server.vllm_flag_list import VLLM_SERVE_FLAGS

    rows = {spelling: row for row in VLLM_SERVE_FLAGS for spelling in row[0]}
    kept, found, dotted, i = [], [], {}, 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":
            kept += argv[i - 1:]
            break
        if not token.startswith("-") or _is_number(token):
            kept.append(token)
            continue
        name, inline = token.split("=", 1) if "=" in token else (token, None)
        if name.startswith("-O") and not name.startswith("--") and name not in known:
            name, inline = "--optimization-level", name[2:] or inline
        elif name.startswith("--"):
            head, dot, tail = name[2:].partition(".")
            name = "--" + head.replace("_", "-") + dot + tail
        base, dot, key = name.partition(".")
        if base in known and dot:    # vLLM's dotted JSON: --flag.key value (key+ appends to a list)
            value, i = _flag_value("value", inline, argv, i)
            _set_dotted(dotted.setdefault(base, {}), key, value)
            continue
        if base in known:            # loraplex's own
            kept.append(name if inline is None else f"{name}={inline}")
            continue
        row = rows.get(base)
        if row is None:              # neither loraplex's nor vLLM's: argparse says so
            kept.append(token)
            continue
        value, i = _flag_value(row[1], inline, argv, i)
        found.append((base, value, row))
    for base, value in dotted.items():
        kept += [base, json.dumps(value)]
    return kept, found


def _set_dotted(target: dict, key: str, text: str | None) -> None:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        value = text
    *path, last = key.split(".")
    for part in path:
        target = target.setdefault(part, {})
    if last.endswith("+"):
        items = value if isinstance(value, list) else str(value).split(",")
        target.setdefault(last[:-1], []).extend(items)
    else:
        target[last] = value


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _flag_value(kind: str, inline: str | None, argv: list[str], i: int) -> tuple[object, int]:
    if kind == "switch" or inline is not None:
        return inline, i
    if kind == "value":
        return (argv[i], i + 1) if i < len(argv) else (None, i)
    values = []
    while i < len(argv) and (not argv[i].startswith("-") or _is_number(argv[i])):
        values.append(argv[i])
        i += 1
        if kind == "optional":
            break
    return (values[0] if values else None) if kind == "optional" else values, i


def is_vllm_default(spelling: str, value, row: tuple) -> bool:
    """Whether the option, as given, asks for what vLLM does by default (or, for a switch, for
    its feature off)."""
    spellings, kind, default, _ = row
    if kind == "switch":
        return spelling != spellings[0] or default == "True"
    if isinstance(value, list):                 # one or more values: the default's list, item by item
        expected = _normal(default)
        expected = expected if isinstance(expected, list) else [] if expected is None else [expected]
        return [_normal(v) for v in value] == [_normal(str(v)) for v in expected]
    return _normal(value) == _normal(default)


def _normal(text):
    if text is None or str(text).strip().strip("'\"").lower() in ("none", "(unset)", ""):
        return None
    text = str(text).strip()
    for parse in (json.loads, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text.strip("'\"").lower()


def check_vllm_only_flags(found: list[tuple[str, object, tuple]]) -> None:
    """Log the options taken at vLLM's default; refuse the others, naming each and why."""
    refused = []
    for spelling, value, row in found:
        shown = spelling + ("" if value in (None, []) else " " + (" ".join(value) if isinstance(value, list) else str(value)))
        if is_vllm_default(spelling, value, row):
            logger.info("%s has no effect in loraplex: it asks for vLLM's default (or the feature off)", shown)
        else:
            why = _WHY_BY_FLAG.get(row[0][0]) or _WHY_BY_SECTION.get(row[3], "loraplex does not implement it")
            refused.append(f"{shown} ({why})")
    if refused:
        raise ConfigError("vLLM flags loraplex does not implement: " + "; ".join(refused) +
                          "; remove them from the command (docs/server.md, \"vLLM flags\")")
