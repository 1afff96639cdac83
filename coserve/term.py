"""Where coserve's commands print their tables: a rich console as wide as the terminal, or,
piped to a file or another program, wide enough that a table's columns are not cut to 80."""

from __future__ import annotations

import sys

PIPED_WIDTH = 160  # characters: a report's widest table fits


def stdout_console():
    """A rich Console on stdout: the terminal's width, or PIPED_WIDTH when not a terminal."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=PIPED_WIDTH)
