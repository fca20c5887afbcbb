"""`phi3v-tune` command line: one parser, one module per family of commands.

    train, merge, demo      cli/train.py
    eval, predict           cli/infer.py
    validate, convert       cli/data.py
    bench                   cli/bench.py

Building the parser imports no torch or transformers (`--help` answers at once); a command imports what it runs.
"""

from __future__ import annotations

import os
import sys
import warnings

from . import bench, data, infer, train
from .args import Parser

COMMANDS = (train, infer, data, bench)  # each registers its sub-commands


def build_parser() -> Parser:
    parser = Parser(
        prog="phi3v-tune",
        description="Fine-tune Phi-3.5-vision / Phi-3-vision on your own images, multi-image prompts and videos.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for module in COMMANDS:
        module.register(sub)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", message=".*use_cache=True.*is incompatible with gradient checkpointing.*")
    from transformers.utils import logging as hf_logging  # a command is about to run: transformers loads anyway

    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from ..model.auto import register_auto_classes  # what `import phi3v_tune` does outside the command line

    register_auto_classes()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, FloatingPointError, OSError) as err:
        if os.environ.get("PHI3V_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
