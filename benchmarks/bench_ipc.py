"""Which transport carries the engine process's messages: a measurement.

The engine process sends one message per step (the sampled tokens of every running
sequence) and receives requests, aborts and calls. Three candidates, each between two
processes on this machine:

    pipe+pickle     multiprocessing.Pipe, send_bytes/recv_bytes of pickle protocol 5
    zmq+pickle      pyzmq PUSH/PULL over ipc://, pickle protocol 5
    zmq+msgspec     pyzmq PUSH/PULL over ipc://, msgspec msgpack of typed Structs

For each: the round trip of a small message (median of N ping-pongs), and the
throughput of step messages of B sequence outputs (one token each), with the
receiver's CPU time per message (what the API server process pays to decode).

    .venv/bin/python benchmarks/bench_ipc.py [--batch 64] [--messages 20000] [--round-trips 5000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import statistics
import tempfile
import time

import msgspec
import zmq


class SeqOut(msgspec.Struct, array_like=True):
    request_id: str
    index: int
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class StepMsg(msgspec.Struct, array_like=True):
    outputs: list[SeqOut]


def step_message(batch: int) -> StepMsg:
    return StepMsg([SeqOut(f"cmpl-{'0' * 32}-{i}", 0, [1000 + i]) for i in range(batch)])


def tuple_message(batch: int) -> list:
    # The pickle variants send plain tuples (pickling Structs would measure msgspec's pickle support).
    return [(f"cmpl-{'0' * 32}-{i}", 0, [1000 + i], None, None) for i in range(batch)]


# ---- endpoints --------------------------------------------------------------------------

class Endpoint:
    def __init__(self, kind: str, role: str, address):
        self.kind = kind
        if kind == "pipe":
            self.conn = address[0 if role == "a" else 1]
        else:
            self.ctx = zmq.Context()
            self.out = self.ctx.socket(zmq.PUSH)
            self.inp = self.ctx.socket(zmq.PULL)
            a_to_b, b_to_a = address
            if role == "a":
                self.out.bind(a_to_b)
                self.inp.bind(b_to_a)
            else:
                self.out.connect(b_to_a)
                self.inp.connect(a_to_b)
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(StepMsg)

    def send(self, obj, structured: bool) -> None:
        data = self.encoder.encode(obj) if structured else pickle.dumps(obj, protocol=5)
        if self.kind == "pipe":
            self.conn.send_bytes(data)
        else:
            self.out.send(data, copy=False)

    def recv(self, structured: bool):
        data = self.conn.recv_bytes() if self.kind == "pipe" else self.inp.recv(copy=False).buffer
        return self.decoder.decode(data) if structured else pickle.loads(data)


def _peer(kind: str, address, structured: bool, batch: int, num_messages: int, round_trips: int) -> None:
    ep = Endpoint(kind, "b", address)
    # Round trips: echo.
    for _ in range(round_trips):
        ep.send(ep.recv(structured), structured)
    # Throughput: send num_messages step messages as fast as possible.
    msg = step_message(batch) if structured else tuple_message(batch)
    ep.recv(structured)                      # go
    for _ in range(num_messages):
        ep.send(msg, structured)


def measure(kind: str, structured: bool, batch: int, num_messages: int, round_trips: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="ipc-")
    ctx = mp.get_context("spawn")
    if kind == "pipe":
        a, b = ctx.Pipe(duplex=True)
        address = (a, b)
    else:
        address = (f"ipc://{tmp}/a2b", f"ipc://{tmp}/b2a")
    peer = ctx.Process(target=_peer, args=(kind, address, structured, batch, num_messages, round_trips))
    peer.start()
    ep = Endpoint(kind, "a", address)
    small = StepMsg([]) if structured else []
    rtts = []
    for _ in range(round_trips):
        t0 = time.perf_counter()
        ep.send(small, structured)
        ep.recv(structured)
        rtts.append(time.perf_counter() - t0)
    ep.send(small, structured)               # go
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(num_messages):
        ep.recv(structured)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    peer.join()
    return {"transport": f"{kind}+{'msgspec' if structured else 'pickle'}",
            "rtt_us_p50": statistics.median(rtts) * 1e6,
            "msgs_per_s": num_messages / wall,
            "recv_cpu_us_per_msg": cpu / num_messages * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--round-trips", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"pid {os.getpid()}, batch {args.batch}, {args.messages} step messages, {args.round_trips} round trips")
    rows: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for kind, structured in (("pipe", False), ("zmq", False), ("zmq", True)):
            r = measure(kind, structured, args.batch, args.messages, args.round_trips)
            rows.setdefault(r["transport"], []).append(r)
    print(f"{'transport':<14} {'rtt p50 us':>22} {'step msgs/s':>26} {'recv cpu us/msg':>22}")
    for name, runs in rows.items():
        def cell(key, fmt):
            values = sorted(r[key] for r in runs)
            return f"{statistics.median(values):{fmt}} ({values[0]:{fmt}}-{values[-1]:{fmt}})"
        print(f"{name:<14} {cell('rtt_us_p50', '.0f'):>22} {cell('msgs_per_s', '.0f'):>26} "
              f"{cell('recv_cpu_us_per_msg', '.1f'):>22}")


if __name__ == "__main__":
    main()
