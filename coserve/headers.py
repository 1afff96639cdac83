"""What a key sent in an HTTP header may hold: one check for `coserve serve --api-key` and
`coserve bench --api-key` (the server and the bench are siblings; neither imports the other)."""

from __future__ import annotations

import argparse


def api_key(text: str) -> str:
    """A key clients send in a header (argparse type): not empty, printable ASCII, no space at
    either end. Other characters no client sends as written (a byte that is not UTF-8 made
    every request a 500), and the header's outer spaces are dropped on the way. Raises
    argparse.ArgumentTypeError."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    if not all(" " <= c <= "~" for c in text) or text != text.strip():
        raise argparse.ArgumentTypeError(
            "must be printable ASCII with no space at either end (an HTTP header carries it)"
        )
    return text
