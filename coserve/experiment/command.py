"""`coserve run SPEC.toml --out DIR`: run a co-location study and write its report."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from coserve.text_flags import out_path


class _SpecKeys(argparse.Action):
    """`--spec-keys`: print every spec key and exit, as --help does (no SPEC or --out)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from coserve.spec_keys import reference

        print(reference(), end="")
        parser.exit()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "spec",
        metavar="SPEC.toml",
        help="experiment spec (examples: experiments/; every key: --spec-keys)",
    )
    parser.add_argument(
        "--spec-keys",
        nargs=0,
        action=_SpecKeys,
        help="list every spec table and key with its default and allowed values, and exit",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=out_path,
        help="run folder (created; results, logs, report); required unless --dry-run",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="add the missing reps to an existing run folder (same GPU; the same spec, or "
        "one that only adds conditions); a rep whose rep.json cannot be read runs again, its "
        "earlier folder kept as rep-K.damaged-N",
    )
    parser.add_argument(
        "--conditions",
        metavar="A,B",
        default=None,
        help="run only these conditions (sweep points included by name)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the spec, check this machine can run it, print the plan; run nothing",
    )
    parser.add_argument(
        "--no-report", action="store_true", help="do not render the report at the end"
    )
    parser.add_argument(
        "--ray",
        metavar="auto|ADDRESS",
        default=None,
        help="run each condition-rep as a Ray task on this cluster (auto: the one Ray finds, "
        "else a local one); needs pip install 'coserve[ray]'",
    )
    parser.add_argument(
        "--apply-mig",
        action="store_true",
        help="create the MIG instances mig conditions need (as apply_mig = true in "
        "their options; coserve only creates, never destroys)",
    )


def print_plan(spec, sched, console) -> None:
    from rich.table import Table
    from rich.text import Text

    from coserve.experiment.backend import resolve_device
    from coserve.experiment.preflight import cpu_roles

    have_gpus = resolve_device("auto") == "cuda"

    def gpus(c) -> str:
        """The condition's GPUs, or "CPU" when every server of it is a built-in one on the CPU
        here (its strategy then only shares the cores)."""
        on_cpu = cpu_roles(spec, c, have_gpus)
        return "CPU" if on_cpu and len(on_cpu) == len(c.servers) else ",".join(c.gpus)

    conds = len({c.name for c, _ in sched})
    t = Table(
        title=Text(
            f"{spec.name}: {len(sched)} rep{'s' * (len(sched) != 1)} to run over {conds} "
            f"condition{'s' * (conds != 1)}, order {spec.order}"
        )
    )
    for h in ("#", "Condition", "Rep", "Strategy", "GPUs", "Servers"):
        t.add_column(h)
    for i, (c, r) in enumerate(sched, 1):
        servers = ", ".join(
            f"{role}={c.server(spec, role).model or c.server(spec, role).url}" for role in c.servers
        )
        t.add_row(
            *map(
                Text,
                (str(i), c.name, f"{r}/{spec.reps_of(c)}", c.strategy, gpus(c), servers),
            )
        )
    console.print(t)


def say(console, label: str, style: str, text: str) -> None:
    """`label` in `style`, then `text` verbatim: user text (names, paths, errors) is never
    read as rich markup, so `[/red]` in it prints as is."""
    from rich.text import Text

    console.print(Text.assemble((label, style), " ", text), highlight=False)


def quiet_sampler_warning() -> None:
    """Silence the telemetry sampler's own warning (no GPU, no NVML): the runner's progress
    display says it once, and two copies of the line read as two problems."""
    import logging

    logging.getLogger("coserve.gpu.telemetry").setLevel(logging.ERROR)


def execute(
    spec_path: str,
    out: str,
    *,
    resume: bool = False,
    conditions: str | None = None,
    dry_run: bool = False,
    report: bool = True,
    apply_mig: bool = False,
    ray: str | None = None,
    console=None,
) -> int:
    """The whole command; returns the exit code (0 ok, 1 a rep failed or the folder could not be
    written, 2 refused, 130 Ctrl-C or SIGTERM)."""
    from pathlib import Path

    from rich.console import Console

    from coserve.experiment.failure import StorageError, why
    from coserve.experiment.progress import Progress
    from coserve.experiment.runner import Runner, RunRefused
    from coserve.experiment.signals import interruptible, no_interrupts
    from coserve.spec import SpecError, load_spec

    quiet_sampler_warning()
    console = console or Console(stderr=True, soft_wrap=True)
    try:
        spec = load_spec(spec_path)
    except SpecError as e:
        say(console, "bad spec", "red", str(e))
        return 2
    only = None if conditions is None else [c.strip() for c in conditions.split(",") if c.strip()]
    runner = None
    try:
        # Interruptible already: connecting to Ray (and starting a local one) takes seconds.
        with interruptible():
            kind, extra = (Runner, {}) if ray is None else (_ray_runner(), {"address": ray})
            runner = kind(
                spec,
                out,
                spec_text=Path(spec_path).read_text(),
                resume=resume,
                only=only,
                apply_mig=apply_mig,
                **extra,
            )
            sched = runner.schedule()
            if dry_run:
                print_plan(spec, sched, console)
            problems = runner.problems()  # before anything is written
    except RunRefused as e:
        say(console, "refused:", "red", str(e))
        return 2
    except KeyboardInterrupt:
        with no_interrupts():
            if runner is not None and hasattr(runner, "disconnect"):
                runner.disconnect()
        say(console, "interrupted:", "yellow", "before the first rep; nothing was written")
        return 130
    if problems:
        say(
            console,
            "refused:",
            "red",
            f"{runner.where} cannot run the spec:\n" + "\n".join(f"  - {p}" for p in problems),
        )
        return 2
    if dry_run:
        try:  # the refusal the run would give for its folder, and its exit code
            runner.check_folder()
        except RunRefused as e:
            say(console, "refused:", "red", str(e))
            return 2
        return 0
    rd = runner.run_dir
    total = len(spec.schedule())
    resume_hint = f"coserve run {spec_path} --out {out} --resume" + (f" --ray {ray}" if ray else "")
    records = []
    with interruptible():  # from here, SIGINT stops the run however it arrives
        try:
            progress = Progress(f"coserve run {spec.name} -> {out}", len(sched), console=console)
            runner.progress = progress
            with progress:
                records = runner.run()
            if report and rd.exists() and not _report(rd, console):
                return 1
        except RunRefused as e:
            say(console, "refused:", "red", str(e))
            return 2
        except StorageError as e:
            done = sum(1 for r in rd.records() if r.get("status") == "ok")
            say(
                console,
                "stopped:",
                "red",
                f"{e}; {done} of {total} reps are finished and kept. "
                f"Make room (or a writable --out) and finish with: {resume_hint}",
            )
            return 1
        except KeyboardInterrupt:
            done = sum(1 for r in rd.records() if r.get("status") == "ok")
            say(
                console,
                "interrupted:",
                "yellow",
                f"every server and daemon was stopped; {done} of "
                f"{total} reps are finished and kept in {rd.path}. Finish with: {resume_hint}",
            )
            return 130
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        say(
            console,
            f"{len(failed)} rep(s) failed:",
            "red",
            "\n".join(f"  {r['condition']} rep {r['rep']}: {why(r.get('error'))}" for r in failed),
        )
        return 1
    return 0


def _ray_runner():
    from coserve.experiment.ray_runner import RayRunner

    return RayRunner


def _report(rd, console, only: set[str] | None = None) -> bool:
    """Render the report and print its throughput table (`only`: these conditions' rows); on
    a file-system error say so in one line (the reps are kept)."""
    from coserve.report.render import console_table, render, verdict
    from coserve.term import stdout_console

    try:
        rendered = render(rd.path)
    except OSError as e:
        say(
            console,
            "report not written:",
            "red",
            f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}; the reps are kept: "
            f"make room and run `coserve report {rd.path}`",
        )
        return False
    out = stdout_console()
    out.print(console_table(rendered.run, only))
    line = verdict(rendered.run)
    if line:
        out.print(line.replace("**", ""), markup=False, highlight=False)
    console.print(
        f"report: {rendered.markdown}\n        {rendered.html}", highlight=False, markup=False
    )
    return True


def run(args: argparse.Namespace) -> int:
    if args.out is None and not args.dry_run:
        print("coserve run: --out DIR is required (a dry run needs none)", file=sys.stderr)
        return 2
    if args.out is None and args.resume:
        print("coserve run: --resume needs --out DIR (the run folder to finish)", file=sys.stderr)
        return 2
    if args.out is None:  # a dry run writes nothing; a folder that does not exist stands in
        with tempfile.TemporaryDirectory(prefix="coserve-dry-run-") as tmp:
            args.out = str(Path(tmp) / "run")
            return run(args)
    return execute(
        args.spec,
        args.out,
        resume=args.resume,
        conditions=args.conditions,
        dry_run=args.dry_run,
        report=not args.no_report,
        apply_mig=args.apply_mig,
        ray=args.ray,
    )
