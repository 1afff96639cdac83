"""No import cycles among coserve's modules (tests/importgraph.py reads them from the source),
and the command line built without the heavy libraries."""

from __future__ import annotations

import subprocess
import sys

import importgraph


def test_the_checker_finds_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
    )
    edges = importgraph.graph(pkg)
    assert importgraph.cycles(edges) == [["pkg.a", "pkg.sub.b"]]
    assert edges["pkg.c"] == set()


def test_no_import_cycles():
    assert importgraph.cycles(importgraph.graph()) == []


def test_the_engines_and_their_workers_import_one_way():
    # tensor-parallel workers build ranks (engine/ranks.py), never the engines that start them
    edges = importgraph.graph()
    assert "coserve.engine.tp_workers" in edges["coserve.engine.gen_engine"]
    assert "coserve.engine.tp_workers" in edges["coserve.engine.embed_engine"]
    engines = {"coserve.engine.gen_engine", "coserve.engine.embed_engine"}
    assert not edges["coserve.engine.tp_workers"] & engines
    assert not edges["coserve.engine.ranks"] & engines
    assert not edges["coserve.engine.embed_engine"] & engines


def test_the_layers_point_one_way():
    # engine < server < launch < experiment < report, bench beside the server: the bench once
    # took serve's --api-key check from coserve.server (2026-12-01)
    below = {
        "engine": {"server", "bench", "experiment", "report"},
        "server": {"bench", "experiment", "report"},
        "bench": {"server", "engine", "experiment", "report"},
        "experiment": {"report"},
    }

    def layer(module: str) -> str:
        return module.split(".")[1] if module.count(".") >= 2 else ""

    def allowed(module: str, dep: str) -> bool:
        # a command line may render the report at its end (`coserve run`)
        return module.endswith(".command") and layer(dep) == "report"

    wrong = [
        (m, d)
        for m, deps in importgraph.graph().items()
        for d in deps
        if layer(d) in below.get(layer(m), ()) and not allowed(m, d)
    ]
    assert wrong == []


def test_the_command_line_is_built_without_torch():
    # cli.py imports every command's module to build its parser, `coserve serve` too; torch
    # there once cost each server start seconds (and `coserve --help` with it); aiohttp,
    # through the profiling endpoints' flags, cost `coserve --help` about half a second
    code = (
        "import sys; from coserve.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'matplotlib', 'ray', 'aiohttp') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_ctrl_c_while_the_commands_import_is_exit_130_not_a_traceback(monkeypatch, capsys):
    """A SIGINT in the first ~0.3 s of `coserve serve` landed in the command modules'
    imports and printed a KeyboardInterrupt traceback (a hostile pass, 2026-11-30)."""
    from coserve import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["serve", "gen"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
