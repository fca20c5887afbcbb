"""Subcommands that belong to later parts of the project (eval, predict, convert, bench)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Nothing yet: evaluation/prediction/conversion/benchmark commands register here."""
    return None
