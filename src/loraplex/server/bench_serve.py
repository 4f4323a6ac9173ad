"""`loraplex bench serve`: drive an OpenAI-compatible server the way users do, and measure it.

Like vLLM's `vllm bench serve`: a client in its own process sends `--num-prompts`
requests to `--base-url` (ours or any other engine's) at a fixed concurrency
(`--max-concurrency`) and/or a Poisson arrival rate (`--request-rate`), each for a model
drawn from `--models` (the base model's name and adapter names; uniform, Zipf or round
robin), with a random prompt of `--random-input-len` token ids or words (lengths varied
by `--random-range-ratio`, as vLLM's), streaming by default. It prints and writes as JSON (`--result-file`) the request throughput, output
tokens/s, time to first token (TTFT), time per output token (TPOT: a request's decode
time over its tokens after the first), inter-token latency (ITL: the gaps between
streamed chunks), end-to-end latency, failures, and counts per model.

It imports neither torch nor the server: it starts in well under a second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from loraplex.server.bench_http import ConnectionPool, HTTPStatusError

WORDS = ("the quick brown fox jumps over a lazy dog while many models serve one base with small "
         "adapters batched together on every step of the engine").split()


@dataclass
class BenchRequest:
    index: int
    model: str
    prompt: str | list[int]
    max_tokens: int


@dataclass
class RequestResult:
    index: int
    model: str
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0                          # seconds
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    sent_at: float = 0.0                       # wall clock (time.time()): lines up with server logs


# ---- the workload -----------------------------------------------------------------------

def model_sequence(models: list[str], distribution: str, count: int, rng: random.Random, zipf_s: float) -> list[str]:
    if distribution == "round-robin":
        return [models[i % len(models)] for i in range(count)]
    if distribution == "uniform":
        weights = [1.0] * len(models)
    else:                                      # zipf: rank r (1-based, in the order given) has weight r^-s
        weights = [1.0 / (rank ** zipf_s) for rank in range(1, len(models) + 1)]
    return rng.choices(models, weights=weights, k=count)


def random_length(length: int, ratio: float, rng: random.Random) -> int:
    """A length drawn uniformly from [length * (1 - ratio), length * (1 + ratio)], at least 1."""
    if ratio <= 0:
        return length
    return max(1, rng.randint(round(length * (1 - ratio)), round(length * (1 + ratio))))


def build_requests(args: argparse.Namespace) -> list[BenchRequest]:
    if not 0 <= args.random_range_ratio < 1:
        raise SystemExit(f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}")
    rng = random.Random(args.seed)
    models = args.models or [args.model]
    names = model_sequence(models, args.model_distribution, args.num_prompts, rng, args.zipf_s)
    file_prompts = None
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            file_prompts = [line.rstrip("\n") for line in f if line.strip()]
        if not file_prompts:
            raise SystemExit(f"--prompts-file {args.prompts_file} holds no prompt")
    # vLLM's --random-prefix-len: the same random start for every prompt (what a prefix cache shares).
    if args.prompt_format == "token-ids":
        prefix = [rng.randrange(args.token_id_min, args.token_id_max) for _ in range(args.random_prefix_len)]
    else:
        prefix = " ".join(rng.choice(WORDS) for _ in range(args.random_prefix_len))
    requests = []
    for i, name in enumerate(names):
        input_len = random_length(args.random_input_len, args.random_range_ratio, rng)
        if file_prompts is not None:
            prompt = file_prompts[i % len(file_prompts)]
        elif args.prompt_format == "token-ids":
            prompt = prefix + [rng.randrange(args.token_id_min, args.token_id_max) for _ in range(input_len)]
        else:
            prompt = " ".join(filter(None, [prefix, *(rng.choice(WORDS) for _ in range(input_len))]))
        requests.append(BenchRequest(i, name, prompt, random_length(args.random_output_len, args.random_range_ratio,
                                                                     rng)))
    return requests


def request_body(args: argparse.Namespace, request: BenchRequest) -> dict:
    body: dict = {"model": request.model, "max_tokens": request.max_tokens, "temperature": args.temperature,
                  "stream": not args.no_stream}
    if args.endpoint.endswith("/chat/completions"):
        if not isinstance(request.prompt, str):
            raise SystemExit("--endpoint /v1/chat/completions needs text prompts: --prompt-format text")
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    if args.ignore_eos:
        body["ignore_eos"] = True
    if not args.no_stream:
        body["stream_options"] = {"include_usage": True}
    return body


# ---- one request ------------------------------------------------------------------------

async def send(pool: ConnectionPool, args: argparse.Namespace, request: BenchRequest, headers: dict) -> RequestResult:
    result = RequestResult(request.index, request.model)
    body = json.dumps(request_body(args, request)).encode()
    result.sent_at = time.time()
    start = time.perf_counter()
    last = start
    chunks = 0
    try:
        async with pool.stream(args.endpoint, body, headers) as response:
            if response.status != 200:
                raise HTTPStatusError(response.status, await response.read())
            if args.no_stream:
                payload = json.loads(await response.read())
                result.ttft = time.perf_counter() - start
                usage = payload.get("usage") or {}
            else:
                usage = {}
                async for data in response.iter_sse_data():
                    if data == b"[DONE]":
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        raise RuntimeError(f"error event: {event['error'].get('message')}")
                    if event.get("usage"):
                        usage = event["usage"]
                    if not event.get("choices"):
                        continue
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
        result.latency = time.perf_counter() - start
        result.output_tokens = int(usage.get("completion_tokens", chunks))
        result.prompt_tokens = int(usage.get("prompt_tokens", 0))
        result.ok = result.output_tokens > 0
        if not result.ok:
            result.error = "the response had no output tokens"
    except Exception as e:  # noqa: BLE001 - a failed request is a result
        result.latency = time.perf_counter() - start
        result.error = f"{type(e).__name__}: {e}"
    return result


# ---- the run ------------------------------------------------------------------------------

async def run(args: argparse.Namespace, requests: list[BenchRequest]) -> tuple[list[RequestResult], float]:
    pool = ConnectionPool(args.base_url)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream, application/json"}
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("VLLM_API_KEY")
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    rng = np.random.default_rng(args.seed)
    progress = _progress(len(requests), args.disable_tqdm)

    async def one(request: BenchRequest) -> RequestResult:
        if limit is None:
            result = await send(pool, args, request, headers)
        else:
            async with limit:
                result = await send(pool, args, request, headers)
        progress.update(1)
        return result

    start = time.perf_counter()
    tasks = []
    for request in requests:
        tasks.append(asyncio.create_task(one(request)))
        if args.request_rate != float("inf"):
            await asyncio.sleep(rng.exponential(1.0 / args.request_rate))     # Poisson arrivals
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    progress.close()
    pool.close()
    return list(results), duration


def _progress(total: int, disabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="requests", disable=disabled, file=sys.stderr)


# ---- the report ---------------------------------------------------------------------------

def summarize(args: argparse.Namespace, results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    percentiles = [float(p) for p in args.percentiles.split(",")]

    def stats_ms(name: str, values: list[float]) -> dict:
        values_ms = np.array(values or [0.0]) * 1000
        out = {f"mean_{name}_ms": float(values_ms.mean()), f"median_{name}_ms": float(np.median(values_ms)),
               f"std_{name}_ms": float(values_ms.std())}
        for p in percentiles:
            out[f"p{p:g}_{name}_ms"] = float(np.percentile(values_ms, p))
        return out

    output_tokens = sum(r.output_tokens for r in ok)
    input_tokens = sum(r.prompt_tokens for r in ok)
    per_model: dict[str, dict] = {}
    for r in results:
        entry = per_model.setdefault(r.model, {"requests": 0, "completed": 0, "failed": 0, "output_tokens": 0})
        entry["requests"] += 1
        entry["completed" if r.ok else "failed"] += 1
        entry["output_tokens"] += r.output_tokens if r.ok else 0
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "base_url": args.base_url, "endpoint": args.endpoint,
        "num_prompts": len(results), "max_concurrency": args.max_concurrency,
        "request_rate": None if args.request_rate == float("inf") else args.request_rate,
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        **stats_ms("ttft", [r.ttft for r in ok]),
        **stats_ms("tpot", [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]),
        **stats_ms("itl", [gap for r in ok for gap in r.itl]),
        **stats_ms("e2el", [r.latency for r in ok]),
        "per_model": dict(sorted(per_model.items())),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
    }
    if args.save_detailed:
        summary["requests"] = [asdict(r) for r in results]
    return summary


def print_summary(summary: dict, percentiles: str) -> None:
    width = 52
    print("=" * width)
    print(" Serving benchmark result ".center(width, "="))
    rows = [("Successful requests:", summary["completed"]), ("Failed requests:", summary["failed"]),
            ("Benchmark duration (s):", f"{summary['duration']:.2f}"),
            ("Total input tokens:", summary["total_input_tokens"]),
            ("Total generated tokens:", summary["total_output_tokens"]),
            ("Request throughput (req/s):", f"{summary['request_throughput']:.2f}"),
            ("Output token throughput (tok/s):", f"{summary['output_throughput']:.2f}"),
            ("Total token throughput (tok/s):", f"{summary['total_token_throughput']:.2f}")]
    for label, value in rows:
        print(f"{label:<40}{value:>12}")
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        print(f" {title} ".center(width, "-"))
        print(f"{'Mean ' + name.upper() + ' (ms):':<40}{summary[f'mean_{name}_ms']:>12.2f}")
        print(f"{'Median ' + name.upper() + ' (ms):':<40}{summary[f'median_{name}_ms']:>12.2f}")
        for p in percentiles.split(","):
            key = f"p{float(p):g}_{name}_ms"
            print(f"{'P' + f'{float(p):g}' + ' ' + name.upper() + ' (ms):':<40}{summary[key]:>12.2f}")
    print(" Requests per model ".center(width, "-"))
    for model, entry in summary["per_model"].items():
        print(f"{model[:30]:<31}{entry['completed']:>6} ok {entry['failed']:>4} failed {entry['output_tokens']:>8} tok")
    for error in summary["errors"]:
        print(f"error: {error}")
    print("=" * width)


# ---- the command ------------------------------------------------------------------------

def add_bench_serve_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--base-url", default="http://127.0.0.1:8000",
                        help="the server's URL, without /v1 (default: http://127.0.0.1:8000)")
    target.add_argument("--endpoint", default="/v1/completions",
                        help="/v1/completions (default) or /v1/chat/completions")
    target.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY or $VLLM_API_KEY)")
    target.add_argument("--model", default=None, help="the model name to request (when --models is not given)")
    target.add_argument("--models", nargs="+", default=None, metavar="NAME",
                        help="mix of model names, base and adapters, one drawn per request")
    target.add_argument("--model-distribution", default="uniform", choices=["uniform", "zipf", "round-robin"],
                        help="how --models are drawn: uniform, Zipf over the order given, or round robin "
                             "(default: uniform)")
    target.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent: rank r has weight r^-s (default: 1)")
    load = parser.add_argument_group("load")
    load.add_argument("--num-prompts", type=int, default=256, help="requests to send (default: 256)")
    load.add_argument("--max-concurrency", type=int, default=None,
                      help="most requests in flight (default: no limit)")
    load.add_argument("--request-rate", type=float, default=float("inf"),
                      help="mean requests per second, Poisson arrivals (default: inf, all at once)")
    load.add_argument("--seed", type=int, default=0, help="seed of prompts, models and arrivals (default: 0)")
    prompts = parser.add_argument_group("prompts")
    prompts.add_argument("--prompt-format", default="token-ids", choices=["token-ids", "text"],
                         help="random token ids (completions only) or random words (default: token-ids)")
    prompts.add_argument("--random-input-len", type=int, default=128, help="prompt length in tokens or words (default: 128)")
    prompts.add_argument("--random-prefix-len", type=int, default=0,
                         help="tokens (or words) every random prompt starts with, the same for all, before its "
                              "--random-input-len own ones (default: 0)")
    prompts.add_argument("--random-output-len", type=int, default=128, help="max_tokens of each request (default: 128)")
    prompts.add_argument("--random-range-ratio", type=float, default=0.0, metavar="R",
                         help="draw each request's input and output lengths uniformly from [len * (1 - R), "
                              "len * (1 + R)] (default: 0, every request alike)")
    prompts.add_argument("--token-id-min", type=int, default=3, help="smallest random token id (default: 3)")
    prompts.add_argument("--token-id-max", type=int, default=256,
                         help="random token ids are below this; keep it within the vocabulary (default: 256)")
    prompts.add_argument("--prompts-file", default=None, help="text prompts, one per line, used in turn")
    prompts.add_argument("--ignore-eos", action="store_true", help="generate max_tokens every time (ignore_eos)")
    prompts.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0)")
    prompts.add_argument("--no-stream", action="store_true", help="non-streaming requests (TTFT = latency)")
    out = parser.add_argument_group("output")
    out.add_argument("--result-file", default=None, help="write the summary as JSON here")
    out.add_argument("--save-detailed", action="store_true", help="include every request's timings in the JSON")
    out.add_argument("--percentiles", default="50,90,99", help="latency percentiles (default: 50,90,99)")
    out.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def cmd_bench_serve(args: argparse.Namespace) -> int:
    if not args.models and not args.model:
        print("loraplex bench serve: give --model NAME or --models NAME...", file=sys.stderr)
        return 2
    if args.num_prompts < 1 or (args.max_concurrency is not None and args.max_concurrency < 1) \
            or args.request_rate <= 0 or args.random_input_len < 1 or args.random_output_len < 1 \
            or args.random_prefix_len < 0:
        print("loraplex bench serve: --num-prompts, --max-concurrency, --request-rate, --random-input-len and "
              "--random-output-len must be positive, --random-prefix-len not negative", file=sys.stderr)
        return 2
    requests = build_requests(args)
    results, duration = asyncio.run(run(args, requests))
    summary = summarize(args, results, duration)
    print_summary(summary, args.percentiles)
    if args.result_file:
        with open(args.result_file, "w", encoding="utf-8") as f:
            settings = {k: (None if v == float("inf") else v) for k, v in vars(args).items() if k != "func"}
            json.dump({**summary, "args": settings}, f, indent=2)
    return 0 if summary["completed"] else 1
