"""`coserve profile SPEC --condition NAME[,NAME] [--steps N] [--min-seconds S] [--out DIR]`:
run the conditions as `coserve run` runs them (one rep each), with a window of N engine steps
(and at least S seconds) captured by the torch profiler in each built-in server after the
load's warm-up (experiment/profiling.py); then the report (with its Profile section) and a
table on stdout.

`--ncu` instead prints (or with `--execute` runs) an Nsight Compute command around the gen
server of one condition (ncu.py): refused for MPS conditions, where ncu cannot attach."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import re
from pathlib import Path

from coserve.bench.config import MAX_SECONDS
from coserve.profile.ncu import CACHE_CONTROLS, LAUNCH_COUNT, LAUNCH_SKIP
from coserve.server.profile_flags import DEFAULT_MIN_S, DEFAULT_STEPS
from coserve.server.serve_flags import number, positive_int, seconds
from coserve.text_flags import out_path


def _seconds(text: str) -> float:
    """Seconds in [0, MAX_SECONDS] (a load window of the spec: load.warmup_s's bounds)."""
    return number(
        float,
        text,
        f"a number of seconds in [0, {MAX_SECONDS:g}]",
        lambda v: 0 <= v <= MAX_SECONDS,
    )


def _window(text: str) -> float:
    """Seconds in (0, MAX_SECONDS] (load.duration_s's bounds)."""
    v = _seconds(text)
    if v == 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return v


def _regex(text: str) -> str:
    """A kernel-name pattern ncu's `regex:` takes; Python's re stands in for its syntax check.
    An empty one is refused: it was dropped, so ncu profiled every kernel unasked."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty (leave the flag out for every kernel)")
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a regular expression ({e}): {text!r}") from None
    return text


def _section(text: str) -> str:
    """An ncu section identifier (as `ncu --list-sections` gives them: letters, digits and
    underscores). Anything else was passed on, and ncu refused it only once the run's servers
    were up; one with a leading dash was read by ncu as an option of its own."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", text):
        raise argparse.ArgumentTypeError(
            f"not an ncu section identifier (letters, digits, underscores; see "
            f"`ncu --list-sections`): {text!r}"
        )
    return text


def _launches(least: int):
    """A launch count for ncu: an integer from `least` up to ncu's 64-bit limit."""
    what = f"an integer in [{least}, 2**63) (ncu's counter)"
    return lambda text: number(int, text, what, lambda v: least <= v < 1 << 63)


NCU_ONLY = ("execute", "kernel_name", "launch_skip", "launch_count", "section", "cache_control")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC.toml", help="experiment spec (see experiments/)")
    parser.add_argument(
        "--condition",
        metavar="NAME[,NAME]",
        required=True,
        help="the condition(s) to profile, one rep each",
    )
    parser.add_argument(
        "--steps",
        metavar="N",
        type=positive_int,
        default=DEFAULT_STEPS,
        help="engine steps captured per server (default %(default)s)",
    )
    parser.add_argument(
        "--min-seconds",
        metavar="S",
        type=seconds,
        default=DEFAULT_MIN_S,
        help="and each server captures on until S seconds have passed, so that gen's short "
        "steps and embed's long ones cover the same time (default %(default)s)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=out_path,
        default=None,
        help="run folder (default: runs/profile-TIME)",
    )
    parser.add_argument(
        "--warmup-s", type=_seconds, default=None, help="replace the spec's load warm-up"
    )
    parser.add_argument(
        "--duration-s", type=_window, default=None, help="replace the spec's load window"
    )
    parser.add_argument(
        "--resume", action="store_true", help="add the conditions not yet profiled to --out"
    )
    ncu = parser.add_argument_group(
        "Nsight Compute: the gen server only, on a GPU, not under MPS, at TP=1",
        "ncu collects the L2 hit rate (lts__t_sector_hit_rate.pct), DRAM throughput (% of peak) "
        "and achieved occupancy (sm__warps_active) of the chosen kernels, in one pass. The "
        "flags below other than --ncu are refused without it.",
    )
    ncu.add_argument("--ncu", action="store_true", help="print the ncu command for the condition")
    ncu.add_argument("--execute", action="store_true", help="with --ncu: run it and parse it")
    ncu.add_argument(
        "--kernel-name",
        type=_regex,
        default=None,
        metavar="REGEX",
        help="kernels to profile (default: every kernel, and --launch-skip counts them all)",
    )
    # None until given, so that one given without --ncu is refused rather than ignored.
    ncu.add_argument(
        "--launch-skip",
        type=_launches(0),
        default=None,
        metavar="N",
        help="launches of the --kernel-name kernels to let pass first, counted from the "
        f"server's start-up on (default {LAUNCH_SKIP})",
    )
    ncu.add_argument(
        "--launch-count",
        type=_launches(1),
        default=None,
        metavar="N",
        help=f"then profile N launches (default {LAUNCH_COUNT})",
    )
    ncu.add_argument(
        "--section",
        action="append",
        type=_section,
        default=None,
        metavar="NAME",
        help="an ncu section to collect besides the metrics above, e.g. MemoryWorkloadAnalysis "
        "(repeatable; each may add replay passes, which save and restore the memory a kernel "
        "writes)",
    )
    ncu.add_argument(
        "--cache-control",
        choices=CACHE_CONTROLS,
        default=None,
        help=f"ncu's cache control (default {CACHE_CONTROLS[0]}: L2 as the work before the kernel "
        "left it; all: flushed before each pass, the kernel's own reuse only)",
    )


def args_problem(spec, names: list[str], args: argparse.Namespace) -> str | None:
    """Why these arguments cannot run on `spec`, or None: no condition named, one not in the
    spec, or an ncu flag without --ncu (it would be ignored)."""
    known = [c.name for c in spec.all_conditions()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        what = ", ".join(unknown) + " not in the spec" if unknown else "no condition named"
        return f"--condition: {what} (conditions: {', '.join(known)})"
    if not args.ncu:
        given = [
            f"--{a.replace('_', '-')}" for a in NCU_ONLY if getattr(args, a) not in (None, False)
        ]
        if given:
            return f"{', '.join(given)} needs --ncu (without it, the torch profiler runs)"
    return None


def unprofiled_reps(spec, names: list[str], out: Path) -> list[str]:
    """The reps of `names` in `out` that finished ("ok") without a profile/summary.json (a
    `coserve run` of the same spec): a resume would skip them, not profile them."""
    from coserve.experiment.rundir import RunDir

    rd = RunDir(out)
    return [
        f"{c.name} rep {r}"
        for c, r in spec.schedule(names)
        if (rd.rep_record(c.name, r) or {}).get("status") == "ok"
        and not (rd.rep_dir(c.name, r) / "profile" / "summary.json").exists()
    ]


def profile_spec(spec, warmup_s: float | None, duration_s: float | None):
    """The spec as profiled: one rep per condition, no sweep repetitions beyond one, and the
    load windows given (a profile needs steps, not a long window)."""
    load = spec.load
    if warmup_s is not None:
        load = dataclasses.replace(load, warmup_s=warmup_s)
    if duration_s is not None:
        load = dataclasses.replace(load, duration_s=duration_s)
    sweep = spec.sweep and dataclasses.replace(spec.sweep, repetitions=1)
    return dataclasses.replace(spec, repetitions=1, sweep=sweep, load=load)


def console_rows(run_dir: Path, order: list[str]) -> list[list[str]]:
    """The table printed last: one row per profiled server."""
    from coserve.report.blocks import num
    from coserve.report.profile_section import clock_means, profiled_reps

    rows = []
    for r in profiled_reps(run_dir, order):
        clocks = clock_means(r.profile.clocks)
        for role in ("gen", "embed"):
            p = r.profile.roles.get(role)
            if p is None:
                continue
            top = sorted(p.classes, key=lambda c: -c.share)[:2]
            wall, busy = p.step_wall_ms, p.step_busy_ms
            rows.append(
                [
                    r.condition,
                    role,
                    str(len(p.steps)),
                    num(wall),
                    num(busy),
                    f"{100 * busy / wall:.0f}%" if wall and busy is not None else "-",
                    num(p.step_collective_ms),
                    num(p.gaps.p50_us),
                    num(p.gaps.p99_us),
                    ", ".join(f"{c.kernel_class} {100 * c.share:.0f}%" for c in top),
                    num(clocks["sm_clock_mhz"]),
                    num(clocks["power_w"]),
                    "-"
                    if clocks["power_capped"] is None
                    else f"{100 * clocks['power_capped']:.0f}%",
                ]
            )
    return rows


HEADERS = [
    "Condition",
    "Server",
    "Steps",
    "Step ms",
    "Busy ms",
    "Busy",
    "Collective ms",
    "Gap p50 µs",
    "Gap p99 µs",
    "Top classes",
    "SM MHz",
    "Power W",
    "Power-capped",
]


def print_table(run_dir: Path, order: list[str]) -> int:
    """Print the profile table; returns how many rows it had."""
    from rich.table import Table

    from coserve.term import stdout_console

    rows = console_rows(run_dir, order)
    t = Table(title=f"coserve profile: {run_dir}")
    for h in HEADERS:
        t.add_column(h, justify="left" if h in ("Condition", "Server", "Top classes") else "right")
    for row in rows:
        t.add_row(*row)
    stdout_console().print(t)
    return len(rows)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from coserve.experiment.command import say
    from coserve.spec import SpecError, load_spec

    console = Console(stderr=True, soft_wrap=True)
    try:
        spec = load_spec(args.spec)
    except SpecError as e:
        say(console, "bad spec", "red", str(e))
        return 2
    names = [c.strip() for c in args.condition.split(",") if c.strip()]
    problem = args_problem(spec, names, args)
    if problem:
        say(console, "refused:", "red", problem)
        return 2
    spec = profile_spec(spec, args.warmup_s, args.duration_s)
    out = Path(args.out or f"runs/profile-{dt.datetime.now():%Y%m%d-%H%M%S}")
    if args.ncu:
        from coserve.profile.ncu import run_ncu

        return run_ncu(spec, names, args, out, console)
    return _profile(spec, names, out, args, console)


def _profile(spec, names: list[str], out: Path, args, console) -> int:
    from coserve.experiment.command import _report, quiet_sampler_warning, say
    from coserve.experiment.failure import StorageError, why
    from coserve.experiment.profiling import ProfilingBackend
    from coserve.experiment.progress import Progress
    from coserve.experiment.runner import Runner, RunRefused
    from coserve.experiment.signals import interruptible

    quiet_sampler_warning()
    unprofiled = unprofiled_reps(spec, names, out) if args.resume else []
    if unprofiled:
        say(
            console,
            "refused:",
            "red",
            f"--resume: in {out}, {', '.join(unprofiled)} finished without the profiler (a "
            "`coserve run`?), so it would be skipped, not profiled; profile into another --out",
        )
        return 2
    try:
        runner = Runner(
            spec,
            out,
            resume=args.resume,
            only=names,
            backend=ProfilingBackend(args.steps, args.min_seconds),
        )
        with interruptible():
            progress = Progress(
                f"coserve profile {spec.name} -> {out}", len(runner.schedule()), console=console
            )
            runner.progress = progress
            with progress:
                records = runner.run()
    except RunRefused as e:
        say(console, "refused:", "red", str(e))
        return 2
    except StorageError as e:
        say(console, "stopped:", "red", str(e))
        return 1
    except KeyboardInterrupt:
        say(console, "interrupted:", "yellow", f"finished reps are kept in {out}")
        return 130
    order = [c.name for c in spec.all_conditions()]
    if not _report(runner.run_dir, console, set(names)):
        return 1
    print_table(out, order)
    failed = [r for r in records if r.get("status") != "ok"]
    for r in failed:
        say(console, "failed:", "red", f"{r['condition']}: {why(r.get('error'))}")
    return 1 if failed else 0
