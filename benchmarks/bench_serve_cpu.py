"""The demo through `loraplex serve` against `LLM.generate` on the same requests, on the CPU.

Workload (both sides identical, built by `loraplex bench serve`'s own generator): N
requests round robin over the demo's base model and its three adapters, prompts of
random token ids, greedy, `ignore_eos`, a fixed number of output tokens (or, with
`--range-ratio R`, prompt and output lengths drawn within ±R of them: requests then do not
all finish in the same step).

- offline: `LLM(demo, enable_lora=True, max_num_seqs=C).generate(all N)` in a fresh
  process (after a warm-up generate that loads the adapters); tokens/s of the call.
- served: `loraplex serve --demo --max-num-seqs C` (a subprocess; its engine in its own
  process unless the mode says otherwise), warmed up the same way, then `loraplex bench
  serve --max-concurrency C` (another process) streaming the N requests; its output
  tokens/s. The CPU seconds the API server and the engine process used during the timed
  run are read from /proc, per 1000 output tokens: robust to the load of a shared machine,
  unlike wall time.
- where the engine's step loop spent the run (its thread's /proc schedstat): running, waiting
  for a core (runnable but not running: other processes had the cores), or idle (waiting for
  work: nothing to step). Offline, the same for LLM.generate's thread.

Runs alternate offline and served, `--runs` times; the table gives medians and ranges, and
each run's line the machine's 1-minute load average before and after it (other processes
share the cores: a run under load measures the share of the cores it got).
`--client-nice N` runs the bench client at a lower priority (to see how much its own CPU
competes with the engine on a small machine). `--client-concurrency N` drives the server with N clients (default: the concurrency, which
is also max_num_seqs on both sides): more clients than running sequences keep requests
queued in the engine, as `LLM.generate` has them.

    .venv/bin/python benchmarks/bench_serve_cpu.py [--runs 3] [--modes process thread process-sync]
        [--offline-engine-process] [--num-prompts 256] [--range-ratio 0.5] [--client-concurrency 96]

`--offline-engine-process` adds the offline requests submitted all at once to an AsyncEngine
whose loop runs in an engine process (what LLM would get from one).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
MODES = {"process": [], "thread": ["--disable-frontend-multiprocessing"],
         "process-sync": ["--no-async-scheduling"],
         # fewer, larger streamed chunks: the API server's CPU per token
         "interval-4": ["--stream-interval", "4"], "interval-16": ["--stream-interval", "16"]}


def bench_args(args, num_prompts=None) -> list[str]:
    from loraplex.demo import DEMO_ADAPTER_NAMES
    from loraplex.server.demo_mode import DEMO_SERVED_NAME
    return ["--models", DEMO_SERVED_NAME, *DEMO_ADAPTER_NAMES, "--model-distribution", "round-robin",
            "--num-prompts", str(num_prompts or args.num_prompts), "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--random-range-ratio", str(args.range_ratio),
            "--ignore-eos", "--seed", str(args.seed)]


# ---- offline ------------------------------------------------------------------------------

def offline_worker(spec_path: str) -> None:
    """In a fresh process: LLM.generate over the requests in spec_path; prints JSON."""
    import torch

    from loraplex import LLM, LoRARequest, SamplingParams
    from loraplex.demo import demo_adapters_dir, demo_model_path
    from loraplex.lora_request import lora_id_for_name
    from loraplex.server.bench_serve import build_requests
    from loraplex.server.bench_serve_args import resolve
    from loraplex.server.cli import build_parser

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    requests = build_requests(resolve(build_parser().parse_args(["bench", "serve", *spec["bench_args"]])))
    loras = {}
    for r in requests:
        if r.model in ("loraplex-demo-base",) or r.model in loras:
            continue
        loras[r.model] = LoRARequest(r.model, lora_id_for_name(r.model), str(demo_adapters_dir() / r.model))
    lora_of = [loras.get(r.model) for r in requests]
    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
    warm = list(loras.values()) + [None]
    if spec.get("engine_process"):
        print(json.dumps(offline_through_engine_process(spec, requests, lora_of, params, warm)))
        return
    llm = LLM(str(demo_model_path()), enable_lora=True, max_loras=4, max_num_seqs=spec["concurrency"], device="cpu")
    llm.generate([requests[0].prompt] * len(warm), params[0], lora_request=warm, use_tqdm=False)
    stats0 = llm.llm_engine.get_stats()
    tid = threading.get_native_id()
    sched0 = schedstat(os.getpid(), tid)
    cpu0, start = time.process_time(), time.perf_counter()
    outs = llm.generate([r.prompt for r in requests], params, lora_request=lora_of, use_tqdm=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    sched = [b - a for a, b in zip(sched0, schedstat(os.getpid(), tid))]
    stats = llm.llm_engine.get_stats()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    steps = stats.num_steps - stats0.num_steps
    print(json.dumps({"tokens": tokens, "seconds": seconds, "cpu_s": cpu, "steps": steps,
                      "batch": (stats.num_step_seqs - stats0.num_step_seqs) / steps,
                      **loop_shares(sched, seconds)}))


def offline_through_engine_process(spec, requests, lora_of, params, warm) -> dict:
    """The same requests all submitted at once to an AsyncEngine whose loop runs in an engine
    process: what LLM would get if it used the engine process too."""
    import asyncio

    from loraplex.core.async_engine import AsyncEngine
    from loraplex.core.config import EngineConfig
    from loraplex.demo import demo_model_path

    async def go() -> dict:
        config = EngineConfig(model=str(demo_model_path()), enable_lora=True, max_loras=4, max_num_seqs=spec["concurrency"],
                              device="cpu")
        engine = AsyncEngine.from_config(config, engine_process=True)

        async def one(name, prompt, lora, sampling) -> int:
            async for out in engine.generate(prompt, sampling, name, lora_request=lora):
                final = out
            return len(final.outputs[0].token_ids)

        try:
            await asyncio.gather(*(one(f"w{i}", requests[0].prompt, lora, params[0]) for i, lora in enumerate(warm)))
            cpu0, engine0, start = time.process_time(), cpu_seconds(engine.engine_pid), time.perf_counter()
            counts = await asyncio.gather(*(one(f"r{i}", r.prompt, lora_of[i], params[i])
                                            for i, r in enumerate(requests)))
            seconds = time.perf_counter() - start
            cpu = time.process_time() - cpu0 + cpu_seconds(engine.engine_pid) - engine0
        finally:
            engine.shutdown()
        return {"tokens": sum(counts), "seconds": seconds, "cpu_s": cpu}

    return asyncio.run(go())


def run_offline(args, spec_path: Path, engine_process: bool = False) -> dict:
    if engine_process:
        spec = json.loads(spec_path.read_text())
        spec_path = spec_path.with_name("spec-process.json")
        spec_path.write_text(json.dumps({**spec, "engine_process": True}))
    proc = subprocess.run([sys.executable, __file__, "--offline-worker", str(spec_path)], capture_output=True,
                          text=True, env=child_env(), timeout=1800)
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"tok_s": result["tokens"] / result["seconds"], **result}


# ---- served ---------------------------------------------------------------------------------

def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "LORAPLEX_"))}
    env["OMP_NUM_THREADS"] = "1"          # the CPU path's setting on a shared machine (docs/performance.md)
    return env


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def schedstat(pid: int, tid: int) -> tuple[float, float]:
    """(seconds running, seconds runnable but waiting for a core) of one thread, from /proc."""
    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        run_ns, wait_ns, _ = f.read().split()
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


def loop_shares(sched: list[float], seconds: float) -> dict[str, float]:
    """The step loop's thread over `seconds` of load: running, waiting for a core, idle (the rest)."""
    run, wait = sched
    return {"loop_run": run / seconds, "loop_runq": wait / seconds, "loop_idle": max(0.0, 1 - (run + wait) / seconds)}


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


class Server:
    def __init__(self, args, mode: str, log: Path) -> None:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loraplex.server.cli", "serve", "--demo", "--device", "cpu", "--port",
             str(self.port), "--max-num-seqs", str(args.concurrency), "--log-level", "warning", *MODES[mode]],
            stdout=self.log, stderr=subprocess.STDOUT, env=child_env())
        deadline = time.monotonic() + 300
        while True:
            assert self.proc.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        engine = [p for p in children(self.proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
        self.engine_pid = engine[0] if engine else None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


def run_bench(url: str, argv: list[str], result: Path, concurrency: int, nice: int = 0) -> dict:
    """One `loraplex bench serve` run; adds the CPU seconds the client itself used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "loraplex.server.cli", "bench", "serve", "--base-url", url,
                    "--max-concurrency", str(concurrency), "--result-file", str(result), "--disable-tqdm", *argv],
                   check=True, capture_output=True, env=child_env(), timeout=1800,
                   preexec_fn=(lambda: os.nice(nice)) if nice else None)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {**json.loads(result.read_text()), "client_cpu_s": client_cpu}


def engine_counters(url: str) -> dict[str, float]:
    """The engine's step counters from /metrics (sent by the engine process when it goes idle)."""
    names = {"loraplex_engine_steps_total": "steps", "loraplex_engine_step_seqs_total": "seqs"}
    counters = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            counters[names[name]] = float(value)
    return counters


def run_served(args, server: Server, tmp: Path) -> dict:
    clients = args.client_concurrency or args.concurrency
    run_bench(server.url, bench_args(args, num_prompts=8), tmp / "warm.json", clients)   # adapters loaded
    pids = {"api": server.proc.pid, "engine": server.engine_pid}
    time.sleep(0.3)                       # the engine's idle stats have arrived
    counters0 = engine_counters(server.url)
    before = {k: cpu_seconds(p) for k, p in pids.items() if p}
    # The step loop runs in the engine process's main thread (in the API server's process with
    # --disable-frontend-multiprocessing: then its thread is not told apart, and this is skipped).
    sched0 = schedstat(server.engine_pid, server.engine_pid) if server.engine_pid else None
    out = run_bench(server.url, bench_args(args), tmp / "run.json", clients, nice=args.client_nice)
    used = {k: cpu_seconds(p) - before[k] for k, p in pids.items() if p}
    shares = {}
    if sched0 is not None:
        # Its running and queued time falls within the bench's own duration (it idles before and after).
        shares = loop_shares([b - a for a, b in zip(sched0, schedstat(server.engine_pid, server.engine_pid))],
                             out["duration"])
    time.sleep(0.3)
    counters = engine_counters(server.url)
    steps = counters["steps"] - counters0["steps"]
    assert out["failed"] == 0, out["errors"]
    used["client"] = out["client_cpu_s"]
    per_kilo = {f"{k}_cpu_s_per_1k_tok": v / out["total_output_tokens"] * 1000 for k, v in used.items()}
    return {"tok_s": out["output_throughput"], "ttft_p50_ms": out["median_ttft_ms"],
            "itl_p50_ms": out["median_itl_ms"], "itl_p99_ms": out["p99_itl_ms"], **per_kilo,
            "steps": steps, "batch": (counters["seqs"] - counters0["seqs"]) / steps, **shares}


# ---- main -----------------------------------------------------------------------------------

def spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["process", "thread"], choices=list(MODES))
    parser.add_argument("--offline-engine-process", action="store_true",
                        help="also run the offline requests through an AsyncEngine with an engine process")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--range-ratio", type=float, default=0.0,
                        help="vary prompt and output lengths within +-R (bench serve's --random-range-ratio)")
    parser.add_argument("--client-nice", type=int, default=0,
                        help="run the bench client at this niceness (a diagnosis: how much its CPU competes)")
    parser.add_argument("--client-concurrency", type=int, default=None,
                        help="clients driving the server (default: --concurrency, the engines' max_num_seqs)")
    parser.add_argument("--offline-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.offline_worker:
        offline_worker(args.offline_worker)
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-cpu-"))
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"bench_args": bench_args(args), "concurrency": args.concurrency}))
    results: dict[str, list[dict]] = {"offline": []}
    servers = {mode: Server(args, mode, tmp / f"{mode}.log") for mode in args.modes}
    try:
        for run in range(args.runs):
            offline = ["offline", "offline-process"] if args.offline_engine_process else ["offline"]
            order = [*offline, *args.modes] if run % 2 == 0 else [*reversed(args.modes), *reversed(offline)]
            for name in order:
                load_before = os.getloadavg()[0]
                if name.startswith("offline"):
                    r = run_offline(args, spec, engine_process=name == "offline-process")
                else:
                    r = run_served(args, servers[name], tmp)
                r.update(load_before=load_before, load_after=os.getloadavg()[0])
                results.setdefault(name, []).append(r)
                print(f"run {run + 1} {name}: {json.dumps({k: round(v, 3) for k, v in r.items()})}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    offline = statistics.median(r["tok_s"] for r in results["offline"])
    loads = [r[k] for runs in results.values() for r in runs for k in ("load_before", "load_after")]
    print(f"\n{args.num_prompts} requests, prompt {args.input_len}, output {args.output_len} (range ratio "
          f"{args.range_ratio}), max_num_seqs {args.concurrency}, clients {args.client_concurrency or args.concurrency}; "
          f"{args.runs} runs; load average {min(loads):.1f}-{max(loads):.1f}")
    columns = (("batch", 1, "mean batch"), ("steps", 0, "steps"), ("loop_run", 2, "loop running"),
               ("loop_runq", 2, "loop waits for CPU"), ("loop_idle", 2, "loop idle"),
               ("ttft_p50_ms", 0, "TTFT p50 ms"), ("itl_p99_ms", 0, "ITL p99 ms"),
               ("api_cpu_s_per_1k_tok", 3, "API cpu s/1k tok"), ("engine_cpu_s_per_1k_tok", 3, "engine cpu s/1k"),
               ("client_cpu_s_per_1k_tok", 3, "client cpu s/1k"))
    print(f"{'path':<16} {'tokens/s':>22} {'vs offline':>11}" + "".join(f" {title:>20}" for _, _, title in columns))
    for name, runs in results.items():
        tok = [r["tok_s"] for r in runs]
        cells = [spread(tok), f"{statistics.median(tok) / offline:.2f}"]
        for key, digits, _ in columns:
            cells.append(spread([r[key] for r in runs], digits) if key in runs[0] else "")
        if name.startswith("offline"):       # one process (offline-process: client + engine process)
            cells[10] = spread([r["cpu_s"] / r["tokens"] * 1000 for r in runs], 3)
        print(f"{name:<16} {cells[0]:>22} {cells[1]:>11}" + "".join(f" {c:>20}" for c in cells[2:]))


if __name__ == "__main__":
    main()
