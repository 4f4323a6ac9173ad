"""The GPU's timeline over a window of engine steps, from torch.profiler: what the GPU ran per
step, and when it ran nothing.

Used by gpu_serve.py --torch-profile (the offline engine's steady decode steps): a step that
takes longer than its graph's replay does so either with work outside the graph (kernels and
copies listed here with their count per step) or with the GPU idle between them (gaps, each
with the work on either side). CUDA-graph kernels are traced one by one, as launched eagerly.
"""

from __future__ import annotations

import collections

from torch.autograd import DeviceType


def summarize(events, steps: int, top: int = 25) -> dict:
    """`events`: a finished profile's events(); `steps`: how many engine steps it covers."""
    gpu = sorted((e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type == DeviceType.CUDA)
    if not gpu:
        return {"steps": steps, "gpu_events": 0}
    busy, gaps = 0.0, []
    first, cur_end, last_name = gpu[0][0], gpu[0][0], gpu[0][2]
    for start, end, name in gpu:
        if start >= cur_end:
            if start > cur_end:
                gaps.append((start - cur_end, last_name, name))
            busy += end - start
            cur_end, last_name = end, name
        elif end > cur_end:
            busy += end - cur_end
            cur_end, last_name = end, name
    span = cur_end - first
    kernels = collections.defaultdict(lambda: [0, 0.0])
    for start, end, name in gpu:
        kernels[name][0] += 1
        kernels[name][1] += end - start
    host = collections.defaultdict(lambda: [0, 0.0])          # CUDA runtime calls: launches, copies, waits
    for e in events:
        if e.device_type == DeviceType.CPU and e.name.startswith("cuda"):
            host[e.name][0] += 1
            host[e.name][1] += e.time_range.end - e.time_range.start
    gaps.sort(reverse=True)
    return {
        "steps": steps,
        "span_us_per_step": span / steps,
        "gpu_busy_us_per_step": busy / steps,
        "gpu_idle_us_per_step": (span - busy) / steps,
        "gaps_over_5us_per_step": sum(1 for g in gaps if g[0] > 5) / steps,
        "largest_gaps": [{"us": round(g, 1), "after": a[:80], "before": b[:80]} for g, a, b in gaps[:12]],
        "kernels": [{"name": name[:100], "per_step": round(n / steps, 2), "us_per_step": round(t / steps, 1)}
                    for name, (n, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]],
        "runtime_calls": [{"name": name, "per_step": round(n / steps, 2), "us_per_step": round(t / steps, 1)}
                          for name, (n, t) in sorted(host.items(), key=lambda kv: -kv[1][1])[:12]],
    }
