"""The CUDA client programs the on-GPU check (devcheck.py) runs beside coserve's MPS daemon,
and how it starts them: each in a session of its own, output piped."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

CLIENT = textwrap.dedent("""
    import os, sys, time, torch
    role, secs = sys.argv[1], float(sys.argv[2])
    torch.cuda.init()
    dev = torch.cuda.get_device_name(0)
    n = 8192 if role != "gen" else 4096
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t0 = time.time(); iters = 0
    while time.time() - t0 < secs:
        for _ in range(10):
            c = a @ b
        torch.cuda.synchronize(); iters += 10
    dt = time.time() - t0
    tflops = 2 * n**3 * iters / dt / 1e12
    print(f"client {role} pid {os.getpid()} on {dev}: {iters} matmuls {n}^3 in {dt:.1f}s "
          f"= {tflops:.0f} TFLOP/s "
          f"(ATP={os.environ.get('CUDA_MPS_ACTIVE_THREAD_PERCENTAGE', '-')}, "
          f"pipe={os.environ.get('CUDA_MPS_PIPE_DIRECTORY', '-')})", flush=True)
""")

PINNED = textwrap.dedent("""
    import torch
    try:
        x = torch.empty(6 * 1024**3, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        print("pinned-limit client: 6 GiB allocation SUCCEEDED (limit not enforced)")
    except Exception as e:
        oom = "out of memory" in str(e).lower() or "OutOfMemory" in type(e).__name__
        print("pinned-limit client: 6 GiB allocation",
              "refused as expected:" if oom else "failed otherwise:",
              type(e).__name__, str(e).splitlines()[0][:200])
""")

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from coserve.gpu.strategies import make_strategy
    with make_strategy("mps", ["0"], {}, Path(sys.argv[1])) as s:
        print("holder: daemon up, servers", s.daemon.server_pids, flush=True)
        time.sleep(120)
""")


def spawn(code: str, args: list[str], env_extra: dict[str, str]) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(env_extra)
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def start_holder(run_dir: Path) -> subprocess.Popen:
    """A process holding an MPS strategy in `run_dir`, once it says its daemon is up (or died)."""
    holder = spawn(
        HOLDER, [str(run_dir)], {"PYTHONPATH": os.environ.get("PYTHONPATH", "") or os.getcwd()}
    )
    deadline = time.time() + 60
    line = ""
    while time.time() < deadline and "daemon up" not in line:
        line = holder.stdout.readline()
        if not line and holder.poll() is not None:
            break
    return holder
