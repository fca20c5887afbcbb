"""The recipe's metrics on hand-made cases."""

from __future__ import annotations

import pytest

from phi3v_tune.evaluate.metrics import accuracy, anls, anls_score, is_correct, levenshtein


def test_levenshtein_unit_costs_over_code_points():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("é", "e") == 1


def test_anls_exact_partial_threshold_and_empty():
    assert anls_score("Paris", ["Paris"]) == 1.0
    assert anls_score("Pari", ["Paris"]) == pytest.approx(1 - 1 / 5)
    # NL = 0.5 exactly is not < 0.5 -> 0
    assert anls_score("ab", ["ac"]) == 0.0
    # NL just under 0.5 scores
    assert anls_score("abc", ["abd"]) == pytest.approx(1 - 1 / 3)
    assert anls_score("", ["x"]) == 0.0
    assert anls_score("  ..  ", ["x"]) == 0.0  # empty after normalisation


def test_anls_is_case_sensitive_and_strips_whitespace_then_dots():
    assert anls_score("paris", ["Paris"]) == pytest.approx(0.8)
    assert anls_score("  Paris. ", ["Paris"]) == 1.0
    assert anls_score(". Paris", ["Paris"]) == pytest.approx(1 - 1 / 6)  # ". Paris".strip('.') keeps the space


def test_anls_takes_the_best_gold_and_averages_questions():
    assert anls_score("1,000", ["1000", "1,000"]) == 1.0
    assert anls(["a", "Paris"], [["b"], ["Paris", "paris"]]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        anls(["a"], [])


def test_accuracy_normalises_case_dots_and_whitespace():
    assert is_correct(" Yes.", "yes")
    assert not is_correct("yes no", "yes")
    assert accuracy(["A", "b", "c."], ["a", "B", "d"]) == pytest.approx(2 / 3)


def test_metric_registry_scores_corpora_and_single_questions():
    """`METRICS` is the one list of metric names (the --metric choices); each entry scores a corpus, and a question
    scored alone (`score`, the per-sample rows of eval) gives the same numbers whose mean is the corpus score."""
    from phi3v_tune.evaluate.metrics import METRICS, score

    assert tuple(METRICS) == ("anls", "accuracy")
    predictions = ["Paris", "1,000", "no."]
    golds = [["paris", "Paris"], ["1000"], ["No", "nope"]]
    assert METRICS["accuracy"](predictions, golds) == pytest.approx(2 / 3)  # any gold counts; "1,000" != "1000"
    assert METRICS["anls"](predictions, golds) == pytest.approx((1 + 0.8 + 0) / 3)  # "no" vs "No": case counts
    for name, corpus in METRICS.items():
        rows = [score(name, p, g) for p, g in zip(predictions, golds)]
        assert sum(rows) / len(rows) == pytest.approx(corpus(predictions, golds))
    assert score("accuracy", "Yes.", "yes") == 1.0  # one gold answer may be a plain string
    with pytest.raises(ValueError, match="unknown metric 'bleu'; known: anls, accuracy"):
        score("bleu", "a", ["a"])
