"""Python's garbage collector on a schedule: every rank collects at the same optimizer steps (`ScheduledGC` in
train/callbacks.py drives it; this module holds the collector switches).

Why: a training process holds millions of long-lived Python objects (modules, parameters, torch.compile's graphs and
guards). Python's automatic collector scans all of them whenever its allocation counters say so, a pause of a few
hundred milliseconds that lands at a different step on every rank. Under data parallelism every rank then waits for
the paused one, so N ranks pay about N pauses. Here the objects alive once training runs (after the first step, which
compiles) are frozen out of the collector's scans (`gc.freeze`), automatic collection is off during training, and a
full collection runs every `interval` optimizer steps and after every evaluation, on all ranks at once. Reference
cycles are still freed, only later; memory held by tensors is freed by reference counting as before, so nothing
numeric changes.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


def restore(enabled: bool) -> None:
    """Frozen objects back under the collector's scans, and automatic collection on again if it was."""
    gc.unfreeze()
    if enabled:
        gc.enable()


@contextmanager
def collector_restored() -> Iterator[None]:
    """Leaves Python's collector as it was found even when training stops on an exception (`on_train_end` is then
    never called)."""
    was_enabled = gc.isenabled()
    try:
        yield
    finally:
        restore(was_enabled)
