"""Python's cyclic garbage collector in a process that runs an engine's step loop.

A decode step of a batch of C sequences allocates a few container objects per sequence (its
`RequestOutput` and token list), so with the default thresholds (700, 10, 10) the collector
runs several young collections inside every large step, and now and then a full one, which
walks every object the process holds (the model's modules and parameters, the tokenizer,
torch's own): a pause of milliseconds to tens of milliseconds in the middle of a step, which
leaves the GPU idle and lands in the step-time tail. What an engine holds once it is built
and warm lives as long as the process, so it is frozen out of every collection, and young
collections become rare: a step's objects go when their last reference does, which needs
no collector (it only finds reference cycles)."""

from __future__ import annotations

import gc

# young collections only once this many more container objects were made than freed (a few
# steps' outputs at C=2048); older generations as rarely as bench/loadgen.py runs them
THRESHOLDS = (100_000, 50, 1000)
_DEFAULTS = gc.get_threshold()


def quiet_gc() -> None:
    """Collect once, freeze every object alive now out of later collections, and raise the
    thresholds. Call after the engine is built (and its CUDA graphs captured), before the
    step loop; it lasts for the rest of the process."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


def restore_gc() -> None:
    """Undo `quiet_gc` (a process that builds another engine after this one: what the frozen
    one held in reference cycles, CUDA memory included, is collectable again)."""
    gc.unfreeze()
    gc.set_threshold(*_DEFAULTS)
