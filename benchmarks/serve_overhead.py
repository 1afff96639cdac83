"""What the HTTP front costs the engine: one engine offline (stepped in this process) and the
same engine behind the server (+ `coserve bench`), at several concurrencies; prints tok/s
(gen) or seq/s (embed) of each and the served/offline ratio.

    PYTHONPATH=. python3 benchmarks/serve_overhead.py --kind gen --model synthetic --step-ms 20
    PYTHONPATH=. python3 benchmarks/serve_overhead.py --kind gen --model tiny-moe --step-ms 0 \
        --concurrency 16,64
    PYTHONPATH=. python3 benchmarks/serve_overhead.py --kind embed --model all-minilm-l6-v2 \\
        --step-ms 20 --concurrency 16,64

--step-ms S paces the engine: a step that took less than S ms sleeps the rest, with the GIL
free, as a step waiting on a GPU is. The engine's own Python per step stays real, so what
the HTTP side takes from it shows, while the pace stands in for a GPU's on a CPU machine
(0: the engine as fast as this CPU runs it). The served engine is built in the server's
engine process by the same code; the server is the real front (coserve.server.app.serve).
Writes serve_overhead.json under --out-dir ($OUT or .)."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coserve.engine.types import EmbedOutput, EngineArgs, RequestOutput, SamplingParams  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class SyntheticEngine:
    """Model `synthetic`: no model at all, so a CPU can run a GPU's pace. gen: each step emits
    one token for each of up to `max_num_seqs` running requests; embed: each step finishes
    every queued request, one `dim`-float32 row per input (as the real engine does)."""

    def __init__(self, kind: str, max_num_seqs: int, max_model_len: int, dim: int = 4096):
        from coserve.engine.tokenizer import ByteTokenizer

        self.kind = kind
        self.model_name = "synthetic"
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.tokenizer = ByteTokenizer()
        self.dim = dim
        rng = np.random.default_rng(0)
        self._vector = rng.uniform(-0.03, 0.03, dim).astype(np.float32)
        self._reqs: dict = {}
        self._steps = 0

    def add_request(self, request_id, inputs, params=None):
        self._reqs[request_id] = [inputs, params, 0]

    def abort(self, request_id):
        self._reqs.pop(request_id, None)

    def has_unfinished(self):
        return bool(self._reqs)

    def step(self):
        self._steps += 1
        if self.kind == "embed":
            outs = [
                EmbedOutput(rid, np.tile(self._vector, (len(inputs), 1)), sum(map(len, inputs)))
                for rid, (inputs, _, _) in self._reqs.items()
            ]
            self._reqs.clear()
            return outs
        outs = []
        for rid, req in list(self._reqs.items())[: self.max_num_seqs]:
            req[2] += 1
            done = req[2] >= req[1].max_tokens
            if done:
                del self._reqs[rid]
            outs.append(
                RequestOutput(
                    rid,
                    [(self._steps % 200) + 32],
                    done,
                    "length" if done else None,
                    len(req[0]),
                    req[2],
                )
            )
        return outs

    def stats(self):
        return {
            "num_running": min(len(self._reqs), self.max_num_seqs),
            "num_waiting": 0,
            "kv_cache_usage": 0.0,
            "num_preemptions": 0,
            "prompt_tokens_total": 0,
            "generation_tokens_total": 0,
            "kv_capacity_tokens": self.max_num_seqs * self.max_model_len,
        }


class PacedEngine:
    """An engine whose steps take at least `step_ms` (see the module note)."""

    def __init__(
        self,
        kind: str,
        model: str,
        step_ms: float,
        max_num_seqs: int,
        max_model_len: int,
        python_ms: float = 0.0,
    ):
        args = EngineArgs(
            model=model,
            random_weights=model != "all-minilm-l6-v2",
            device="cpu",
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
        )
        if model == "synthetic":
            self._engine = SyntheticEngine(kind, max_num_seqs, max_model_len)
        elif kind == "gen":
            from coserve.engine.gen_engine import GenEngine

            self._engine = GenEngine(args)
        else:
            from coserve.engine.embed_engine import EmbedEngine

            self._engine = EmbedEngine(args)
        self._step_s = step_ms / 1e3
        self._python_s = python_ms / 1e3

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def step(self):
        t0 = time.perf_counter()
        outs = self._engine.step()
        busy_until = t0 + self._python_s
        while time.perf_counter() < busy_until:  # the GIL held, as by an engine's own Python
            pass
        left = self._step_s - (time.perf_counter() - t0)
        if left > 0:
            time.sleep(left)
        return outs


# ----------------------------------------------------------------------------- offline
def offline(engine, a, concurrency: int) -> float:
    """Closed loop of `concurrency` requests in the engine; tok/s (gen) or seq/s (embed)
    counted by arrival inside the window."""
    rng = random.Random(0)
    live = 0
    n = 0
    params = SamplingParams(max_tokens=a.output_len, temperature=0.0, ignore_eos=True)

    def submit() -> None:
        nonlocal n, live
        n += 1
        if a.kind == "gen":
            engine.add_request(
                f"r{n}", [rng.randrange(10, 256) for _ in range(a.input_len)], params
            )
        else:
            engine.add_request(
                f"r{n}",
                [
                    [rng.randrange(10, 256) for _ in range(a.input_len)]
                    for _ in range(a.embed_batch)
                ],
            )
        live += 1

    t0 = time.perf_counter()
    start, end = t0 + a.warmup, t0 + a.warmup + a.duration
    count = 0
    while True:
        while live < concurrency:
            submit()
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            done = getattr(o, "finished", True)
            if start <= now < end:
                count += len(o.new_token_ids) if a.kind == "gen" else len(o.embeddings)
            if done:
                live -= 1
        if now >= end:
            break
    for i in range(1, n + 1):
        engine.abort(f"r{i}")
    return count / a.duration


# ----------------------------------------------------------------------------- served
def serve_child(cfg: dict) -> None:
    """The server process: the real front over a PacedEngine in its engine process."""
    from coserve.server.app import ServeOptions, serve
    from coserve.server.engine_client import start_engine

    factory = functools.partial(
        PacedEngine,
        cfg["kind"],
        cfg["model"],
        cfg["step_ms"],
        cfg["max_num_seqs"],
        cfg["max_model_len"],
        cfg["python_ms"],
    )
    engine = start_engine(factory, "WARNING")
    opts = ServeOptions(kind=cfg["kind"], served_names=[cfg["model"]], port=cfg["port"])
    sys.exit(asyncio.run(serve(engine, opts)))


def served(a, concurrency: int, out_dir: Path) -> float:
    from coserve.launch import free_port

    port = free_port()
    cfg = {
        "kind": a.kind,
        "model": a.model,
        "step_ms": a.step_ms,
        "max_num_seqs": a.max_num_seqs,
        "max_model_len": a.max_model_len,
        "python_ms": a.python_ms,
        "port": port,
    }
    log_path = out_dir / f"serve_{a.kind}_c{concurrency}.log"
    with open(log_path, "w") as lf:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-child", json.dumps(cfg)],
            stdout=subprocess.PIPE,
            stderr=lf,
            text=True,
            start_new_session=True,
        )
    try:
        for line in proc.stdout:
            if " ready at " in line:
                break
        else:
            raise RuntimeError(f"server exited ({proc.wait()}):\n{log_path.read_text()[-3000:]}")
        out_json = out_dir / f"bench_{a.kind}_c{concurrency}.json"
        load = (
            [
                "--gen-concurrency",
                str(concurrency),
                "--input-len",
                str(a.input_len),
                "--output-len",
                str(a.output_len),
            ]
            if a.kind == "gen"
            else [
                "--embed-concurrency",
                str(concurrency),
                "--embed-batch",
                str(a.embed_batch),
                "--embed-input-len",
                str(a.input_len),
            ]
        )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "coserve",
                "bench",
                f"--{a.kind}-url",
                f"http://127.0.0.1:{port}",
                *load,
                "--warmup",
                str(a.warmup),
                "--duration",
                str(a.duration),
                "--out",
                str(out_json),
                "--quiet",
            ],
            check=True,
            timeout=a.warmup + a.duration + 120,
        )
        res = json.loads(out_json.read_text())[a.kind]
        if res["failed"]:
            log(f"warning: {res['failed']} request(s) failed")
        return res["output_tokens_per_s"] if a.kind == "gen" else res["sequences_per_s"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--kind", choices=["gen", "embed"], default="gen")
    ap.add_argument(
        "--model", default="synthetic", help="synthetic (no model; see SyntheticEngine) or a preset"
    )
    ap.add_argument("--concurrency", default="64,128,256", help="comma list")
    ap.add_argument(
        "--step-ms", type=float, default=20.0, help="least time per engine step (0: unpaced)"
    )
    ap.add_argument(
        "--python-ms",
        type=float,
        default=0.0,
        help="of each step, this much is spent in Python holding the GIL",
    )
    ap.add_argument(
        "--input-len", type=int, default=30, help="prompt (gen) or per-input (embed) tokens"
    )
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--embed-batch", type=int, default=8)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    ap.add_argument("--serve-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve_child is not None:
        serve_child(json.loads(a.serve_child))
        return
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    levels = [int(c) for c in a.concurrency.split(",")]
    unit = "tok/s" if a.kind == "gen" else "seq/s"
    log(f"building {a.model} (paced at {a.step_ms} ms/step)")
    engine = PacedEngine(a.kind, a.model, a.step_ms, a.max_num_seqs, a.max_model_len, a.python_ms)
    rows = []
    for c in levels:
        off = offline(engine, a, c)
        log(f"C={c} offline: {off:,.0f} {unit}")
        on = served(a, c, out_dir)
        log(f"C={c} served: {on:,.0f} {unit} ({on / off:.3f} of offline)")
        rows.append({"concurrency": c, "offline": off, "served": on, "ratio": on / off})
    result = {
        "kind": a.kind,
        "model": a.model,
        "step_ms": a.step_ms,
        "python_ms": a.python_ms,
        "unit": unit,
        "input_len": a.input_len,
        "output_len": a.output_len,
        "embed_batch": a.embed_batch,
        "warmup_s": a.warmup,
        "duration_s": a.duration,
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "argv": sys.argv,
        "rows": rows,
    }
    (out_dir / "serve_overhead.json").write_text(json.dumps(result, indent=1))
    print(f"\n{a.kind} {a.model}, step >= {a.step_ms} ms, {a.python_ms} ms of it in Python")
    print(f"{'C':>5} {'offline ' + unit:>16} {'served ' + unit:>16} {'served/offline':>15}")
    for r in rows:
        print(
            f"{r['concurrency']:>5} {r['offline']:>16,.0f} {r['served']:>16,.0f} "
            f"{r['ratio']:>15.3f}"
        )


if __name__ == "__main__":
    main()
