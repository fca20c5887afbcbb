"""`loss.png`: the training loss over optimizer steps and, as points, every evaluation (loss, task metric), from the
Trainer's log history; preference tuning adds a panel with the reward margin (training line, evaluation points)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # a figure of its own: no pyplot state, no window, no backend switch

#: Logged values drawn on the right-hand axis, as points: the task metrics (0..1).
SCORES = {"eval_anls": "ANLS", "eval_accuracy": "accuracy"}


def points(log_history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(h["step"], h[key]) for h in log_history if key in h and "step" in h]


#: The reward margin of preference tuning (DPO): logged while training and by evaluation.
MARGINS = ("rewards/margins", "eval_rewards/margins")


def loss_figure(log_history: list[dict[str, Any]], title: str = "phi3v-tune") -> Figure:
    """Training loss as a line; evaluation loss and task metrics as markers (an evaluation is a measurement at one
    step, not a curve between two); the reward margin, when logged, on an axis of its own below."""
    margins = [points(log_history, key) for key in MARGINS]
    fig = Figure(figsize=(7, 6.5 if any(margins) else 4), dpi=110)
    if any(margins):
        ax, below = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
        margin_panel(below, *margins)
    else:
        ax = fig.add_subplot()
    train, evals = points(log_history, "loss"), points(log_history, "eval_loss")
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o", linestyle="None", label="eval loss", color="tab:orange")
    if not any(margins):
        ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    scores = {name: points(log_history, key) for key, name in SCORES.items() if points(log_history, key)}
    if scores:
        right = ax.twinx()
        for (name, values), marker in zip(scores.items(), ("s", "^")):
            right.plot(*zip(*values), marker, linestyle="None", label=name, color="tab:green")
        right.set_ylabel("task metric")
        right.set_ylim(-0.02, 1.02)
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    if handles:
        ax.legend(handles, labels, loc="best")
    fig.tight_layout()
    return fig


def margin_panel(ax, train: list[tuple[int, float]], evals: list[tuple[int, float]]) -> None:
    """The reward margin (chosen minus rejected reward, per pair, averaged): a line while training, points for the
    evaluations, and the zero line where the two answers are not told apart."""
    if train:
        ax.plot(*zip(*train), label="reward margin", color="tab:purple")
    if evals:
        ax.plot(*zip(*evals), "D", linestyle="None", label="eval reward margin", color="tab:red")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward margin")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")


def plot_losses(log_history: list[dict[str, Any]], path: str | Path, title: str = "phi3v-tune") -> Path:
    fig = loss_figure(log_history, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
