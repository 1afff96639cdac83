"""How fast is `coserve bench`'s load generator, and how exact?

Starts the stream test server (`coserve.bench.stream_server`) in other processes, streaming
each completion at a known rate (first token after --ttft-ms, then one chunk every
--itl-ms), drives it with `run_load` from this one process, and prints what it measured
against what the server was told to do: tokens/s, and the measured-minus-configured skew of
TPOT and ITL at p50 and p99 (and TTFT, for information). The generator passes when it keeps
up with the server (tok/s near the ideal) with |skew| under 0.5 ms.

    python3 benchmarks/loadgen_throughput.py                       # C=512, 10 ms ITL: ~51k tok/s
    python3 benchmarks/loadgen_throughput.py --concurrency 256,512,768 --server-workers 4

With --rate R[,R...] it drives an open loop instead (requests sent at R per second on the
--arrival schedule, at most --concurrency in flight) and prints the offered and achieved
rate, how late requests left against their schedule (p50/p99), and the same skews:

    python3 benchmarks/loadgen_throughput.py --rate 2000 --arrival constant --output-len 4 \
        --concurrency 4096

Figures and the machines they came from are in docs/bench.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coserve.bench import stream_server  # noqa: E402
from coserve.bench.config import LoadConfig  # noqa: E402
from coserve.bench.loadgen import loop_factory, run_load, run_sync  # noqa: E402


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its reaped children (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


def _server_cpu_s(srv) -> float:
    return sum(_proc_cpu_s(p) for p in _server_pids(srv))


def _server_pids(srv) -> list[int]:
    pids = [srv.proc.pid]
    try:  # forked workers (--server-workers)
        with open(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return pids


_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def _pin(srv) -> None:
    """This process on the last CPU, the server's processes on the others."""
    cpus = _CPUS
    if len(cpus) < 2:
        return
    os.sched_setaffinity(0, {cpus[-1]})
    for pid in _server_pids(srv):
        os.sched_setaffinity(pid, set(cpus[:-1]))


def _steal_s() -> float:
    """CPU time the hypervisor took from this VM, all CPUs together (Linux /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _skew(measured: float | None, configured: float) -> float:
    return float("nan") if measured is None else round(measured - configured, 4)


def _server_lateness(stats_dir: str) -> tuple[float, float]:
    """p50 and p99 of how late the server's chunks left (ms), all its processes together."""
    hist = None
    for name in os.listdir(stats_dir):
        with open(os.path.join(stats_dir, name)) as f:
            h = json.load(f)["chunk_lateness_hist_10us"]
        hist = h if hist is None else [a + b for a, b in zip(hist, h, strict=True)]
    if not hist or not sum(hist):
        return float("nan"), float("nan")
    total, out, acc = sum(hist), [], 0
    targets = [0.5 * total, 0.99 * total]
    for i, n in enumerate(hist):
        acc += n
        while targets and acc >= targets[0]:
            out.append((i + 1) * 0.01)  # upper edge of the 10 us bin, ms
            targets.pop(0)
    return out[0], out[1]


class _BareStream(asyncio.Protocol):
    """The reference client: one keep-alive connection, one streamed request after the
    other, chunks timed in data_received, minimal HTTP/1.1 (chunked) parsing by hand. What
    the machine and the server allow a client to see, with no aiohttp and no accounting."""

    def __init__(self, body: bytes, t_window: tuple[float, float], gaps: list):
        self.req = (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.ws, self.we = t_window
        self.gaps = gaps
        self.tokens = 0

    def connection_made(self, transport):
        self.tr = transport
        self._start()

    def _start(self):
        self.buf, self.head, self.last = b"", False, None
        self.tr.write(self.req)

    def data_received(self, data):
        t = time.perf_counter()
        self.buf += data
        if not self.head:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            self.buf, self.head = self.buf[i + 4 :], True
        while True:
            i = self.buf.find(b"\r\n")
            if i < 0:
                return
            n = int(self.buf[:i], 16)
            if len(self.buf) < i + 4 + n:
                return
            chunk, self.buf = self.buf[i + 2 : i + 2 + n], self.buf[i + 4 + n :]
            if n == 0:
                self._start()
                return
            if b'"choices":[{' in chunk:
                if self.ws <= t < self.we:
                    self.tokens += 1
                    if self.last is not None:
                        self.gaps.append(t - self.last)
                self.last = t


def run_reference(args, c: int) -> dict:
    """The same load through the bare reference client (see _BareStream)."""
    import numpy as np

    body = json.dumps(
        {
            "model": "m",
            "prompt": list(range(10, 40)),
            "max_tokens": args.output_len,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
    ).encode()
    gaps: list[float] = []
    conns: list[_BareStream] = []
    with stream_server.spawn(
        ttft_ms=args.ttft_ms, itl_ms=args.itl_ms, precise=args.precise, workers=args.server_workers
    ) as srv:

        async def go():
            loop = asyncio.get_running_loop()
            t0 = time.perf_counter()
            ramp = args.ramp if args.ramp is not None else min(1.0, args.warmup / 4)
            window = (t0 + args.warmup, t0 + args.warmup + args.duration)
            for w in range(c):
                await asyncio.sleep(max(0.0, t0 + ramp * w / c - time.perf_counter()))
                _, proto = await loop.create_connection(
                    lambda: _BareStream(body, window, gaps), "127.0.0.1", srv.port
                )
                conns.append(proto)
            await asyncio.sleep(max(0.0, window[1] - time.perf_counter()))
            for p in conns:
                p.tr.close()

        run_sync(go(), args.loop)
    g = np.asarray(gaps) * 1e3
    return {
        "concurrency": c,
        "client": "bare reference",
        "tok_s": round(sum(p.tokens for p in conns) / args.duration, 1),
        "itl_p50_skew_ms": round(float(np.percentile(g, 50)) - args.itl_ms, 4),
        "itl_p99_skew_ms": round(float(np.percentile(g, 99)) - args.itl_ms, 4),
    }


def run_one(args, c: int) -> dict:
    stats_dir = tempfile.mkdtemp(prefix="coserve-stream-stats-")
    with stream_server.spawn(
        ttft_ms=args.ttft_ms,
        itl_ms=args.itl_ms,
        precise=args.precise,
        workers=args.server_workers,
        stats_dir=stats_dir,
    ) as srv:
        cfg = LoadConfig(
            gen_url=srv.url,
            gen_concurrency=c,
            output_len=args.output_len,
            input_len=30,
            warmup_s=args.warmup,
            duration_s=args.duration,
            ramp_s=args.ramp,
        )
        if args.pin:
            _pin(srv)
        s0 = _server_cpu_s(srv)
        st0 = _steal_s()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        w0 = time.perf_counter()
        result = run_sync(run_load(cfg), args.loop)
        wall = time.perf_counter() - w0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        s1 = _server_cpu_s(srv)
        st1 = _steal_s()
    late50, late99 = _server_lateness(stats_dir)
    shutil.rmtree(stats_dir, ignore_errors=True)
    g = result.summary()["gen"]
    n = args.output_len
    cycle_ms = args.ttft_ms + (n - 1) * args.itl_ms
    ideal = c * n / cycle_ms * 1e3
    client_cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    tokens_total = g["totals"]["output_tokens"]
    return {
        "concurrency": c,
        "ideal_tok_s": round(ideal, 1),
        "tok_s": g["output_tokens_per_s"],
        "of_ideal": round(g["output_tokens_per_s"] / ideal, 4),
        "tpot_p50_skew_ms": _skew(g["tpot_ms"]["p50"], args.itl_ms),
        "tpot_p99_skew_ms": _skew(g["tpot_ms"]["p99"], args.itl_ms),
        "itl_p50_skew_ms": _skew(g["itl_ms"]["p50"], args.itl_ms),
        "itl_p99_skew_ms": _skew(g["itl_ms"]["p99"], args.itl_ms),
        "ttft_p50_skew_ms": _skew(g["ttft_ms"]["p50"], args.ttft_ms),
        "ttft_p99_skew_ms": _skew(g["ttft_ms"]["p99"], args.ttft_ms),
        "client_cpu_per_s": round(client_cpu / wall, 3),
        "client_sys_share": round((r1.ru_stime - r0.ru_stime) / max(client_cpu, 1e-9), 3),
        "client_us_per_token": round(client_cpu / max(tokens_total, 1) * 1e6, 2),
        "server_cpu_per_s": round((s1 - s0) / wall, 3),
        "steal_cpu_per_s": round((st1 - st0) / wall, 3),
        "server_late_p50_ms": late50,
        "server_late_p99_ms": late99,
        "completed": g["completed"],
        "failed": g["failed"],
    }


_RATE_COLS = [
    "offered_rps",
    "achieved_rps",
    "of_offered",
    "kept_up",
    "send_late_p50_ms",
    "send_late_p99_ms",
    "tok_s",
    "ideal_tok_s",
    "ttft_p50_skew_ms",
    "tpot_p50_skew_ms",
    "client_cpu_per_s",
    "completed",
    "failed",
]


def run_rate(args, rate: float) -> dict:
    """One open-loop run at `rate` requests/s (see the module docstring)."""
    with stream_server.spawn(
        ttft_ms=args.ttft_ms, itl_ms=args.itl_ms, precise=args.precise, workers=args.server_workers
    ) as srv:
        cfg = LoadConfig(
            gen_url=srv.url,
            gen_rate=rate,
            arrival=args.arrival,
            gen_concurrency=int(args.concurrency.split(",")[0]),
            output_len=args.output_len,
            input_len=30,
            warmup_s=args.warmup,
            duration_s=args.duration,
        )
        if args.pin:
            _pin(srv)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        w0 = time.perf_counter()
        result = run_sync(run_load(cfg), args.loop)
        wall = time.perf_counter() - w0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    g = result.summary()["gen"]
    late = g["send_late_ms"]
    client_cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {
        "offered_rps": rate,
        "achieved_rps": g["achieved_rate_rps"],
        "of_offered": round(g["achieved_rate_rps"] / rate, 4),
        "kept_up": g["kept_up"],
        "send_late_p50_ms": late["p50"],
        "send_late_p99_ms": late["p99"],
        "tok_s": g["output_tokens_per_s"],
        "ideal_tok_s": round(rate * args.output_len, 1),
        "ttft_p50_skew_ms": _skew(g["ttft_ms"]["p50"], args.ttft_ms),
        "tpot_p50_skew_ms": _skew(g["tpot_ms"]["p50"], args.itl_ms),
        "client_cpu_per_s": round(client_cpu / wall, 3),
        "completed": g["completed"],
        "failed": g["failed"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--concurrency",
        default="512",
        help="one or more, comma-separated (with --rate: the cap in flight)",
    )
    p.add_argument(
        "--rate", default=None, help="open loop: requests/s, one or more, comma-separated"
    )
    p.add_argument(
        "--arrival",
        choices=("poisson", "constant"),
        default="constant",
        help="with --rate: the arrival schedule",
    )
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--itl-ms", type=float, default=10.0)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument(
        "--ramp",
        type=float,
        default=None,
        help="seconds over which the first requests are spread (default: the "
        "generator's own, min(1 s, warm-up / 4)); 0 = all at once",
    )
    p.add_argument(
        "--server-workers",
        type=int,
        default=1,
        help="stream server processes (SO_REUSEPORT); one core writes ~50k "
        "chunks/s at best, so give it more where the machine has cores",
    )
    p.add_argument(
        "--no-precise",
        dest="precise",
        action="store_false",
        help="let the server's timers sleep (up to 1 ms late) instead of spinning",
    )
    p.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="the generator's event loop (auto: uvloop when installed)",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="pin the generator to the last CPU and the server to the others",
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help="also run each concurrency through a bare asyncio client (no aiohttp, "
        "no accounting): what this machine and server allow any client",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per run")
    args = p.parse_args(argv)

    print(
        f"# {platform.node()}: {os.cpu_count()} CPUs ({_cpu_model()}), "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}, generator loop: "
        f"{loop_factory(args.loop).__module__.split('.')[0]}",
        flush=True,
    )
    print(
        f"# server: ttft {args.ttft_ms} ms, itl {args.itl_ms} ms, {args.output_len} tokens, "
        f"{args.server_workers} worker(s){', precise' if args.precise else ''}; "
        f"window {args.warmup}+{args.duration} s",
        flush=True,
    )
    if args.rate:
        cols = _RATE_COLS
        if not args.json:
            print("| " + " | ".join(cols) + " |")
            print("|" + "---|" * len(cols))
        for rate in (float(x) for x in args.rate.split(",")):
            row = run_rate(args, rate)
            print(
                json.dumps(row)
                if args.json
                else "| " + " | ".join(str(row[k]) for k in cols) + " |",
                flush=True,
            )
        return 0
    cols = [
        "concurrency",
        "ideal_tok_s",
        "tok_s",
        "of_ideal",
        "tpot_p50_skew_ms",
        "tpot_p99_skew_ms",
        "itl_p50_skew_ms",
        "itl_p99_skew_ms",
        "ttft_p50_skew_ms",
        "client_cpu_per_s",
        "client_sys_share",
        "client_us_per_token",
        "server_cpu_per_s",
        "server_late_p50_ms",
        "server_late_p99_ms",
        "steal_cpu_per_s",
    ]
    if not args.json:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
    for c in (int(x) for x in args.concurrency.split(",")):
        row = run_one(args, c)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print("| " + " | ".join(str(row[k]) for k in cols) + " |", flush=True)
        if args.reference:
            ref = run_reference(args, c)
            if args.json:
                print(json.dumps(ref), flush=True)
            else:
                print(
                    f"|   bare reference client, C={c}: {ref['tok_s']} tok/s, ITL skew p50 "
                    f"{ref['itl_p50_skew_ms']} ms, p99 {ref['itl_p99_skew_ms']} ms",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
