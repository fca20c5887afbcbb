"""Python's garbage collector on a schedule: every rank collects at the same optimizer steps.

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

from transformers import TrainerCallback


class ScheduledGC(TrainerCallback):
    """Automatic garbage collection off while training; a full collection every `interval` optimizer steps."""

    def __init__(self, interval: int):
        if interval <= 0:
            raise ValueError(f"the garbage-collection interval must be a positive number of steps, got {interval}")
        self.interval = interval
        self.collections = 0  # scheduled collections run so far (what tests and logs read)
        self._was_enabled = True
        self._first_step_done = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._was_enabled = gc.isenabled()
        self._first_step_done = False
        gc.collect()
        gc.freeze()
        gc.disable()

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if not self._first_step_done:  # step 1, or the first step after a resume
            gc.freeze()  # the first step compiled the model: its graphs and guards live as long as the run
            self._first_step_done = True
        if step % self.interval == 0:
            gc.collect()
            self.collections += 1

    def on_evaluate(self, args, state, control, **kwargs):
        gc.collect()  # whatever evaluation (generation, KV caches) left in reference cycles, freed now, on every rank

    def on_train_end(self, args, state, control, **kwargs):
        restore(self._was_enabled)


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
