"""Where coserve's commands print their tables: a rich console as wide as the terminal, or,
piped to a file or another program, wide enough that a table's columns are not cut to 80."""

from __future__ import annotations

import os
import sys

PIPED_WIDTH = 160  # characters: a report's widest table fits


def stdout_console():
    """A rich Console on stdout: the terminal's width, or, when not a terminal, $COLUMNS where
    set (the user's choice) and PIPED_WIDTH where not."""
    from rich.console import Console

    if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit():
        return Console()
    return Console(width=PIPED_WIDTH)
