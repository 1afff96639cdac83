"""Nsight Compute around the gen server: the command line, and what its raw CSV says.

As the study did (the fused add-RMSNorm and the MoE GEMM, `--launch-skip/--launch-count`),
with `--clock-control none` so that ncu leaves the card's clocks as they are (its default locks
them to base). The gen server runs under

    ncu --target-processes all --kernel-name regex:RE --launch-skip S --launch-count C
        [--section NAME ...] --metrics L2,DRAM,OCCUPANCY --cache-control none
        --clock-control none -f -o REPORT  python -m coserve serve gen ...

Only the three metrics by default: they fit one pass, so ncu never replays a kernel and never
saves and restores the memory it writes (the study's MemoryWorkloadAnalysis section takes
several passes; co-located beside an embed server, an H200 run failed in that replay,
docs/mechanism.md). `--cache-control none` leaves L2 as the kernels before it left it (ncu's
default flushes it before each pass): the question is what other work leaves in L2.

and `ncu --import REPORT.ncu-rep --csv --page raw` gives one row per profiled kernel, from
which `parse_raw_csv` takes the L2 hit rate, the DRAM throughput (% of peak) and the achieved
occupancy. ncu cannot attach to MPS clients, so MPS conditions are refused with that reason;
tensor-parallel ones too (the wrapper runs the gen server as one process, at TP=1).
Nothing here changes clocks, power limits, compute mode or MIG: ncu only reads counters.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

L2_HIT = "lts__t_sector_hit_rate.pct"
DRAM_PCT = "dram__throughput.avg.pct_of_peak_sustained_elapsed"
OCCUPANCY = "sm__warps_active.avg.pct_of_peak_sustained_active"
METRICS = (L2_HIT, DRAM_PCT, OCCUPANCY)
LAUNCH_SKIP, LAUNCH_COUNT = 1000, 5  # --launch-skip / --launch-count when not given
CACHE_CONTROLS = ("none", "all")  # ncu's --cache-control values; the first is coserve's default
# What the first run under ncu showed (H200, 2026-11-30): the start-up is the slow part.
GRAPHS_NOTE = (
    "the gen server captures its CUDA graphs under ncu before it serves: on an H200 "
    "(qwen3-30b-a3b) it was still capturing after 210 s; allow minutes, or profile an "
    "--enforce-eager condition"
)
# The load's stall_s under ncu: the gen server said nothing for the default 10 s with 512
# requests in flight under ncu, eager, and the run failed before a kernel was profiled (H200,
# qwen3-30b-a3b, 2026-11-30): every launch is intercepted there.
NCU_STALL_S = 600.0
# What co-located runs under ncu showed (H200, 2026-12-01, docs/mechanism.md): not refused, as
# another driver or ncu may do better, but said before the servers start.
BESIDE_NOTE = (
    "the gen server shares the GPU with another server here: on an H200 ncu failed at the "
    "first profiled kernel whenever another process held a context on the GPU, idle or not "
    "(docs/mechanism.md); a condition with gen alone profiles"
)
# A rep under ncu measures ncu's overhead, not the strategy; what it profiled is the result.
UNDER_NCU_NOTE = "the kernels above are the result; the run under ncu is no measurement of gen: "
PORT_MARK = "65021"  # stands for the port in the server's argv until launch fills {port}


@dataclass
class NcuKernel:
    """One profiled kernel launch; percentages 0..100, None where the CSV lacks the metric."""

    id: int
    name: str
    l2_hit_rate_pct: float | None
    dram_throughput_pct: float | None
    achieved_occupancy_pct: float | None


def ncu_problem(strategy: str) -> str | None:
    """Why ncu cannot profile a condition of this strategy, or None."""
    parts = strategy.split("+")  # "tp+mps": tensor parallel, shared by MPS
    if "mps" in parts:
        return (
            f"strategy {strategy}: ncu cannot profile MPS clients (its counters need a context "
            "of their own); use `coserve profile` without --ncu, whose torch profiler works "
            "in-process under MPS"
        )
    if "tp" in parts:
        return (
            f"strategy {strategy}: the ncu wrapper runs the gen server at TP=1 (one process), "
            "not at the condition's TP degree; use `coserve profile` without --ncu, which "
            "profiles the tensor-parallel server's rank 0 in-process"
        )
    return None


def ncu_command(
    server_argv: list[str],
    report: Path,
    *,
    kernel_regex: str | None,
    launch_skip: int,
    launch_count: int,
    sections: tuple[str, ...] = (),
    cache_control: str = CACHE_CONTROLS[0],
    ncu_bin: str = "ncu",
) -> list[str]:
    """The argv running `server_argv` under ncu, writing REPORT.ncu-rep: the three metrics,
    plus the named ncu `sections` (each may add replay passes). Raises ValueError for a
    negative skip, a count below 1 or a cache control ncu does not know."""
    if launch_skip < 0:
        raise ValueError(f"--launch-skip: must be >= 0, got {launch_skip}")
    if launch_count < 1:
        raise ValueError(f"--launch-count: must be >= 1, got {launch_count}")
    if cache_control not in CACHE_CONTROLS:
        raise ValueError(
            f"--cache-control: one of {', '.join(CACHE_CONTROLS)}, got {cache_control!r}"
        )
    cmd = [ncu_bin, "--target-processes", "all"]
    if kernel_regex:
        cmd += ["--kernel-name", f"regex:{kernel_regex}"]
    cmd += ["--launch-skip", str(launch_skip), "--launch-count", str(launch_count)]
    for section in sections:
        cmd += ["--section", section]
    cmd += ["--metrics", ",".join(METRICS), "--cache-control", cache_control]
    cmd += ["--clock-control", "none", "-f", "-o", str(report)]
    return cmd + list(server_argv)


def import_command(report: Path, ncu_bin: str = "ncu") -> list[str]:
    """The argv printing REPORT.ncu-rep as raw CSV."""
    return [ncu_bin, "--import", f"{report}.ncu-rep", "--csv", "--page", "raw"]


def _number(text: str) -> float | None:
    t = text.strip().replace(",", "")
    if t in ("", "n/a", "N/A"):
        return None
    try:
        v = float(t)
    except ValueError:
        return None
    return v if math.isfinite(v) else None  # "nan" would make the kernels' JSON invalid


def parse_raw_csv(text: str) -> list[NcuKernel]:
    """The kernels of `ncu --csv --page raw` output: a header row (starting "ID"), a row of
    units, then one row per kernel; ncu's own `==PROF==` lines before it are skipped.
    Raises ValueError when there is no header row, it lacks the kernel name, a kernel's row
    is cut short of it, or no kernel row follows."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"')), None)
    if start is None:
        raise ValueError('no ncu raw CSV header (a line starting with "ID") in the output')
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header = rows[0]
    if "Kernel Name" not in header:
        raise ValueError("the ncu CSV has no 'Kernel Name' column")
    col = {name: i for i, name in enumerate(header)}

    def get(row: list[str], key: str) -> float | None:
        i = col.get(key)
        return _number(row[i]) if i is not None and i < len(row) else None

    out = []
    for row in rows[1:]:
        if not row or not row[0].strip().isdigit():  # the units row, blank lines
            continue
        if len(row) <= col["Kernel Name"]:
            raise ValueError(f"the ncu CSV row of kernel {row[0]} is cut short: {row}")
        out.append(
            NcuKernel(
                id=int(row[0]),
                name=row[col["Kernel Name"]],
                l2_hit_rate_pct=get(row, L2_HIT),
                dram_throughput_pct=get(row, DRAM_PCT),
                achieved_occupancy_pct=get(row, OCCUPANCY),
            )
        )
    if not out:
        raise ValueError("the ncu CSV lists no kernel")
    return out


def server_argv(spec, cond, device: str) -> list[str]:
    """The built-in gen server's argv for `cond`, with {python} and {port} where `coserve run`'s
    command launcher fills them. Raises ValueError for a gen server of another launcher, or
    one the condition runs tensor parallel."""
    from coserve.launch_command import build_command

    cfg = cond.server(spec, "gen")
    if cfg.launcher != "builtin":
        raise ValueError(f"gen: launcher {cfg.launcher}; the ncu wrapper runs the built-in server")
    if cfg.tensor_parallel_size > 1:  # set on the server, not by a tp strategy (refused before)
        raise ValueError(
            f"gen: tensor_parallel_size {cfg.tensor_parallel_size}; the ncu wrapper runs the gen "
            "server at TP=1 (one process); use `coserve profile` without --ncu"
        )
    sspec = cfg.server_spec("gen", device, tensor_parallel_size=1, docker_image=None)
    argv = build_command(sspec, int(PORT_MARK))
    argv = ["{python}" if a == sys.executable else a for a in argv]
    return ["{port}" if a == PORT_MARK else a for a in argv]


def why_no_report(gen_log: Path, command: list[str]) -> str | None:
    """Why ncu wrote no report, from the gen server's log (ncu's own output goes there): it
    profiled no kernel (too few matching launches for `--launch-skip`), or it said
    "==ERROR==" (quoted). None when the log says neither."""
    try:
        text = gen_log.read_text(errors="replace")
    except OSError:
        return None
    if "No kernels were profiled" in text:
        skip = command[command.index("--launch-skip") + 1]  # ncu_command always sets it
        return (
            f"ncu profiled no kernel: it skips the first {skip} launches of the kernels that "
            "match (counted from the server's start-up on) and fewer ran before the run ended; "
            "lower --launch-skip, or lengthen --warmup-s / --duration-s (on an H200, "
            "2026-11-30, qwen3-30b-a3b eager at C=512 put out 275 tokens in 30 s under ncu)"
        )
    errors = dict.fromkeys(ln.strip() for ln in text.splitlines() if ln.startswith("==ERROR=="))
    if not errors:
        return None
    # seen on an H200 (2026-11-30): the MoE GEMM failed with the embed server time-sliced
    # beside gen, where gen alone, same command, profiled
    return (
        f"ncu failed in the gen server ({gen_log}): " + " / ".join(errors)[:600] + "; with "
        "another server on the GPU, profile a condition with gen alone to see whether that "
        "server is the cause"
    )


def shown(command: list[str], port: int | None = None) -> str:
    """`command` as a shell line with {python} filled as the command launcher fills it and,
    given the port the gen server got, {port} too (else left as {port})."""
    filled = [a.replace("{python}", sys.executable) for a in command]
    if port is not None:
        filled = [a.replace("{port}", str(port)) for a in filled]
    return shlex.join(filled)


def _gen_port(record: dict) -> int | None:
    """The port of a rep record's gen server URL, or None where the record has none."""
    from urllib.parse import urlsplit

    url = ((record.get("servers") or {}).get("gen") or {}).get("url")
    return urlsplit(url).port if url else None


def wrapped_spec(spec, cond, command: list[str]):
    """`spec` whose condition `cond` runs its gen server as `command` (launcher command),
    its load allowed at least NCU_STALL_S of silence (a longer `stall_s` of the spec stays)."""
    gen = dataclasses.replace(cond.server(spec, "gen"), launcher="command", extra_args=command)
    stall_s = max(NCU_STALL_S, cond.load_for(spec).stall_s)
    cond2 = dataclasses.replace(cond, gen={}, load={**cond.load, "stall_s": stall_s})
    conditions = [cond2 if c.name == cond.name else c for c in spec.conditions]
    return dataclasses.replace(
        spec, servers={**spec.servers, "gen": gen}, conditions=conditions, sweep=None
    )


def run_ncu(spec, names: list[str], args, out: Path, console) -> int:
    """`coserve profile --ncu`: print the command, {port} still open (the gen server's port is
    chosen when it starts), and with --execute run the condition with its gen server under ncu,
    then print the command as it ran and the parsed kernels. Exit 2 when refused. Under `out`
    (--out, default runs/profile-TIME): ncu/CONDITION.ncu-rep and .json (the parsed kernels),
    run/ (the run)."""
    from coserve.experiment.backend import resolve_device
    from coserve.experiment.command import say
    from coserve.experiment.preflight import flags_problem

    if len(names) != 1:
        say(console, "refused:", "red", "--ncu profiles one condition at a time")
        return 2
    cond = spec.condition(names[0])  # command.args_problem: it is in the spec
    why = ncu_problem(cond.strategy) or (
        None if "gen" in cond.servers else f"{cond.name} has no gen server"
    )
    if why:
        say(console, "refused:", "red", why)
        return 2
    out = out.resolve()
    report = out / "ncu" / cond.name
    gen = cond.server(spec, "gen")
    device = resolve_device(gen.device)
    # under ncu the gen server is a command: `coserve run`'s check of its flags is done here
    why = flags_problem(cond, "gen", gen, device == "cuda")
    if why:
        say(console, "refused:", "red", why)
        return 2
    try:
        argv = server_argv(spec, cond, device)
        cmd = ncu_command(
            argv,
            report,
            kernel_regex=args.kernel_name,
            launch_skip=LAUNCH_SKIP if args.launch_skip is None else args.launch_skip,
            launch_count=LAUNCH_COUNT if args.launch_count is None else args.launch_count,
            sections=tuple(args.section or ()),
            cache_control=args.cache_control or CACHE_CONTROLS[0],
        )
    except ValueError as e:
        say(console, "refused:", "red", str(e))
        return 2
    print(shown(cmd))
    print(shlex.join(import_command(report)))
    say(
        console,
        "note:",
        "yellow",
        "{port} is not known yet: the gen server gets a free port when it starts"
        + ("; the command as it ran follows the run" if args.execute else ""),
    )
    if device == "cuda" and not (gen.enforce_eager or "--enforce-eager" in gen.extra_args):
        say(console, "note:", "yellow", GRAPHS_NOTE)
    if len(cond.servers) > 1:
        say(console, "note:", "yellow", BESIDE_NOTE)
    if device == "cpu":  # not refused: a stand-in ncu on PATH can run it (the CPU tests)
        say(
            console,
            "note:",
            "yellow",
            f"{cond.name}'s gen server runs on the CPU: ncu profiles CUDA kernels only, so "
            "it will find none",
        )
    if not args.execute:
        return 0
    if shutil.which("ncu") is None:
        say(console, "refused:", "red", "ncu is not on PATH (see `coserve doctor`)")
        return 2
    return _execute(spec, cond, cmd, report, out / "run", console)


def _execute(spec, cond, cmd: list[str], report: Path, run_dir: Path, console) -> int:
    import json

    from coserve.experiment.command import say
    from coserve.experiment.rundir import RunDir
    from coserve.experiment.runner import Runner, RunRefused

    try:
        report.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        say(console, "refused:", "red", f"cannot use {run_dir.parent} for the ncu report: {e}")
        return 2
    wrapped = dataclasses.replace(wrapped_spec(spec, cond, cmd), repetitions=1)
    try:
        records = Runner(wrapped, run_dir, only=[cond.name]).run()
    except RunRefused as e:
        say(console, "refused:", "red", str(e))
        return 2
    port = next((p for r in records if (p := _gen_port(r)) is not None), None)
    if port is not None:
        say(console, "ran:", "green", shown(cmd, port))
    done = subprocess.run(
        import_command(report), capture_output=True, text=True, errors="replace", check=False
    )
    failed = [
        f"{r.get('condition')} rep {r.get('rep')}: {r.get('error')}"
        for r in records
        if r.get("status") != "ok"
    ]
    try:
        kernels = parse_raw_csv(done.stdout)
    except ValueError as e:
        why = why_no_report(RunDir(run_dir).rep_dir(cond.name, 1) / "gen.log", cmd)
        said = done.stderr.strip()[-500:] or "nothing"
        say(console, "failed:", "red", "; ".join([why or f"{e}; ncu said: {said}", *failed]))
        return 1
    (report.parent / f"{cond.name}.json").write_text(
        json.dumps([dataclasses.asdict(k) for k in kernels], indent=1)
    )
    for k in kernels:
        print(
            f"{k.id:>4} {k.name[:60]:<60} L2 hit {k.l2_hit_rate_pct}%  DRAM "
            f"{k.dram_throughput_pct}%  occupancy {k.achieved_occupancy_pct}%"
        )
    if failed:
        say(console, "note:", "yellow", UNDER_NCU_NOTE + "; ".join(failed))
    return 0
