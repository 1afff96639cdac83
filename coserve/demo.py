"""`coserve demo`: run the tiny co-location study (experiments/demo.toml) on this machine,
CPU or GPU, into a fresh folder, and print its table. It is the README's first command."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from coserve.text_flags import out_path


def demo_spec_path() -> Path:
    """experiments/demo.toml of the checkout coserve runs from."""
    import coserve

    path = Path(coserve.__file__).resolve().parent.parent / "experiments" / "demo.toml"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: `coserve demo` runs from a checkout of the "
            f"coserve repository (bash install.sh installs it in place)"
        )
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=out_path,
        default=None,
        help="run folder (default: runs/demo-YYYYmmdd-HHMMSS, a new one)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="finish the demo run in --out (stopped by Ctrl-C, say): its finished "
        "repetitions are kept, the missing ones run, the report is written again",
    )


def run(args: argparse.Namespace) -> int:
    from coserve.experiment.command import execute

    if args.resume and args.out is None:
        print("coserve demo: --resume needs --out DIR, the run folder to finish")
        return 2
    try:
        spec = demo_spec_path()
    except FileNotFoundError as e:
        print(e)
        return 2
    out = args.out or f"runs/demo-{dt.datetime.now():%Y%m%d-%H%M%S}"
    print(f"coserve demo: {spec} -> {out}", flush=True)
    return execute(str(spec), out, resume=args.resume)
