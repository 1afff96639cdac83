"""`coserve export SPEC_OR_RUN_DIR --condition NAME --format compose|k8s|commands`: write a
condition as a deployment (see coserve/export/__init__.py). Exit 0 with the files written,
2 for a spec, condition or option it cannot export (the message names what and why), or for
files of the export already in --out (unless --force)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from coserve.text_flags import out_path

FORMATS = ("compose", "k8s", "commands")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", metavar="SPEC_OR_RUN_DIR", help="a spec (TOML) or a `coserve run` folder"
    )
    parser.add_argument("--condition", required=True, metavar="NAME", help="the condition")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument(
        "--engine",
        choices=("vllm", "builtin"),
        default=None,
        help="serve every model with vLLM or coserve's built-in engine (default: each "
        "server's launcher in the spec)",
    )
    parser.add_argument(
        "--mig-gpu",
        default=None,
        metavar="FAMILY",
        help="for a MIG condition with profiles 'auto': the GPU to lay it out for "
        "(H200, H100-80GB, H100-94GB, A100-80GB, A100-40GB)",
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        type=out_path,
        help="folder to write into (default: export-COND)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite files of the export already in --out (without it they are refused)",
    )


def load_source(path: Path):
    """The spec of a spec file or of a run folder. Raises SpecError, OSError."""
    if path.is_dir():
        from coserve.experiment.rundir import RunDir
        from coserve.report.aggregate import load_spec_of

        return load_spec_of(RunDir(path))
    from coserve.spec import load_spec

    return load_spec(path)


def run(args) -> int:
    from coserve.export import commands, compose, k8s
    from coserve.export.model import ExportError, build_deployment
    from coserve.spec import SpecError

    writers = {"compose": compose.render, "k8s": k8s.render, "commands": commands.render}
    try:
        spec = load_source(Path(args.source))
        dep = build_deployment(spec, args.condition, engine=args.engine, mig_gpu=args.mig_gpu)
        files = writers[args.format](dep)
    except (SpecError, ExportError, OSError) as e:
        print(f"coserve export: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or f"export-{dep.condition}")
    if out.exists() and not out.is_dir():
        print(f"coserve export: --out {out} is a file, not a folder", file=sys.stderr)
        return 2
    there = [str(out / name) for name in files if (out / name).exists()]
    if there and not args.force:
        print(
            f"coserve export: {', '.join(there)} already exist{'s' if len(there) == 1 else ''}; "
            "add --force to overwrite, or choose another --out",
            file=sys.stderr,
        )
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out / name).write_text(text)
        if "serve.sh" in files:
            (out / "serve.sh").chmod(0o755)
    except OSError as e:
        print(f"coserve export: cannot write {out}: {e}", file=sys.stderr)
        return 2
    for name in files:
        print(out / name)
    for note in dep.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0
