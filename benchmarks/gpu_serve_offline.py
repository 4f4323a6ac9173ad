"""gpu_serve.py's offline section, in its own process: `LLM.generate` over the spec's requests,
its steady decode step against the runner's graph replayed alone; prints one JSON line.

    python3 benchmarks/gpu_serve_offline.py SPEC.json      # gpu_serve.py writes SPEC and runs this

The runner alone: the steady steps' graph replayed back to back, on the last step's inputs
once `generate` returns (the old reference; cheaper than a mid-run step's inputs), 500 times
(clocks under sustained load), with an argmax after each; and 30 times mid-run on the
MID_RUN_REPLAY_AT-th full-batch step's own inputs, against the engine's steps around it (the
fair pair). Also the graph's own time inside the engine (CUDA events around each replay), by
hundred steps; with a torch_profile path, the GPU's timeline over PROFILE_WINDOW's steps
(gpu_timeline.py) and its chrome trace; with a py_spy_output path, py-spy's samples.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

MID_RUN_REPLAY_AT = 300      # the full-batch step whose graph is also replayed back to back
PROFILE_WINDOW = (200, 20)    # torch_profile: steps 205-225 (after 5 of warm-up), the second wave's decodes


def stop_profile(spy: subprocess.Popen | None) -> None:
    """End a profile now: py-spy writes what it sampled when interrupted."""
    if spy is not None and spy.poll() is None:
        spy.send_signal(signal.SIGINT)
    if spy is not None:
        spy.wait(120)


def offline_worker(spec_path: str) -> None:
    """In its own process: LLM.generate over the spec's requests; prints JSON."""
    import torch

    from loraplex import LLM, LoRARequest, SamplingParams
    from loraplex.lora_request import lora_id_for_name
    from loraplex.server.bench_serve import build_requests
    from loraplex.server.bench_serve_args import resolve
    from loraplex.server.cli import build_parser

    spec = json.loads(Path(spec_path).read_text())
    requests = build_requests(resolve(build_parser().parse_args(["bench", "serve", *spec["bench_argv"]])))
    llm = LLM(spec["model"], device=spec["device"], load_format="dummy", enable_lora=True, max_loras=32,
              max_lora_rank=16, max_cpu_loras=64, max_num_seqs=spec["concurrency"])
    loras = {name: LoRARequest(name, lora_id_for_name(name), path) for name, path in spec["adapters"].items()}
    lora_of = [loras.get(r.model) for r in requests]
    params = SamplingParams(temperature=0, max_tokens=requests[0].max_tokens, ignore_eos=True)
    llm.generate([r.prompt for r in requests[:len(loras) + 1]], params, lora_request=lora_of[:len(loras) + 1],
                 use_tqdm=False)                                    # loads the adapters, warms up
    core = llm.llm_engine.core
    starts, decode_batch = [], []
    schedule, step = core.scheduler.schedule, core.step

    def timed_schedule():
        plan = schedule()
        decode_batch.append(len(plan.scheduled) if all(s.num_new_tokens == 1 for s in plan.scheduled) else 0)
        return plan

    prof = None
    if spec.get("torch_profile"):        # a window of steady decode steps (the second wave's)
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler import schedule as profile_schedule
        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                       schedule=profile_schedule(wait=spec["profile_window"][0], warmup=5, active=spec["profile_window"][1],
                                         repeat=1))
        prof.start()

    def timed_step():
        starts.append(time.perf_counter())
        if prof is not None:
            prof.step()
        return step()

    core.scheduler.schedule, core.step = timed_schedule, timed_step
    graphs = core.runner.decode_graphs
    replayed = collections.Counter()                                # (batch bucket, LoRA variant) of each replay
    in_engine = []                                                  # CUDA events around full-batch replays
    mid_run = []                                                    # events of replays on a mid-run step's inputs
    replay = graphs._replay if graphs is not None else None
    if graphs is not None:
        def counted_replay(size, lora_bound, num_seqs):
            replayed[size, lora_bound] += 1
            if num_seqs < spec["concurrency"]:
                return replay(size, lora_bound, num_seqs)
            # The graph's own time inside the engine (CUDA events around it), against the
            # back-to-back replay below: is a slower step the graph's or the work around it?
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record()
            logits = replay(size, lora_bound, num_seqs)
            after.record()
            in_engine.append((before, after))
            if len(in_engine) == MID_RUN_REPLAY_AT:
                # The same graph on this step's own inputs, replayed back to back mid-run (each
                # replay recomputes the step: the same K/V into the same slots, the same logits).
                ends = [torch.cuda.Event(enable_timing=True) for _ in range(31)]
                ends[0].record()
                for end in ends[1:]:
                    graphs.graphs[size, lora_bound][0].replay()
                    end.record()
                mid_run.extend(ends)
            return logits
        graphs._replay = counted_replay
    spy = None
    if spec.get("py_spy_output"):        # this process sampled while it generates, waits included
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(os.getpid()), "--nonblocking", "--rate", "200",
                                "--duration", "600", "--format", "raw", "--threads", "--idle",
                                "--output", spec["py_spy_output"]], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        time.sleep(1)                    # py-spy attached
    start = time.perf_counter()
    outs = llm.generate([r.prompt for r in requests], params, lora_request=lora_of, use_tqdm=False)
    seconds = time.perf_counter() - start
    stop_profile(spy)
    trace = None
    if prof is not None:
        prof.stop()
        import gpu_timeline
        trace = gpu_timeline.summarize(prof.events(), spec["profile_window"][1])
        prof.export_chrome_trace(spec["torch_profile"])
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    steady = [b - a for a, b, n in zip(starts, starts[1:], decode_batch) if n == spec["concurrency"]]
    result = {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "steady_steps": len(steady),
              "step_ms_median": statistics.median(steady) * 1e3 if steady else None}
    if trace is not None:
        result["trace"] = trace
    if replayed:
        # The runner alone on the same batch: the steady steps' graph replayed back to back on
        # the last step's inputs (the same bucket, adapters and about the same context).
        (size, bound), _ = replayed.most_common(1)[0]
        graph, logits = graphs.graphs[size, bound]

        def replays(count: int, between=None) -> list[float]:
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(count + 1)]
            ends[0].record()
            for end in ends[1:]:
                graph.replay()
                if between is not None:
                    between()
                end.record()
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(ends, ends[1:])]
        times = replays(30)
        in_engine_ms = [a.elapsed_time(b) for a, b in in_engine]
        sustained = replays(500)           # as long as the engine's steady steps: clocks under sustained load
        result.update(replay_batch=size, replay_lora_bound=bound, replay_ms_median=statistics.median(times),
                      graph_in_engine_ms_median=statistics.median(in_engine_ms) if in_engine_ms else None,
                      graph_in_engine_ms_by_hundred=[round(statistics.median(in_engine_ms[i:i + 100]), 3)
                                                     for i in range(0, len(in_engine_ms), 100)],
                      replay_sustained_ms_by_hundred=[round(statistics.median(sustained[i:i + 100]), 3)
                                                      for i in range(0, len(sustained), 100)],
                      replay_with_argmax_ms_median=statistics.median(replays(30, lambda: logits.argmax(dim=-1))),
                      replay_mid_run_ms_median=statistics.median(a.elapsed_time(b) for a, b in zip(mid_run, mid_run[1:]))
                      if mid_run else None,
                      graph_in_engine_ms_around_mid_run=statistics.median(in_engine_ms[MID_RUN_REPLAY_AT - 20:
                                                                                        MID_RUN_REPLAY_AT + 20])
                      if len(in_engine_ms) > MID_RUN_REPLAY_AT + 20 else None,
                      # The engine's step (start to start) over the same steps: against the replay on
                      # their inputs, the target's comparison (the last step's inputs are cheaper).
                      step_ms_around_mid_run=statistics.median(steady[MID_RUN_REPLAY_AT - 20:MID_RUN_REPLAY_AT + 20])
                      * 1e3 if len(steady) > MID_RUN_REPLAY_AT + 20 else None)
    print(json.dumps(result))


if __name__ == "__main__":
    offline_worker(sys.argv[1])
