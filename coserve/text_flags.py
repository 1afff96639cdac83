"""argparse types for the text flags that several commands take (a name, a key, a folder):
one check each, below the server and the bench, which are siblings and import neither the
other nor the commands above them."""

from __future__ import annotations

import argparse
import os
import re

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def nonempty(text: str) -> str:
    """A name, key or folder: an empty one (no client can send or match it; Path('') is the
    current folder, which nobody means) is refused. Raises argparse.ArgumentTypeError."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def api_key(text: str) -> str:
    """A key clients send in a header: nonempty, printable ASCII, no space at either end.
    Other characters no client sends as written (a byte that is not UTF-8 made every request
    a 500), and the header's outer spaces are dropped on the way. Raises
    argparse.ArgumentTypeError."""
    nonempty(text)
    if not all(" " <= c <= "~" for c in text) or text != text.strip():
        raise argparse.ArgumentTypeError(
            "must be printable ASCII with no space at either end (an HTTP header carries it)"
        )
    return text


def out_path(text: str) -> str:
    """A folder or file to write: nonempty, and with a '..' resolved first, as writing it
    would resolve it: making `a/new/..` makes `a/new` and then names `a`, so the checks would
    look at a place that does not exist and the run would write into `a`. Raises
    argparse.ArgumentTypeError."""
    nonempty(text)
    if ".." in text.split(os.sep):
        return os.path.realpath(text)
    return text


def device(text: str) -> str:
    """A device to serve on: auto, cpu, cuda or cuda:N (anything else torch would either
    refuse with its own list or take for a device this engine never runs on). Raises
    argparse.ArgumentTypeError."""
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError("expected auto, cpu, cuda or cuda:N")
    return text
