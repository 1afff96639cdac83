"""Where coserve's commands print their tables: a rich console as wide as the terminal, or,
piped to a file or another program, wide enough that a table's columns are not cut to 80;
and condition names in a line of text, counted where they are many."""

from __future__ import annotations

import os
import sys

PIPED_WIDTH = 160  # characters: a report's widest table fits
# Named when condition names are counted: a slice of a 70-condition spec listed 57-65 names
# in one line (a dry run's refusal, advise's "not considered").
NAMES_SHOWN = 5


def counted_names(names: list[str], named: int) -> str:
    """`names` joined, up to `named` of them; past that, their count and the first
    NAMES_SHOWN: '9 conditions (c0, c1, c2, c3, c4, ...)'."""
    if len(names) <= named:
        return ", ".join(names)
    return f"{len(names)} conditions ({', '.join(names[:NAMES_SHOWN])}, ...)"


def stdout_console():
    """A rich Console on stdout: the terminal's width, or, when not a terminal, $COLUMNS where
    set (the user's choice) and PIPED_WIDTH where not."""
    from rich.console import Console

    if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit():
        return Console()
    return Console(width=PIPED_WIDTH)
