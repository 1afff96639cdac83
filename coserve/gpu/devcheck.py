"""On-GPU check of the sharing machinery: `python -m coserve.gpu.devcheck [--out DIR]`.

Starts coserve's own MPS daemon (private pipe/log dirs), checks `get_server_list`, runs two
CUDA clients through it (gen-like and embed-like matmul loops, embed at 50 % active threads)
while sampling NVML + GPM for ~5 s, checks `get_client_list`, runs a third client with a
timeslice environment beside it (must not join the daemon), a client with a pinned-memory
limit, the SIGTERM path (a child process holding the strategy is sent SIGTERM), and stops
everything, then checks that no MPS process is left. Also prints the MIG plan / error for GPU 0.
Prints one line per check, each PASS, FAIL or NOT RUN (a check whose precondition this machine
lacks: MIG off, a driver without client priority), a summary that counts the three apart, and
exits non-zero if a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from coserve.gpu.devcheck_clients import CLIENT, PINNED, spawn, start_holder

Status = Literal["pass", "fail", "not run"]


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    detail: str = ""


results: list[CheckResult] = []


def _record(name: str, status: Status, detail: str) -> None:
    results.append(CheckResult(name, status, detail))
    print(f"[{status.upper()}] {name}" + (f": {detail}" if detail else ""), flush=True)


def check(name: str, ok: bool, detail: str = "") -> bool:
    """A check that ran: pass or fail."""
    _record(name, "pass" if ok else "fail", detail)
    return ok


def not_run(name: str, why: str) -> None:
    """A check this machine cannot run (says why); never counted as a pass."""
    _record(name, "not run", why)


def summary_line(checks: list[CheckResult]) -> str:
    """'P passed, F failed, N not run (of T checks)'."""
    n = {s: sum(c.status == s for c in checks) for s in ("pass", "fail", "not run")}
    return (
        f"{n['pass']} passed, {n['fail']} failed, {n['not run']} not run (of {len(checks)} checks)"
    )


def priority_step(supported: bool | None) -> None:
    """Client priority is exercised (set on the embed client) only where libcuda knows it."""
    name = "client priority known to libcuda"
    if supported:
        check(
            name,
            True,
            "CUDA_MPS_CLIENT_PRIORITY found in libcuda; the embed client runs below normal",
        )
    elif supported is None:
        not_run(name, "libcuda not found: client priority not exercised")
    else:
        not_run(
            name,
            "this driver's libcuda does not know CUDA_MPS_CLIENT_PRIORITY: client priority not "
            "exercised",
        )


def mig_step(nvml=None) -> None:
    """Find the study's MIG instances on GPU 0; with MIG off (or instances missing) that check does
    not run, and what is checked instead is that the error names the plan and the fix."""
    from coserve.gpu import mig

    name = "MIG instances for gen + embed found on GPU 0"
    try:
        plan, assigned, _ = mig.resolve("0", "auto", ["gen", "embed"], apply=False, nvml=nvml)
    except mig.MigError as e:
        print("MIG error:\n" + textwrap.indent(str(e), "  "), flush=True)
        not_run(name, str(e).splitlines()[0])
        check("MIG error names the plan", "plan" in str(e).lower())
        return
    check(name, set(assigned) == {"gen", "embed"}, f"{plan.profiles} -> {assigned}")


def _post(url: str, body: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def servers_stage(run_dir: Path) -> None:
    """Two real `coserve serve` processes on the GPU, started one after the other under MPS."""
    from coserve.gpu import mps
    from coserve.gpu.strategies import make_strategy
    from coserve.launch import ServerFailed, ServerSpec, start_server

    specs = [
        ServerSpec(
            role="gen",
            model="tiny-dense",
            random_weights=True,
            device="cuda",
            gpu_memory_utilization=0.2,
            max_model_len=512,
            max_num_seqs=16,
        ),
        ServerSpec(
            role="embed",
            model="tiny-embed",
            random_weights=True,
            device="cuda",
            gpu_memory_utilization=0.1,
            max_model_len=128,
            max_num_seqs=16,
        ),
    ]
    pids = []
    try:
        with make_strategy("mps", ["0"], {}, run_dir) as strat:
            srvs = []
            try:
                for spec in specs:
                    t0 = time.time()
                    srvs.append(
                        start_server(
                            spec, strat.env_for(spec.role), run_dir / f"{spec.role}.log", 300
                        )
                    )
                    print(
                        f"{spec.role} server ready in {time.time() - t0:.1f}s at {srvs[-1].url}",
                        flush=True,
                    )
                pids = [s.pid for s in srvs]
                g = _post(
                    srvs[0].url + "/v1/completions",
                    {"model": "tiny-dense", "prompt": [1, 2, 3, 4], "max_tokens": 8},
                )
                e = _post(
                    srvs[1].url + "/v1/embeddings", {"model": "tiny-embed", "input": [[1, 2, 3, 4]]}
                )
                check(
                    "gen + embed answered under MPS",
                    bool(g.get("choices")) and bool(e.get("data")),
                    f"gen usage {g.get('usage')}, embed dim {len(e['data'][0]['embedding'])}",
                )
                clients = []
                for sp in strat.daemon.get_server_list():
                    clients += [
                        int(x)
                        for x in strat.daemon.command(f"get_client_list {sp}").split()
                        if x.isdigit()
                    ]
                # A server's engine runs in a child process of its group (server/engine_core.py):
                # that child is the MPS client.
                client_groups = {_pgid(c) for c in clients}
                check(
                    "both servers' engines are MPS clients",
                    all(s.pgid in client_groups for s in srvs),
                    f"server groups {[s.pgid for s in srvs]}, clients {clients} (groups "
                    f"{sorted(client_groups)})",
                )
            finally:
                for s in reversed(srvs):
                    s.stop()
        left_groups = [p for p in pids if _group_exists(p)]
        check("servers' process groups gone after stop", not left_groups, f"{left_groups}")
        check("no MPS process after servers + strategy exit", not mps.find_mps_processes())
    except ServerFailed as e:
        check("servers under MPS", False, str(e)[-1500:])


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def main(argv=None) -> int:
    from coserve.gpu import mps
    from coserve.gpu.strategies import make_strategy, mps_client_priority_supported
    from coserve.gpu.telemetry import TelemetrySampler
    from coserve.procs import pid_alive

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument(
        "--servers",
        action="store_true",
        help="also run two real `coserve serve` processes (cuda) under MPS",
    )
    args = ap.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="coserve-devcheck-"))
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"

    before = mps.find_mps_processes()
    check("no MPS daemon before", not before, "; ".join(p.describe() for p in before))
    priority_step(mps_client_priority_supported())

    opts: dict = {"active_thread_percentage": {"embed": 50}}
    if mps_client_priority_supported():
        opts["client_priority"] = {"embed": "below_normal"}
    t_start = time.time()
    with make_strategy("mps", ["0"], opts, run_dir) as strat:
        d = strat.daemon
        check(
            "daemon started in foreground, own session",
            d.proc is not None and os.getpgid(d.proc.pid) == d.proc.pid,
            f"pid {d.proc.pid}, pipe {d.pipe_dir}, log {d.log_dir}, start took "
            f"{time.time() - t_start:.1f}s",
        )
        sl = d.get_server_list()
        check("get_server_list names a server", bool(sl), f"{sl}")
        print("pipe dir files:", sorted(p.name for p in d.pipe_dir.iterdir()), flush=True)
        env_gen, env_embed = strat.env_for("gen"), strat.env_for("embed")
        print("env gen:", json.dumps(env_gen), "\nenv embed:", json.dumps(env_embed), flush=True)

        sampler = TelemetrySampler(["0"], interval_s=0.5, out_path=out / "telemetry.csv").start()
        c1 = spawn(CLIENT, ["gen", str(args.seconds)], env_gen)
        c2 = spawn(CLIENT, ["embed", str(args.seconds)], env_embed)
        nonmps_dir = run_dir / "no-mps"
        nonmps_dir.mkdir(parents=True, exist_ok=True)
        c3 = spawn(
            CLIENT,
            ["timeslice", str(args.seconds / 2)],
            {
                "CUDA_MPS_PIPE_DIRECTORY": str(nonmps_dir),
                "CUDA_VISIBLE_DEVICES": "0",
                "NCCL_NVLS_ENABLE": "0",
            },
        )
        time.sleep(min(args.seconds, 3) + 2)
        clients = []
        for sp in sl:
            try:
                clients += [
                    int(x) for x in d.command(f"get_client_list {sp}").split() if x.isdigit()
                ]
            except Exception as e:
                print("get_client_list failed:", e)
        o1, _ = c1.communicate(timeout=120)
        o2, _ = c2.communicate(timeout=120)
        o3, _ = c3.communicate(timeout=120)
        summary = sampler.stop()
        print(o1.strip(), o2.strip(), o3.strip(), sep="\n", flush=True)
        check("gen client ran through MPS", c1.returncode == 0, f"rc {c1.returncode}")
        check("embed client ran through MPS", c2.returncode == 0, f"rc {c2.returncode}")
        check(
            "get_client_list shows both clients",
            {c1.pid, c2.pid} <= set(clients),
            f"clients {clients}, c1 {c1.pid}, c2 {c2.pid}",
        )
        check(
            "timeslice-env client ran beside the daemon, not through it",
            c3.returncode == 0 and c3.pid not in clients,
            f"rc {c3.returncode}",
        )
        print("telemetry:", sampler.status(), flush=True)
        print("telemetry summary:", json.dumps(summary, indent=1), flush=True)
        check(
            "GPM sampled SM activity",
            "sm_active" in summary and summary["sm_active"]["mean"] > 0,
            f"sm_active {summary.get('sm_active')}, tensor_active {summary.get('tensor_active')}",
        )
        check("NVML basic metrics sampled", "power_w" in summary and "mem_used_mib" in summary)

        cp = spawn(PINNED, [], {**env_gen, "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=2G"})
        op, _ = cp.communicate(timeout=120)
        print(op.strip(), flush=True)
        check(
            "pinned device memory limit enforced",
            "refused as expected" in op,
            f"rc {cp.returncode}",
        )
        daemon_pids = d.pids()
    left = [p for p in mps.find_mps_processes()]
    check(
        "no MPS process after tear-down",
        not left,
        "; ".join(p.describe() for p in left) + f" (had {sorted(daemon_pids)})",
    )
    print("daemon events:", *strat.describe()["mps"]["events"], sep="\n  ")

    if args.servers:
        servers_stage(out / "run-servers")

    # A daemon killed behind our back: does its server outlive it, and does stop() clean up?
    d2 = mps.MpsDaemon(["0"], out / "run-kill").start()
    srv_pids = list(d2.server_pids)
    os.kill(d2.proc.pid, signal.SIGTERM)
    time.sleep(3)
    print(
        f"after SIGTERM to the control daemon itself: daemon alive={d2.proc.poll() is None}, "
        f"server alive={[pid_alive(p) for p in srv_pids]}",
        flush=True,
    )
    d2.stop()
    left = mps.find_mps_processes()
    check(
        "stop() cleans up after a daemon killed from outside",
        not left,
        "; ".join(p.describe() for p in left),
    )

    # SIGTERM to a process holding the strategy: the daemon must go with it.
    holder = start_holder(out / "run-sigterm")
    up = mps.find_mps_processes()
    holder.send_signal(signal.SIGTERM)
    try:
        holder.wait(timeout=60)
    except subprocess.TimeoutExpired:
        holder.kill()
    rest = holder.stdout.read()
    time.sleep(0.5)
    left = mps.find_mps_processes()
    check(
        "SIGTERM to coserve stops its daemon",
        bool(up) and not left,
        f"holder rc {holder.returncode}; up before: {len(up)}; left: "
        f"{[p.describe() for p in left]} {rest.strip()[-300:]}",
    )

    # SIGKILL: no tear-down can run; the daemon was started with PR_SET_PDEATHSIG.
    holder = start_holder(out / "run-sigkill")
    up = mps.find_mps_processes()
    holder.kill()
    holder.wait(timeout=30)
    deadline = time.time() + 15
    while (left := mps.find_mps_processes()) and time.time() < deadline:
        time.sleep(0.2)
    check(
        "SIGKILL to coserve: its daemon and server still go",
        bool(up) and not left,
        f"up before: {len(up)}; left: {[p.describe() for p in left]}",
    )

    mig_step()

    print(f"\n{summary_line(results)}", flush=True)
    (out / "devcheck.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 1 if any(r.status == "fail" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
