"""Shorter runs of the demos: the tiny model must go from chance to well above it (SFT), and DPO must raise the
held-out reward accuracy from chance and move the greedy answers to the chosen ones."""

from __future__ import annotations

import json

import pytest
import torch

from phi3v_tune.train.demo import run_demo, run_dpo_demo


@pytest.fixture
def one_thread():
    """One intra-op thread: the tiny model's ops are small, and on a shared CPU two threads per process mostly wait for
    each other (the same run takes several times longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_short_demo_learns_the_colour_task(tmp_path, one_thread):
    result = run_demo(tmp_path / "demo", train_per_task=120, eval_per_task=12, epochs=4, quiet=True, tasks=("colour",))
    assert result["before"]["colour"] <= 0.5
    assert result["after"]["colour"] >= 0.75  # chance is 0.25
    saved = json.loads((tmp_path / "demo" / "demo_metrics.json").read_text())
    assert saved["after"] == result["after"]
    assert (tmp_path / "demo" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "demo" / "final" / "checkpoint_complete.json").is_file()
    assert len((tmp_path / "demo" / "predictions.jsonl").read_text().splitlines()) == 12


def test_short_dpo_demo_raises_reward_accuracy_and_moves_greedy_answers_to_the_chosen(tmp_path, one_thread, capsys):
    result = run_dpo_demo(tmp_path / "dpo", train_pairs=64, eval_pairs=16, sft_samples=32, quiet=True)
    accuracy, margin, greedy = result["reward_accuracy"], result["reward_margin"], result["greedy"]
    assert (accuracy["before"], margin["before"]) == (0.5, 0.0)  # before DPO every pair is a tie
    assert accuracy["after"] >= 0.8 and margin["after"] > 0
    assert greedy["after"]["chosen"] >= greedy["before"]["chosen"] + 0.3  # the greedy answers follow the chosen ones
    saved = json.loads((tmp_path / "dpo" / "demo_metrics.json").read_text())
    assert saved["reward_accuracy"] == accuracy
    assert (tmp_path / "dpo" / "dpo" / "loss.png").stat().st_size > 1000
    assert json.loads((tmp_path / "dpo" / "dpo" / "reference_logps.json").read_text())["eval"]  # precomputed, stored
    predictions = [json.loads(x) for x in (tmp_path / "dpo" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 16 and {"prediction", "chosen", "rejected"} <= set(predictions[0])
    # `eval` on the held-out pairs scores greedy answers against the chosen ones, as the demo's "greedy = chosen"
    from phi3v_tune.cli import main

    capsys.readouterr()
    held_out = str(tmp_path / "dpo" / "data" / "eval" / "data.jsonl")
    assert main(["eval", "--model", str(tmp_path / "dpo" / "dpo" / "final"), "--data", held_out, "--metric",
                 "accuracy", "--no-progress", "--output", str(tmp_path / "scored.jsonl")]) == 0  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("16 preference pairs: greedy answers are scored against the chosen answers")
    assert json.loads(lines[-1])["accuracy"] == greedy["after"]["chosen"]
