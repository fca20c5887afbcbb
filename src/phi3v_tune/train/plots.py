"""`loss.png`: the training loss over optimizer steps and, as points, every evaluation (loss, task metric), from the
Trainer's log history."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # a figure of its own: no pyplot state, no window, no backend switch

#: Logged values drawn on the right-hand axis, as points: the task metrics (0..1).
SCORES = {"eval_anls": "ANLS", "eval_accuracy": "accuracy"}


def points(log_history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(h["step"], h[key]) for h in log_history if key in h and "step" in h]


def loss_figure(log_history: list[dict[str, Any]], title: str = "phi3v-tune") -> Figure:
    """Training loss as a line; evaluation loss and task metrics as markers (an evaluation is a measurement at one
    step, not a curve between two)."""
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.add_subplot()
    train, evals = points(log_history, "loss"), points(log_history, "eval_loss")
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o", linestyle="None", label="eval loss", color="tab:orange")
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


def plot_losses(log_history: list[dict[str, Any]], path: str | Path, title: str = "phi3v-tune") -> Path:
    fig = loss_figure(log_history, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
