"""`phi3v-tune bench`: training throughput of ours against a plain Hugging Face build on this machine's GPU."""

from __future__ import annotations

import argparse
import sys

from ..perf.options import add_arguments, check

DESCRIPTION = (
    "Training throughput on one GPU: phi3v-tune's training path against a plain Hugging Face build, on a full-size "
    "Phi-3.5-vision with random weights (real speed, no download), at the DocVQA shape (one page, 16 crops, ~2.4k "
    "tokens) and a short hateful-memes-like shape (4 crops, a few hundred tokens). Per row: images/s, tokens/s, "
    "model TFLOP/s and utilisation of this card's measured matmul rate, peak GPU memory, and the share of time the "
    "GPU waits for data."
)


def cmd_bench(args: argparse.Namespace) -> int:
    from ..perf.bench import run

    check(args)
    rows = run(args, command="phi3v-tune " + " ".join(sys.argv[1:]))
    failed = [f"{r.build} {r.method}" for r in rows if r.error]
    if failed:  # the table shows every row; the exit code says whether all of them ran
        print(f"error: {len(failed)} bench row(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="GPU training throughput: phi3v-tune vs a plain Hugging Face build",
                       description=DESCRIPTION)  # fmt: skip
    add_arguments(p)
    p.set_defaults(func=cmd_bench)
