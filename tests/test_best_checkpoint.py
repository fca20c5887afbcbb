"""The best checkpoint (--keep-best, --best-by) and early stopping (--early-stopping-patience)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import TINY_CPU_FLAGS, cpu_env
from safetensors.torch import load_file
from test_train import data_file, small_config  # noqa: F401  (fixture and helper)

from phi3v_tune.config import TrainConfig
from phi3v_tune.train.run import run_training


def losses(metrics: dict) -> dict[int, float]:
    return {e["step"]: e["eval_loss"] for e in metrics["log_history"] if "eval_loss" in e and e["step"] > 0}


def test_keep_best_by_loss_keeps_the_lowest_evaluation_loss(data_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    metrics = run_training(
        small_config(
            data_file,
            out,
            max_steps=6,
            eval_holdout=2,
            eval_steps=2,
            save_steps=2,
            best_by="loss",
            keep_best=True,
            save_total_limit=1,
        )  # fmt: skip
    )
    scores = losses(metrics)
    best_step = min(scores, key=lambda s: (scores[s], s))
    saved = json.loads((out / "best" / "best.json").read_text())
    assert saved == {"step": best_step, "eval_loss": scores[best_step]}
    assert metrics["best"]["step"] == best_step
    # best/ is that step's model, in the published layout with its processor and settings
    assert (out / "best" / "checkpoint_complete.json").is_file() and (out / "best" / "tokenizer.json").is_file()
    if best_step == 6:
        expected = load_file(out / "final" / "model.safetensors")
    else:  # that step's checkpoint is gone (--save-total-limit 1): the same run stopped there (same schedule)
        again = tmp_path / "again"
        run_training(small_config(data_file, again, max_steps=6, eval_holdout=2, stop_at_step=best_step))
        expected = load_file(again / f"checkpoint-{best_step}" / "model.safetensors")
    got = load_file(out / "best" / "model.safetensors")
    assert got.keys() == expected.keys()
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-6"]  # rotation never touches best/
    assert f"best loss: {scores[best_step]:.4f} at step {best_step}" in capsys.readouterr().out


def test_keep_best_is_on_by_default_with_a_metric_and_eval_steps():
    on = TrainConfig(data="x.jsonl", eval_data="y.jsonl", metric="accuracy", eval_steps=5)
    assert on.keeps_best() and on.best_key() == "eval_accuracy"
    assert not TrainConfig(data="x.jsonl", eval_data="y.jsonl", metric="accuracy").keeps_best()  # no eval steps
    assert not TrainConfig(data="x.jsonl", eval_data="y.jsonl", eval_steps=5).keeps_best()  # no metric
    assert TrainConfig(data="x.jsonl", eval_holdout=3, eval_steps=5, best_by="loss").keeps_best()
    assert not TrainConfig(
        data="x.jsonl", eval_data="y.jsonl", metric="anls", eval_steps=5, keep_best=False
    ).keeps_best()
    with pytest.raises(ValueError, match="set --metric, or --best-by loss"):
        TrainConfig(data="x.jsonl", eval_data="y.jsonl", eval_steps=5, keep_best=True).validate()
    with pytest.raises(ValueError, match="need evaluations during training: --eval-steps"):
        TrainConfig(data="x.jsonl", eval_data="y.jsonl", metric="anls", early_stopping_patience=2).validate()


def test_early_stopping_stops_when_the_score_plateaus(data_file, tmp_path, capsys):  # noqa: F811
    """Learning rate 0: the task metric never improves after the first evaluation (step 2), so with patience 2 the run
    stops at the second evaluation after it (step 6) of 20; final/ is the last state, best/ step 2's."""
    out = tmp_path / "plateau"
    metrics = run_training(
        small_config(
            data_file,
            out,
            max_steps=20,
            learning_rate=0.0,
            warmup_steps=0,
            eval_holdout=2,
            eval_steps=2,
            metric="accuracy",
            eval_max_new_tokens=2,
            early_stopping_patience=2,
            save_steps=100,
        )  # fmt: skip
    )
    assert metrics["steps"] == 6 and metrics["stopped_early_at_step"] == 6
    assert json.loads((out / "final" / "checkpoint_complete.json").read_text())["step"] == 6
    assert json.loads((out / "best" / "best.json").read_text())["step"] == 2
    # the run's last checkpoint is written where it stopped, as at a normal end (--resume continues from it)
    assert json.loads((out / "checkpoint-6" / "checkpoint_complete.json").read_text())["step"] == 6
    text = capsys.readouterr().out
    assert "stopped early at step 6: no improvement of eval_accuracy" in text and "--early-stopping-patience 2" in text
    assert "best accuracy:" in text and "at step 2" in text


def test_the_best_so_far_survives_a_kill_and_resume(data_file, tmp_path):  # noqa: F811
    """SIGKILL at step 5 (after the evaluation and checkpoint of step 4), then --resume: best/ holds the same step and
    weights as in the uninterrupted run."""
    env = cpu_env()

    def train(out: Path, fault: str | None = None, resume: bool = False) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "phi3v_tune", "train", *TINY_CPU_FLAGS, "--data", str(data_file), "--output-dir",
               str(out), "--max-steps", "8", "--batch-size", "2", "--save-steps", "2", "--seed", "3",
               "--learning-rate", "1e-3", "--warmup-steps", "1", "--eval-holdout", "2", "--eval-steps", "2",
               "--best-by", "loss", "--keep-best", *(["--resume"] if resume else [])]  # fmt: skip
        return subprocess.run(cmd, env={**env, **({"PHI3V_FAULT_INJECT": fault} if fault else {})},
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    straight = tmp_path / "straight"
    assert train(straight).returncode == 0
    killed = tmp_path / "killed"
    assert train(killed, "kill_at_step:5").returncode != 0
    assert (killed / "best" / "best.json").is_file() and not (killed / "final").exists()
    done = train(killed, resume=True)
    assert done.returncode == 0, done.stderr[-3000:]
    want = json.loads((straight / "best" / "best.json").read_text())
    assert json.loads((killed / "best" / "best.json").read_text()) == want
    a, b = load_file(straight / "best" / "model.safetensors"), load_file(killed / "best" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert f"at step {want['step']}" in done.stdout
