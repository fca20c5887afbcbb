"""The original recipe's metrics: ANLS (DocVQA) and exact-match accuracy (classification tasks).

``METRICS`` is the one registry of metric names (the ``--metric`` choices): each maps to a corpus scoring function
``(predictions, golds) -> float`` where ``golds[i]`` holds the gold answers of question i (a list of strings, or one
string). A metric is the mean of its per-question score, so one question scored alone gives that question's score
(``score``). A new metric is one such function added to ``METRICS``. Pure Python: importing this loads no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def _gold_list(golds: str | Sequence[str]) -> Sequence[str]:
    """The gold answers of one question: a single string is one answer (not a sequence of characters)."""
    return [golds] if isinstance(golds, str) else golds


def anls(predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> float:
    """Mean ANLS over questions."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    if not predictions:
        return 0.0
    return sum(anls_score(p, _gold_list(a)) for p, a in zip(predictions, answers)) / len(predictions)


def is_correct(prediction: str, gold: str) -> bool:
    """The recipe's accuracy rule: `pred.strip().strip('.').lower() == gold.strip().strip('.').lower()`."""
    return normalize_prediction(prediction).lower() == normalize_prediction(gold).lower()


def accuracy(predictions: Sequence[str], golds: Sequence[str | Sequence[str]]) -> float:
    """Share of questions answered correctly (`is_correct` against the gold answer, or against any of them)."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} answers")
    if not predictions:
        return 0.0
    hits = sum(any(is_correct(p, g) for g in _gold_list(gold)) for p, gold in zip(predictions, golds))
    return hits / len(predictions)


#: Metric name -> corpus scoring function `(predictions, golds) -> float`; the keys are the `--metric` choices.
METRICS: dict[str, Callable[[Sequence[str], Sequence[str | Sequence[str]]], float]] = {
    "anls": anls,
    "accuracy": accuracy,
}


def score(metric: str, prediction: str, golds: str | Sequence[str]) -> float:
    """Score of one prediction under `metric` (a name of `METRICS`), against its gold answer(s)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    return METRICS[metric]([prediction], [golds])
