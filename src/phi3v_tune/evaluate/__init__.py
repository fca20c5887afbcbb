"""Evaluation: the recipe's metrics and batched greedy generation."""
