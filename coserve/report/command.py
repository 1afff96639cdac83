"""`coserve report DIR`: re-render tables and plots from a run folder's stored results."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from coserve.text_flags import nonempty

    parser.add_argument(
        "run_dir", metavar="DIR", type=nonempty, help="a run folder written by `coserve run`"
    )
    parser.add_argument(
        "--no-plots",
        action="store_true",
        help="tables only (faster): report.md and report.html are written again, without plots",
    )


def run(args: argparse.Namespace) -> int:
    from coserve.experiment.rundir import RunDir
    from coserve.report.render import console_table, render, verdict
    from coserve.spec import SpecError
    from coserve.term import stdout_console

    console = stdout_console()
    rd = RunDir(args.run_dir)
    if not rd.readable():
        why = (
            "does not exist"
            if not rd.path.exists()
            else "is not a coserve run folder (no fingerprint.json nor spec.json)"
        )
        print(
            f"coserve report: {args.run_dir} {why}; `coserve run SPEC.toml --out DIR` makes one",
            file=sys.stderr,
        )
        return 2
    try:
        out = render(args.run_dir, with_plots=not args.no_plots)
    except SpecError as e:
        console.print(f"[red]the run folder's spec does not validate:[/red]\n{e}")
        return 2
    except OSError as e:  # a read-only or full folder: the reps are untouched
        where = e.filename2 or e.filename
        print(
            f"coserve report: cannot write the report in {args.run_dir}: {e.strerror or e}"
            + (f" ({where})" if where else ""),
            file=sys.stderr,
        )
        return 2
    if out.run.unreadable:
        from rich.markup import escape

        console.print(f"[yellow]warning:[/yellow] {escape(out.run.unreadable_text())}")
    console.print(console_table(out.run))
    line = verdict(out.run)
    if line:  # as `coserve run` prints it
        console.print(line.replace("**", ""), markup=False, highlight=False)
    console.print(f"report: {out.markdown}\n        {out.html}")
    return 0
