"""No import cycles among coserve's modules (tests/importgraph.py reads them from the source)."""

from __future__ import annotations

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


def test_no_import_cycles_outside_the_engine():
    # The engine's own cycle (gen_engine, tp_workers, embed_engine) is being taken apart
    # with its tensor-parallel workers; every other module must already be free of them.
    found = [
        g
        for g in importgraph.cycles(importgraph.graph())
        if not all(m.startswith("coserve.engine.") for m in g)
    ]
    assert found == []
