"""`loraplex bench serve`: drive an OpenAI-compatible server the way users do, and measure it.

Like vLLM's `vllm bench serve`: a client in its own process sends `--num-prompts`
requests to `--base-url` (ours or any other engine's) at a fixed concurrency
(`--max-concurrency`) and/or a Poisson (or, with `--burstiness`, gamma) arrival rate
(`--request-rate`), each for a model drawn from `--models` (the base model's name and
adapter names; uniform, Zipf or round robin), with a random prompt of `--random-input-len`
token ids or words (lengths varied by `--random-range-ratio`, as vLLM's), streaming by
default. It prints and writes as JSON (`--result-file`, or vLLM's `--save-result`) the
request throughput, output tokens/s, time to first token (TTFT), time per output token
(TPOT: a request's decode time over its tokens after the first), inter-token latency (ITL:
the gaps between streamed chunks), end-to-end latency, goodput, failures, and counts per
model. Its flags, vLLM's spellings included, are in bench_serve_args.py.

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
from loraplex.server.bench_serve_args import BenchArgsError, resolve, saved_result_path

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
    """The run's requests, from resolved flags (bench_serve_args.resolve)."""
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
                  "stream": not args.no_stream, **args.sampling}
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
    return {**body, **(args.extra_body or {})}


# ---- one request ------------------------------------------------------------------------

async def send(pool: ConnectionPool, args: argparse.Namespace, request: BenchRequest, headers: dict) -> RequestResult:
    result = RequestResult(request.index, request.model)
    body = json.dumps(request_body(args, request)).encode()
    if args.request_id_prefix is not None:
        headers = {**headers, "X-Request-Id": f"{args.request_id_prefix}{request.index}"}
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

def request_headers(args: argparse.Namespace) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream, application/json"}
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("VLLM_API_KEY")
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return {**headers, **args.headers}


async def get(args: argparse.Namespace, path: str) -> tuple[int, bytes]:
    """(status, body) of GET base_url + path, on a connection of its own."""
    pool = ConnectionPool(args.base_url)
    try:
        async with pool.stream(path, b"", request_headers(args), method="GET") as response:
            return response.status, await response.read()
    finally:
        pool.close()


async def wait_until_ready(args: argparse.Namespace) -> None:
    """vLLM's --ready-check-timeout-sec: poll /health until it answers 200, or fail after the timeout."""
    deadline = time.monotonic() + args.ready_check_timeout_sec
    while True:
        try:
            status, _ = await get(args, "/health")
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            raise BenchArgsError(f"{args.base_url}/health did not answer 200 within {args.ready_check_timeout_sec} s "
                                 f"({last}); is the server up?")
        await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


async def first_served_model(args: argparse.Namespace) -> str:
    """The first model of the server's /v1/models (vLLM's client does the same without --model)."""
    status, payload = await get(args, "/v1/models")
    if status != 200:
        raise HTTPStatusError(status, payload)
    models = json.loads(payload).get("data") or []
    if not models:
        raise BenchArgsError(f"{args.base_url}/v1/models lists no model; give --model")
    return models[0]["id"]


async def run(args: argparse.Namespace, requests: list[BenchRequest]) -> tuple[list[RequestResult], float]:
    pool = ConnectionPool(args.base_url)
    headers = request_headers(args)
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

    # Warm-ups (vLLM's --num-warmups): the first requests' bodies, sent and left out of the figures.
    await asyncio.gather(*(send(pool, args, requests[i % len(requests)], headers) for i in range(args.num_warmups)))
    start = time.perf_counter()
    tasks = []
    for request in requests:
        tasks.append(asyncio.create_task(one(request)))
        if args.request_rate != float("inf"):
            # Gaps of mean 1/rate: gamma-distributed of shape `burstiness` (1: exponential, Poisson arrivals).
            await asyncio.sleep(rng.gamma(args.burstiness, 1.0 / (args.request_rate * args.burstiness)))
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

    def stats_ms(name: str, values: list[float]) -> dict:
        values_ms = np.array(values or [0.0]) * 1000
        out = {f"mean_{name}_ms": float(values_ms.mean()), f"median_{name}_ms": float(np.median(values_ms)),
               f"std_{name}_ms": float(values_ms.std())}
        for p in args.percentile_values if name in args.percentile_names else ():
            out[f"p{p:g}_{name}_ms"] = float(np.percentile(values_ms, p))
        return out

    def tpot(r: RequestResult) -> float | None:
        return (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else None

    def meets_objectives(r: RequestResult) -> bool:
        values_ms = {"ttft": r.ttft * 1000, "e2el": r.latency * 1000, "tpot": (tpot(r) or 0.0) * 1000}
        return all(values_ms[metric] <= bound for metric, bound in args.goodput_ms.items())

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
        "request_goodput": sum(map(meets_objectives, ok)) / duration if args.goodput_ms else None,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        **stats_ms("ttft", [r.ttft for r in ok]),
        **stats_ms("tpot", [t for r in ok if (t := tpot(r)) is not None]),
        **stats_ms("itl", [gap for r in ok for gap in r.itl]),
        **stats_ms("e2el", [r.latency for r in ok]),
        "per_model": dict(sorted(per_model.items())),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
    }
    if args.save_detailed:
        summary["requests"] = [asdict(r) for r in results]
    return summary


def print_summary(summary: dict, args: argparse.Namespace) -> None:
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
    if summary["request_goodput"] is not None:
        rows.insert(6, ("Request goodput (req/s):", f"{summary['request_goodput']:.2f}"))
    for label, value in rows:
        print(f"{label:<40}{value:>12}")
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        print(f" {title} ".center(width, "-"))
        print(f"{'Mean ' + name.upper() + ' (ms):':<40}{summary[f'mean_{name}_ms']:>12.2f}")
        print(f"{'Median ' + name.upper() + ' (ms):':<40}{summary[f'median_{name}_ms']:>12.2f}")
        for p in args.percentile_values if name in args.percentile_names else ():
            print(f"{f'P{p:g} {name.upper()} (ms):':<40}{summary[f'p{p:g}_{name}_ms']:>12.2f}")
    print(" Requests per model ".center(width, "-"))
    for model, entry in summary["per_model"].items():
        print(f"{model[:30]:<31}{entry['completed']:>6} ok {entry['failed']:>4} failed {entry['output_tokens']:>8} tok")
    for error in summary["errors"]:
        print(f"error: {error}")
    print("=" * width)


# ---- the command ------------------------------------------------------------------------

def cmd_bench_serve(args: argparse.Namespace) -> int:
    try:
        resolve(args)
        if args.ready_check_timeout_sec:
            asyncio.run(wait_until_ready(args))
        if not args.models and not args.model:
            args.model = asyncio.run(first_served_model(args))
    except (BenchArgsError, HTTPStatusError, OSError, ValueError) as e:
        print(f"loraplex bench serve: {e}", file=sys.stderr)
        return 2
    requests = build_requests(args)
    results, duration = asyncio.run(run(args, requests))
    summary = summarize(args, results, duration)
    print_summary(summary, args)
    settings = {k: (None if v == float("inf") else v) for k, v in vars(args).items()
                if k not in ("func", "api_key", "header", "headers")}   # credentials stay out of the file
    for path in filter(None, (args.result_file, saved_result_path(args, args.model or args.models[0]))):
        with open(path, "w", encoding="utf-8") as f:
            json.dump({**summary, **args.metadata_pairs, "args": settings}, f, indent=2)
        print(f"result written to {path}")
    return 0 if summary["completed"] else 1
