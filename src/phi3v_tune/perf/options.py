"""The flags of `phi3v-tune bench` (and `benchmarks/bench_train.py`), defined once and importable without torch."""

from __future__ import annotations

import argparse

from ..config import METHODS
from .workloads import WORKLOADS

BUILDS = ("plain", "ours")
CHECKPOINTING = ("no", "yes", "false", "true", "0", "1")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"Strategies to measure, comma separated (default: {','.join(METHODS)}).",
    )
    ap.add_argument(
        "--workloads",
        default="docvqa,memes",
        help=f"Workloads, comma separated: {', '.join(WORKLOADS)} (default: docvqa,memes).",
    )
    ap.add_argument(
        "--builds",
        default="plain,ours",
        help="plain (a straightforward Hugging Face build: padded batch 1, no packing), ours, or both "
        "(default: plain,ours).",
    )
    ap.add_argument(
        "--checkpointing",
        default="no,yes",
        help="Activation checkpointing settings to measure, comma separated: no, yes (default: no,yes).",
    )
    ap.add_argument("--steps", type=int, default=8, help="Timed optimizer steps per row (default: 8).")
    ap.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="Untimed steps first (allocator, kernels, data workers); at least 1 (default: 3).",
    )
    ap.add_argument("--samples", type=int, default=64, help="Samples written per workload (default: 64).")
    ap.add_argument(
        "--short-batch", type=int, default=8, help="Samples per step on the short (memes) workload (default: 8)."
    )
    ap.add_argument(
        "--padded-too",
        default="full,lora",
        help="Methods also measured with padded batches on the short workload, the baseline of packing "
        "(default: full,lora).",
    )
    ap.add_argument(
        "--fixed-plain",
        action="store_true",
        help="Also time the plain full row at a fixed 17-crop, 2560-token sample (default: off).",
    )
    ap.add_argument(
        "--tuned",
        action="store_true",
        help="Our DocVQA rows use the fastest settings recorded for each method within the plain build's memory "
        "(two packed documents per forward pass, some layers checkpointed, ...); each row's notes list the "
        "settings (default: off).",
    )
    ap.add_argument("--work", default="/tmp/phi3v-bench", help="Where data and runs go (default: /tmp/phi3v-bench).")
    ap.add_argument(
        "--model-dir",
        default="/dev/shm/phi3v-random",
        help="The full-size random-weight checkpoint, written if missing (default: /dev/shm/phi3v-random).",
    )
    ap.add_argument("--json", default=None, help="Also append every row as a JSON line to this file (default: none).")
    ap.add_argument(
        "--results",
        default=None,
        help="Append the markdown table to this file, e.g. benchmarks/RESULTS.md (default: none).",
    )
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="Run on the CPU with a tiny model: checks the benchmark itself, measures nothing useful; rows that "
        "need a GPU (qlora) are skipped and named (default: off).",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="A training setting for our rows, as in a YAML recipe (repeatable), e.g. --set compile=true "
        "(default: none).",
    )


def check(args: argparse.Namespace) -> None:
    """Refuse unknown names and impossible counts (ValueError, before anything is measured)."""
    for name, given, known in (
        ("--methods", args.methods, METHODS),
        ("--workloads", args.workloads, tuple(WORKLOADS)),
        ("--builds", args.builds, BUILDS),
        ("--checkpointing", args.checkpointing, CHECKPOINTING),
    ):
        unknown = [x for x in given.split(",") if x not in known]
        if unknown:
            raise ValueError(f"{name}: unknown {', '.join(unknown)} (expected some of {', '.join(known)})")
    if args.warmup < 1 or args.steps < 1:
        raise ValueError(
            "--warmup and --steps must be at least 1 (the timed window starts after a synchronised warm-up step)"
        )
