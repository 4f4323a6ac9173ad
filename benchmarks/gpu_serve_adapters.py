"""gpu_serve.py's sections on adapters that arrive while it serves: a burst of never-seen
adapters at once, and one cold adapter at a time beside running streams (gpu_serve.py's
docstring says what each measures)."""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from gpu_serve_offline import stop_profile
from gpu_serve_server import (Server, bench, bench_argv, engine_steps, env, log, logged_times, mean_step_ms,
                              metric_total, model_mix, profile, summary_of)


def burst_section(args, server: Server, tmp: Path, burst: dict, profiled: bool = True) -> dict:
    names = list(burst)
    resolution = "loraplex_lora_resolution_seconds"
    before = [metric_total(server.url, resolution + part) for part in ("_sum", "_count")]
    steps_before = engine_steps(server.url)
    log_lines_before = len(server.log_path.read_text().splitlines())
    # Every thread, waiting or not (the loaders wait in native code), and which one holds the GIL,
    # from before the client starts (it takes seconds to import) until its last request ends.
    spies = [profile(args, server, "burst", "--idle", seconds=120),
             profile(args, server, "burst-gil", "--gil", seconds=120)] if profiled else []
    out = bench(server.url, ["--models", *names, "--model-distribution", "round-robin", "--num-prompts",
                             str(len(names)), "--max-concurrency", str(len(names)), "--random-input-len",
                             str(args.input_len), "--random-output-len", "16", "--ignore-eos", "--token-id-min",
                             "10", "--token-id-max", str(min(args.vocab, 128000)), "--save-detailed"],
                tmp / "burst.json")
    for spy in spies:
        stop_profile(spy)
    after = [metric_total(server.url, resolution + part) for part in ("_sum", "_count")]
    steps_after = engine_steps(server.url)
    result = summary_of(out)
    # Few steps for the burst's length: some steps were long (the first tokens come in clumps).
    result["engine_steps"] = steps_after[1] - steps_before[1]
    # Every first token in order: spread out (loads finish one by one) or together (something waits for all).
    result["ttfts_ms"] = sorted(round(r["ttft"] * 1e3) for r in out["requests"] if r.get("ttft"))
    # With --server-flags "--log-level info", when (after the first request was sent) each
    # adapter was found by the resolver (API process) and loaded (engine process).
    sent = min(r["sent_at"] for r in out["requests"])
    for event, pattern in (("resolved", "resolved by"), ("loaded", "loaded LoRA adapter")):
        times = logged_times(server.log_path, pattern, names)
        if times:
            result[f"{event}_ms"] = sorted(round((t - sent) * 1e3) for t in times)
    # Steps of 100 ms or more during this burst, as the engine logged them (with --log-level
    # info): their count and the longest, with where its time went.
    slow = [line for line in server.log_path.read_text().splitlines()[log_lines_before:] if "slow engine step" in line]
    result["slow_steps"] = len(slow)
    if slow:
        result["slowest_step"] = max(slow, key=lambda line: int(re.search(r"step: (\d+) ms", line).group(1)))
    loads = after[1] - before[1]
    # Resolution: the resolver chain and the engine's load, as the server timed each adapter.
    result["resolution_mean_ms"] = round((after[0] - before[0]) / loads * 1e3, 1) if loads else None
    log(f"  burst of {len(names)} new adapters: first token p50 {result['median_ttft_ms']:.0f} ms, "
        f"last {result['p100_ttft_ms']:.0f} ms, failed {result['failed']}; resolution mean "
        f"{result['resolution_mean_ms']} ms over {loads:.0f}; first tokens at {result['ttfts_ms']}; "
        f"resolved at {result.get('resolved_ms')}; loaded at {result.get('loaded_ms')}; "
        f"{result['engine_steps']:.0f} engine steps, {len(slow)} of them 100 ms or more")
    return result


def cold_section(args, server: Server, tmp: Path, adapters: dict, cold: dict) -> dict:
    """Pairs (never-seen adapter, loaded adapter) sent together while 56 streams decode.
    The streams use 24 of the 32 loaded adapters, so the cold adapter finds a free device slot:
    with all 32 in use, each new adapter evicts one the streams need back at once, and the
    swaps that follow (an 80 MiB copy each) would be counted as the load's cost."""
    # Enough prompts for the probes' minute (a stream's request lasts about a second), not
    # 100,000: the client made all of them before sending any, and the first probes of earlier
    # runs met a server still waiting for its streams.
    background_argv = [*bench_argv(model_mix(min(24, len(adapters))), 100 * args.cold_concurrency, args.input_len,
                                   args.output_len, args.vocab), "--max-concurrency", str(args.cold_concurrency)]
    stop = threading.Event()

    def load(result_name: str) -> threading.Thread:
        def run():
            # A long run stopped from outside: bench serve is killed; what matters is the load.
            proc = subprocess.Popen([sys.executable, "-m", "loraplex.server.cli", "bench", "serve", "--base-url",
                                     server.url, "--disable-tqdm", *background_argv], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, env=env())
            stop.wait()
            proc.terminate()
            proc.wait(60)
        thread = threading.Thread(target=run, name=result_name)
        thread.start()
        return thread

    pair_argv = ["--model-distribution", "round-robin", "--num-prompts", "2", "--max-concurrency", "2",
                 "--random-input-len", str(args.input_len), "--random-output-len", "4", "--ignore-eos",
                 "--token-id-min", "10", "--token-id-max", str(min(args.vocab, 128000)), "--save-detailed"]
    background = load("background")
    # The streams reach steady decode: all of them running (at most a minute), then a settle.
    deadline = time.monotonic() + 60
    while (metric_total(server.url, "vllm:num_requests_running") < args.cold_concurrency
           and time.monotonic() < deadline):
        time.sleep(0.5)
    time.sleep(args.cold_settle_s)
    deltas, probes = [], []
    try:
        for i, name in enumerate(cold):
            # The background streams' mean step over each pair's lifetime: with a cold load in
            # flight against without (the load runs on the engine's loader threads).
            start = engine_steps(server.url)
            warm = bench(server.url, ["--models", "a1", "a2", *pair_argv], tmp / f"warm-pair-{i}.json")
            middle = engine_steps(server.url)
            out = bench(server.url, ["--models", name, "a1", *pair_argv], tmp / f"cold-pair-{i}.json")
            end = engine_steps(server.url)
            ttft = {r["model"]: r["ttft"] * 1e3 for r in out["requests"]}
            deltas.append(ttft[name] - ttft["a1"])
            probes.append({"cold_ms": ttft[name], "loaded_ms": ttft["a1"], "loaded_pair_ttft_ms": warm["median_ttft_ms"],
                           "loaded_pair_itl_ms": warm["median_itl_ms"], "cold_pair_itl_ms": out["median_itl_ms"],
                           "step_ms_loaded_pair": mean_step_ms(start, middle),
                           "step_ms_cold_pair": mean_step_ms(middle, end)})
            log(f"  cold {name}: first token {ttft[name]:.0f} ms, loaded adapter's {ttft['a1']:.0f} ms "
                f"(+{deltas[-1]:.0f} ms); mean step {probes[-1]['step_ms_loaded_pair']} ms without a load, "
                f"{probes[-1]['step_ms_cold_pair']} ms with one")
    finally:
        stop.set()
        background.join()
    ratios = [p["step_ms_cold_pair"] / p["step_ms_loaded_pair"] for p in probes
              if p["step_ms_cold_pair"] and p["step_ms_loaded_pair"]]
    return {"delta_ms_median": statistics.median(deltas), "deltas_ms": deltas, "probes": probes,
            # target: the others' step time up at most 10% while a cold adapter loads
            "step_ratio_median": statistics.median(ratios) if ratios else None}
