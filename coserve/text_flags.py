"""argparse types for the text flags that several commands take (a name, a key, a folder):
one check each, below the server and the bench, which are siblings and import neither the
other nor the commands above them."""

from __future__ import annotations

import argparse
import os
import re

# ASCII digits without a leading zero (torch refuses "cuda:01" and "cuda:\u0661")
_DEVICE = re.compile(r"auto|cpu|cuda(:(0|[1-9][0-9]*))?")
# torch keeps a device index in 8 bits: cuda:128 wraps to cuda:-128, cuda:256 to cuda:0
MAX_CUDA_INDEX = 127


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
    m = _DEVICE.fullmatch(text)
    index = m and m.group(2)
    if not m or (index and (len(index) > 3 or int(index) > MAX_CUDA_INDEX)):
        raise argparse.ArgumentTypeError(
            f"expected auto, cpu, cuda or cuda:N (N a GPU index, 0 to {MAX_CUDA_INDEX}), "
            f"got {text[:40]!r}{'...' if len(text) > 40 else ''}"
        )
    return text
