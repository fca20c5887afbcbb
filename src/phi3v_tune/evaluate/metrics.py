"""The original recipe's metrics: ANLS (DocVQA) and exact-match accuracy (classification tasks)."""

from __future__ import annotations

from collections.abc import Sequence

#: Which questions of a multi-question evaluation sample are scored (see `runner.split_questions`).
QUESTIONS = ("all", "first")


def normalize_prediction(text: str) -> str:
    """Whitespace, then dots, stripped at both ends (the recipe's `.strip().strip('.')`)."""
    return text.strip().strip(".")


def levenshtein(a: str, b: str) -> int:
    """Unit-cost edit distance over code points."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls_score(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """max over gold answers of (1 - NL if NL < threshold else 0), NL = lev / max(len); case-sensitive.

    The prediction is normalised with `.strip().strip('.')`; an empty prediction scores 0.
    """
    pred = normalize_prediction(prediction)
    if not pred:
        return 0.0
    best = 0.0
    for gold in answers:
        denom = max(len(pred), len(gold))
        nl = levenshtein(pred, gold) / denom if denom else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def anls(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean ANLS over questions."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    if not predictions:
        return 0.0
    return sum(anls_score(p, a) for p, a in zip(predictions, answers)) / len(predictions)


def is_correct(prediction: str, gold: str) -> bool:
    """`pred.strip().strip('.').lower() == gold.strip().strip('.').lower()`."""
    return normalize_prediction(prediction).lower() == normalize_prediction(gold).lower()


def accuracy(predictions: Sequence[str], golds: Sequence[str]) -> float:
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} answers")
    if not predictions:
        return 0.0
    return sum(is_correct(p, g) for p, g in zip(predictions, golds)) / len(predictions)


METRICS = {"anls": anls_score, "accuracy": lambda p, golds: float(any(is_correct(p, g) for g in golds))}


def score(metric: str, prediction: str, golds: Sequence[str]) -> float:
    """Per-sample score of `metric` ('anls' or 'accuracy')."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    return METRICS[metric](prediction, golds)
