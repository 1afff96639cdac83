"""`coserve run SPEC.toml --out DIR`: run a co-location study and write its report."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC.toml", help="experiment spec (see experiments/)")
    parser.add_argument("--out", metavar="DIR", required=True, help="run folder (created; results, logs, report)")
    parser.add_argument("--resume", action="store_true",
                        help="add the missing reps to an existing run folder (same spec and GPU)")
    parser.add_argument("--conditions", metavar="A,B", default=None,
                        help="run only these conditions (sweep points included by name)")
    parser.add_argument("--dry-run", action="store_true", help="validate the spec and print the plan; run nothing")
    parser.add_argument("--no-report", action="store_true", help="do not render the report at the end")


def print_plan(spec, sched, console) -> None:
    from rich.table import Table

    t = Table(title=f"{spec.name}: {len(sched)} rep(s), order {spec.order}")
    for h in ("#", "Condition", "Rep", "Strategy", "GPUs", "Servers"):
        t.add_column(h)
    for i, (c, r) in enumerate(sched, 1):
        servers = ", ".join(f"{role}={c.server(spec, role).model or c.server(spec, role).url}" for role in c.servers)
        t.add_row(str(i), c.name, f"{r}/{spec.reps_of(c)}", c.strategy, ",".join(c.gpus), servers)
    console.print(t)


def execute(spec_path: str, out: str, *, resume: bool = False, conditions: str | None = None,
            dry_run: bool = False, report: bool = True, console=None) -> int:
    """The whole command; returns the exit code (0 ok, 1 a rep failed, 2 refused, 130 Ctrl-C)."""
    import logging
    from pathlib import Path

    from rich.console import Console

    from coserve.experiment.progress import Progress
    from coserve.experiment.runner import Runner, RunRefused
    from coserve.spec import SpecError, load_spec

    # The sampler's own warning (no GPU) is said once by the progress display instead.
    logging.getLogger("coserve.gpu.telemetry").setLevel(logging.ERROR)
    console = console or Console(stderr=True, soft_wrap=True)
    try:
        spec = load_spec(spec_path)
    except SpecError as e:
        console.print(f"[red]bad spec[/red] {e}", markup=True, highlight=False)
        return 2
    only = [c.strip() for c in conditions.split(",") if c.strip()] if conditions else None
    try:
        runner = Runner(spec, out, spec_text=Path(spec_path).read_text(), resume=resume, only=only)
    except RunRefused as e:
        console.print(f"[red]refused:[/red] {e}", highlight=False)
        return 2
    sched = runner.schedule()
    if dry_run:
        print_plan(spec, sched, console)
        return 0
    progress = Progress(f"coserve run {spec.name} -> {out}", len(sched), console=console)
    runner.progress = progress
    interrupted = False
    records = []
    try:
        with progress:
            records = runner.run()
    except RunRefused as e:
        console.print(f"[red]refused:[/red] {e}", highlight=False)
        return 2
    except KeyboardInterrupt:
        interrupted = True
    rd = runner.run_dir
    done = sum(1 for r in rd.records() if r.get("status") == "ok")
    total = len(spec.schedule())
    if interrupted:
        console.print(f"[yellow]interrupted[/yellow]: every server and daemon was stopped; "
                      f"{done} of {total} reps are finished and kept in {rd.path}. "
                      f"Finish with: coserve run {spec_path} --out {out} --resume", highlight=False)
        return 130
    if report and rd.exists():
        from coserve.report.render import console_table, render, stdout_console

        rendered = render(rd.path)
        stdout_console().print(console_table(rendered.run))
        console.print(f"report: {rendered.markdown}\n        {rendered.html}", highlight=False)
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        console.print(f"[red]{len(failed)} rep(s) failed[/red]: "
                      + "; ".join(f"{r['condition']} rep {r['rep']}: {(r.get('error') or '')[:200]}"
                                  for r in failed), highlight=False)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    return execute(args.spec, args.out, resume=args.resume, conditions=args.conditions,
                   dry_run=args.dry_run, report=not args.no_report)
