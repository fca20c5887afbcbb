"""A shorter run of the quick-start demo: the tiny model must go from chance to well above it."""

from __future__ import annotations

import json

from phi3v_tune.train.demo import run_demo


def test_short_demo_learns_the_colour_task(tmp_path):
    result = run_demo(tmp_path / "demo", train_per_task=120, eval_per_task=12, epochs=4, quiet=True, tasks=("colour",))
    assert result["before"]["colour"] <= 0.5
    assert result["after"]["colour"] >= 0.75  # chance is 0.25
    saved = json.loads((tmp_path / "demo" / "demo_metrics.json").read_text())
    assert saved["after"] == result["after"]
    assert (tmp_path / "demo" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "demo" / "final" / "checkpoint_complete.json").is_file()
    assert len((tmp_path / "demo" / "predictions.jsonl").read_text().splitlines()) == 12
