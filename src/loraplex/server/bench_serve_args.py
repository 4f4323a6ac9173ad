"""`loraplex bench serve`'s flags: ours, and the spellings of vLLM's `vllm bench serve`.

A command written for vLLM's client runs as it is: `--host`/`--port`, `--backend`,
`--dataset-name random`, `--input-len`/`--output-len`, `--burstiness`, `--lora-modules` with
`--lora-assignment`, `--served-model-name`, `--ready-check-timeout-sec`, `--num-warmups`,
`--goodput`, `--save-result`
with `--result-dir`/`--result-filename`, `--label`, `--metadata`, `--metric-percentiles`,
`--percentile-metrics`, `--header`, `--extra-body`, `--request-id-prefix`, `--logprobs` and
the sampling flags mean what they mean there. vLLM flags that need what this client does
not do (its other datasets, a client-side tokenizer) are refused by name, saying what to
use instead; any other unknown flag is refused by argparse.

`resolve(args)` checks the flags and turns vLLM's spellings into ours (one meaning per
setting: `base_url`, `models` with `model_distribution`, `random_input_len`, ...);
BenchArgsError says what is wrong and what to do.
"""

from __future__ import annotations

import argparse
import json
import os
import time

PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")
SAMPLING_FLAGS = {"top_p": float, "top_k": int, "min_p": float, "frequency_penalty": float,
                  "presence_penalty": float, "repetition_penalty": float}
BACKEND_ENDPOINTS = {"openai": "/v1/completions", "vllm": "/v1/completions", "openai-chat": "/v1/chat/completions"}
# vLLM flags that need what this client does not do, and what to use instead.
REFUSED = {
    "dataset_path": "loraplex bench serve makes random prompts or reads text prompts, one per line, from "
                    "--prompts-file; it reads no dataset file",
    "tokenizer": "loraplex bench serve needs no tokenizer: it sends random token ids below --token-id-max "
                 "(set it to the vocabulary size) or random words (--prompt-format text), and counts tokens "
                 "from the server's usage",
    "trust_remote_code": "loraplex bench serve loads no tokenizer or model code",
}


class BenchArgsError(ValueError):
    """A flag or combination of flags that cannot run; the message says what to do."""


def add_bench_serve_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--base-url", default=None,
                        help="the server's URL, without /v1 (default: http://HOST:PORT)")
    target.add_argument("--host", default=None, help="the server's host, when no --base-url (default: 127.0.0.1)")
    target.add_argument("--port", type=int, default=None, help="the server's port, when no --base-url (default: 8000)")
    target.add_argument("--endpoint", default=None,
                        help="/v1/completions (default) or /v1/chat/completions")
    target.add_argument("--backend", default=None, choices=sorted(BACKEND_ENDPOINTS),
                        help="vLLM's: openai or vllm (completions), openai-chat (chat completions)")
    target.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY or $VLLM_API_KEY)")
    target.add_argument("--model", default=None,
                        help="the model name to request (default: the server's first in /v1/models)")
    target.add_argument("--served-model-name", default=None, help="vLLM's: the name to request instead of --model")
    target.add_argument("--models", nargs="+", default=None, metavar="NAME",
                        help="mix of model names, base and adapters, one drawn per request")
    target.add_argument("--model-distribution", default="uniform", choices=["uniform", "zipf", "round-robin"],
                        help="how --models are drawn: uniform, Zipf over the order given, or round robin "
                             "(default: uniform)")
    target.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent: rank r has weight r^-s (default: 1)")
    target.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME",
                        help="vLLM's: adapter names, one per request (--lora-assignment), as --models")
    target.add_argument("--lora-assignment", default="random", choices=["random", "round-robin"],
                        help="vLLM's: how --lora-modules are drawn (default: random)")
    target.add_argument("--header", nargs="+", default=None, metavar="KEY=VALUE", help="more request headers")
    target.add_argument("--ready-check-timeout-sec", type=int, default=0, metavar="S",
                        help="wait up to S seconds for the server's /health to answer 200 before starting "
                             "(default: 0, no wait)")
    load = parser.add_argument_group("load")
    load.add_argument("--num-prompts", type=int, default=256, help="requests to send (default: 256)")
    load.add_argument("--max-concurrency", type=int, default=None,
                      help="most requests in flight (default: no limit)")
    load.add_argument("--request-rate", type=float, default=float("inf"),
                      help="mean requests per second, Poisson arrivals (default: inf, all at once)")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="vLLM's: arrival gaps follow a gamma distribution of this shape (1: Poisson; below 1 "
                           "burstier, above more even); only with --request-rate")
    load.add_argument("--num-warmups", type=int, default=0, help="requests sent before the measured ones (default: 0)")
    load.add_argument("--seed", type=int, default=0, help="seed of prompts, models and arrivals (default: 0)")
    prompts = parser.add_argument_group("prompts")
    prompts.add_argument("--dataset-name", default="random", help="vLLM's: only 'random' (the default)")
    prompts.add_argument("--prompt-format", default="token-ids", choices=["token-ids", "text"],
                         help="random token ids (completions only) or random words (default: token-ids)")
    prompts.add_argument("--random-input-len", type=int, default=None,
                         help="prompt length in tokens or words (default: 128)")
    prompts.add_argument("--input-len", type=int, default=None, help="vLLM's name for --random-input-len")
    prompts.add_argument("--random-prefix-len", type=int, default=0,
                         help="tokens (or words) every random prompt starts with, the same for all, before its "
                              "--random-input-len own ones (default: 0)")
    prompts.add_argument("--random-output-len", type=int, default=None,
                         help="max_tokens of each request (default: 128)")
    prompts.add_argument("--output-len", type=int, default=None, help="vLLM's name for --random-output-len")
    prompts.add_argument("--random-range-ratio", type=float, default=0.0, metavar="R",
                         help="draw each request's input and output lengths uniformly from [len * (1 - R), "
                              "len * (1 + R)] (default: 0, every request alike)")
    prompts.add_argument("--token-id-min", type=int, default=3, help="smallest random token id (default: 3)")
    prompts.add_argument("--token-id-max", type=int, default=256,
                         help="random token ids are below this; keep it within the vocabulary (default: 256)")
    prompts.add_argument("--prompts-file", default=None, help="text prompts, one per line, used in turn")
    prompts.add_argument("--ignore-eos", action="store_true", help="generate max_tokens every time (ignore_eos)")
    prompts.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0)")
    for name, kind in SAMPLING_FLAGS.items():
        prompts.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=f"request {name}")
    prompts.add_argument("--logprobs", type=int, default=None, help="request this many logprobs per token")
    prompts.add_argument("--extra-body", type=json.loads, default=None, metavar="JSON",
                         help="a JSON object merged into every request's body")
    prompts.add_argument("--request-id-prefix", default=None, help="send X-Request-Id: PREFIX + request index")
    prompts.add_argument("--no-stream", action="store_true", help="non-streaming requests (TTFT = latency)")
    out = parser.add_argument_group("output")
    out.add_argument("--result-file", default=None, help="write the summary as JSON here")
    out.add_argument("--save-result", action="store_true",
                     help="vLLM's: write the summary as JSON to --result-dir/--result-filename (default name: "
                          "LABEL-RATEqps-MODEL-DATE.json)")
    out.add_argument("--result-dir", default=None, help="vLLM's: the directory of --save-result's file")
    out.add_argument("--result-filename", default=None, help="vLLM's: the name of --save-result's file")
    out.add_argument("--label", default=None, help="vLLM's: the run's label, first in the default file name")
    out.add_argument("--metadata", nargs="+", default=None, metavar="KEY=VALUE", help="saved with the summary")
    out.add_argument("--save-detailed", action="store_true", help="include every request's timings in the JSON")
    out.add_argument("--percentiles", "--metric-percentiles", dest="percentiles", default="50,90,99",
                     help="latency percentiles (default: 50,90,99)")
    out.add_argument("--percentile-metrics", default=",".join(PERCENTILE_METRICS),
                     help="the metrics whose percentiles are reported (default: ttft,tpot,itl,e2el)")
    out.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS",
                     help="service-level objectives (ttft, tpot, e2el in ms): also report the rate of requests "
                          "that meet them all")
    out.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    refused = parser.add_argument_group("vLLM flags this client refuses, saying why")
    refused.add_argument("--dataset-path", default=None, help=argparse.SUPPRESS)
    refused.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)
    refused.add_argument("--trust-remote-code", action="store_true", default=None, help=argparse.SUPPRESS)


def _pairs(items: list[str] | None, flag: str, sep: str) -> dict[str, str]:
    pairs = {}
    for item in items or []:
        key, found, value = item.partition(sep)
        if not found or not key:
            raise BenchArgsError(f"{flag} takes KEY{sep}VALUE items, got {item!r}")
        pairs[key] = value
    return pairs


def _one_of(ours: int | None, theirs: int | None, names: str, default: int) -> int:
    if ours is not None and theirs is not None and ours != theirs:
        raise BenchArgsError(f"{names} are the same setting; give one")
    value = ours if ours is not None else theirs if theirs is not None else default
    if value < 1:
        raise BenchArgsError(f"{names.split(' and ')[0]} must be positive, got {value}")
    return value


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Check the flags and settle each setting once (vLLM's spellings into ours); returns args."""
    for name, why in REFUSED.items():
        if getattr(args, name) not in (None, False):
            raise BenchArgsError(f"--{name.replace('_', '-')}: {why}")
    if args.dataset_name != "random":
        raise BenchArgsError(f"--dataset-name {args.dataset_name}: {REFUSED['dataset_path']} "
                             "(--dataset-name random)")
    if args.base_url is not None and (args.host is not None or args.port is not None):
        raise BenchArgsError("give --base-url or --host/--port, not both")
    if args.base_url is None:
        args.base_url = f"http://{args.host or '127.0.0.1'}:{args.port or 8000}"
    if args.endpoint is None:
        args.endpoint = BACKEND_ENDPOINTS[args.backend or "openai"]
    if args.served_model_name is not None:
        args.model = args.served_model_name
    if args.lora_modules:
        if args.models:
            raise BenchArgsError("--lora-modules (vLLM's) and --models name the same thing; give one")
        args.models = args.lora_modules
        args.model_distribution = "uniform" if args.lora_assignment == "random" else "round-robin"
    args.random_input_len = _one_of(args.random_input_len, args.input_len, "--random-input-len and --input-len", 128)
    args.random_output_len = _one_of(args.random_output_len, args.output_len,
                                     "--random-output-len and --output-len", 128)
    if args.num_prompts < 1 or (args.max_concurrency is not None and args.max_concurrency < 1) \
            or args.request_rate <= 0 or args.burstiness <= 0:
        raise BenchArgsError("--num-prompts, --max-concurrency, --request-rate and --burstiness must be positive")
    if args.random_prefix_len < 0 or args.num_warmups < 0 or args.ready_check_timeout_sec < 0:
        raise BenchArgsError("--random-prefix-len, --num-warmups and --ready-check-timeout-sec must not be negative")
    if not 0 <= args.random_range_ratio < 1:
        raise BenchArgsError(f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}")
    try:
        args.percentile_values = [float(p) for p in args.percentiles.split(",")]
    except ValueError:
        raise BenchArgsError(f"--percentiles takes numbers separated by commas, got {args.percentiles!r}") from None
    if not all(0 <= p <= 100 for p in args.percentile_values):
        raise BenchArgsError(f"--percentiles must be within [0, 100], got {args.percentiles!r}")
    args.percentile_names = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    unknown = [m for m in args.percentile_names if m not in PERCENTILE_METRICS]
    if unknown:
        raise BenchArgsError(f"--percentile-metrics: unknown {', '.join(unknown)}; choose from "
                             f"{', '.join(PERCENTILE_METRICS)}")
    args.goodput_ms = {}
    for metric, value in _pairs(args.goodput, "--goodput", ":").items():
        if metric not in GOODPUT_METRICS:
            raise BenchArgsError(f"--goodput: unknown metric {metric!r}; choose from {', '.join(GOODPUT_METRICS)}")
        try:
            args.goodput_ms[metric] = float(value)
        except ValueError:
            raise BenchArgsError(f"--goodput {metric}:{value}: the objective is a number of ms") from None
    args.headers = _pairs(args.header, "--header", "=")
    args.metadata_pairs = _pairs(args.metadata, "--metadata", "=")
    if args.extra_body is not None and not isinstance(args.extra_body, dict):
        raise BenchArgsError("--extra-body must be a JSON object")
    args.sampling = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    if args.logprobs is not None:
        args.sampling["logprobs"] = args.logprobs
    if (args.result_dir or args.result_filename) and not args.save_result:
        raise BenchArgsError("--result-dir and --result-filename name --save-result's file: add --save-result "
                             "(or write to a path of your own with --result-file)")
    return args


def saved_result_path(args: argparse.Namespace, model: str) -> str | None:
    """Where --save-result writes: --result-dir / (--result-filename or vLLM's pattern of name)."""
    if not args.save_result:
        return None
    rate = "inf" if args.request_rate == float("inf") else f"{args.request_rate:g}"
    name = args.result_filename or \
        f"{args.label or args.backend or 'openai'}-{rate}qps-{os.path.basename(model.rstrip('/'))}-" \
        f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    return os.path.join(args.result_dir or ".", name)
