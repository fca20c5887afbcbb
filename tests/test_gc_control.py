"""--gc-interval: Python's collector runs on a schedule while training, and is left as it was found afterwards."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from phi3v_tune.config import TrainConfig
from phi3v_tune.data.synthetic import demo_split, write_jsonl
from phi3v_tune.train.callbacks import ScheduledGC
from phi3v_tune.train.gc_control import collector_restored
from phi3v_tune.train.run import run_training


class FullCollections:
    """Counts full (generation 2) collections while active, and whether automatic collection was on at each."""

    def __init__(self):
        self.count = 0

    def __call__(self, phase, info):
        if phase == "start" and info["generation"] == 2:
            self.count += 1

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)


class State:
    global_step = 0


def test_collects_every_interval_steps_with_automatic_collection_off():
    cb, state = ScheduledGC(3), State()
    assert gc.isenabled()
    cb.on_train_begin(None, state, None)
    try:
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        with FullCollections() as full:
            for step in range(1, 8):
                state.global_step = step
                cb.on_step_end(None, state, None)
        assert full.count == 2 and cb.collections == 2  # steps 3 and 6
        with FullCollections() as full:
            cb.on_evaluate(None, state, None)
        assert full.count == 1  # evaluation's leftovers are collected right after it
    finally:
        cb.on_train_end(None, state, None)
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_resumed_run_freezes_what_its_first_step_compiled():
    """Resumed at step 50, the first step is 51: what it created (compiled graphs) is frozen out of the scans too."""
    cb, state = ScheduledGC(100), State()
    cb.on_train_begin(None, state, None)
    try:
        frozen = gc.get_freeze_count()
        made_by_the_first_step = [[i] for i in range(100)]
        state.global_step = 51
        cb.on_step_end(None, state, None)
        assert gc.get_freeze_count() >= frozen + len(made_by_the_first_step)
    finally:
        cb.on_train_end(None, state, None)
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_interval_must_be_positive_and_config_rejects_negative():
    with pytest.raises(ValueError, match="positive number of steps"):
        ScheduledGC(0)
    with pytest.raises(ValueError, match="--gc-interval must be >= 0"):
        TrainConfig(data="x.jsonl", model="tiny", gc_interval=-1).validate()


def test_collector_restored_after_an_exception():
    with pytest.raises(RuntimeError):
        with collector_restored():
            gc.freeze()
            gc.disable()
            raise RuntimeError("training stopped")
    assert gc.isenabled() and gc.get_freeze_count() == 0


def train_tiny(tmp_path: Path, per_task: int, tasks: tuple[str, ...], **settings) -> dict:
    """4 steps of the tiny model on CPU with --gc-interval 2; the run's metrics."""
    train, _ = demo_split(per_task, 1, seed=5, tasks=tasks, as_png=True)
    data = write_jsonl(train, tmp_path / "data")
    cfg = TrainConfig(
        data=str(data), model="tiny", num_crops=1, output_dir=str(tmp_path / "out"), max_steps=4, report_to="none",
        num_workers=0, progress=False, cpu=True, save_checkpoints=False, gc_interval=2, **settings,
    )  # fmt: skip
    return run_training(cfg)


def test_training_runs_scheduled_collections_and_restores_the_collector(tmp_path: Path):
    with FullCollections() as full:
        metrics = train_tiny(tmp_path, 2, ("colour",), batch_size=1, logging_steps=1)
    assert metrics["train"]["train_loss"] > 0
    assert full.count >= 2  # steps 2 and 4 (plus the one at the start of training)
    assert gc.isenabled() and gc.get_freeze_count() == 0


class TensorsInCycles(ScheduledGC):
    """ScheduledGC whose collections keep what they find (gc.DEBUG_SAVEALL) and count the tensors among it."""

    def __init__(self, interval: int):
        super().__init__(interval)
        self.found: list[tuple[int, int]] = []  # (step, tensors found only by the collector)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.interval:
            return
        import torch

        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
        finally:
            gc.set_debug(0)
        tensors = 0
        for obj in gc.garbage:
            try:
                tensors += isinstance(obj, torch.Tensor)
            except ReferenceError:  # a dead weak proxy
                pass
        gc.garbage.clear()
        self.found.append((state.global_step, tensors))


@pytest.mark.parametrize(
    "setting",
    [
        dict(method="full", gradient_checkpointing=True, batch_size=2, batch_size_per_device=2),
        dict(method="lora", lora_rank=4, gradient_checkpointing=True, checkpointing_layers=1, batch_size=2,
             batch_size_per_device=2),
        dict(method="freeze-vision", batch_size=2, batch_size_per_device=1),
    ],
    ids=["full-checkpointed-packed", "lora-selective-packed", "freeze-vision-accumulated"],
)  # fmt: skip
def test_training_steps_leave_no_tensors_in_reference_cycles(tmp_path: Path, monkeypatch, setting):
    """With automatic collection off, memory held in reference cycles waits for the next scheduled collection: no
    training step may leave a tensor (activations, gradients) reachable only through a cycle."""
    import phi3v_tune.train.run as run

    made: list[TensorsInCycles] = []

    def make(interval: int) -> TensorsInCycles:
        made.append(TensorsInCycles(interval))
        return made[-1]

    monkeypatch.setattr(run, "ScheduledGC", make)  # the run's garbage-collection callback
    train_tiny(tmp_path, 4, ("colour", "compare"), logging_steps=2, **setting)
    assert made and made[0].found == [(2, 0), (4, 0)]
