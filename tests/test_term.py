"""Where tables go: piped output is PIPED_WIDTH wide unless the user set $COLUMNS."""

from __future__ import annotations

from coserve.term import PIPED_WIDTH, stdout_console


def test_piped_width_follows_columns_when_set(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    assert stdout_console().width == PIPED_WIDTH  # pytest's stdout is not a terminal
    monkeypatch.setenv("COLUMNS", "80")
    assert stdout_console().width == 80
    monkeypatch.setenv("COLUMNS", "wide")  # not a number: ignored
    assert stdout_console().width == PIPED_WIDTH
