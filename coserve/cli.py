"""The `coserve` command. Each subcommand lives in its own module exposing
`add_arguments(parser)` and `run(args) -> int`; those modules keep heavy imports
(torch, matplotlib) inside `run` so that `coserve --help` stays instant."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("coserve.demo", "run the tiny co-location study on this machine and print its table"),
    "bench": ("coserve.bench.command", "closed-loop or request-rate load on gen and embed"),
    "serve": ("coserve.server.command", "serve a model with the built-in engine (OpenAI API)"),
    "run": ("coserve.experiment.command", "run a co-location study from a TOML spec"),
    "profile": (
        "coserve.profile.command",
        "run conditions with a window of engine steps under the torch profiler (or ncu)",
    ),
    "report": ("coserve.report.command", "re-render tables and plots from a run folder"),
    "advise": (
        "coserve.advise",
        "the measured way of sharing that meets a gen latency budget with the most embed work",
    ),
    "plan": ("coserve.plan_command", "VRAM budget, KV capacity and the concurrency that fits"),
    "export": ("coserve.export.command", "a condition as Docker Compose, Kubernetes or shell"),
    "doctor": ("coserve.gpu.doctor", "what this machine can do: GPUs, MPS, MIG, GPM, profilers"),
}


def build_parser() -> argparse.ArgumentParser:
    from coserve import __version__

    parser = argparse.ArgumentParser(
        prog="coserve",
        description="Serve a generative and an embedding model on the same GPUs and measure the "
        "cost.",
    )
    parser.add_argument("--version", action="version", version=f"coserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:  # Ctrl-C while the commands' modules import (the first ~0.5 s) is no traceback
        args = build_parser().parse_args(argv)
        # The module by name, not its `run` in `args`: `coserve serve` pickles `args` into its
        # engine process, which would then import the whole command module (the HTTP stack).
        run = importlib.import_module(COMMANDS[args.command][0]).run
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
