"""`phi3v-tune` command line: train | validate | export (merge) | demo | eval | predict | convert | bench."""

from __future__ import annotations

import argparse
import os
import sys


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import warnings

    warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated.*")
    warnings.filterwarnings("ignore", message=".*use_cache=True.*is incompatible with gradient checkpointing.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


# --------------------------------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from .train.config import resolve
    from .train.run import run_training

    cfg = resolve(args)
    run_training(cfg)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .data import validate_path

    report = validate_path(
        args.data,
        image_dir=args.image_dir,
        split=args.split,
        max_image_pixels=args.max_image_pixels,
        multi_turn=args.multi_turn,
        video_frames=args.video_frames,
    )
    print(report.format())
    return 0 if report.ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    from .train.export import export_model, report

    result = export_model(
        args.model,
        args.out,
        base=args.base,
        revision=args.revision,
        dtype=args.dtype,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        push_to_hub=args.push_to_hub,
        private=args.private,
    )
    print(report(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(
        output_dir=args.output_dir,
        train_per_task=args.train_per_task,
        eval_per_task=args.eval_per_task,
        epochs=args.epochs,
        seed=args.seed,
    )
    return 0 if result["passed"] or not args.strict else 1


# --------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .cli_extra import int_in
    from .train.config import add_arguments

    parser = argparse.ArgumentParser(
        prog="phi3v-tune",
        description="Fine-tune Phi-3.5-vision / Phi-3-vision on your own images, multi-image prompts and videos.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="fine-tune a model (full, freeze-vision, lora, qlora)",
        description="Fine-tune Phi-3(.5)-vision. Settings: defaults < --task < --config < flags.",
    )
    add_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "validate",
        help="check a data set without training and report every problem",
        description="Check a data set (jsonl, json, HF data set) and report every problem at once: "
        "file:line, id, field, what was expected. Exit code 1 when problems exist.",
    )
    p.add_argument("data", help="a conversations .jsonl/.json file, a local HF data set folder, or a hub id")
    p.add_argument(
        "--image-dir",
        help="folder that relative image paths are relative to (default: the data file's folder, then images/ below it)",
    )
    p.add_argument("--split", default="train", help="split of a HF data set (default: train)")
    p.add_argument(
        "--max-image-pixels",
        type=int_in(1),
        default=178956970,
        help="report images with more pixels than this (default: 178956970)",
    )
    from .data.examples import MULTI_TURN
    from .data.video import RECIPE_FRAMES

    p.add_argument(
        "--multi-turn",
        default="conversation",
        choices=MULTI_TURN,
        help="how image tags in multi-turn samples are numbered: across the conversation (default) or from 1 in "
        "every turn (the layout train --multi-turn recipe builds)",
    )
    p.add_argument(
        "--video-frames",
        type=int_in(1),
        default=RECIPE_FRAMES,
        help=f"frames sampled from a turn's video, as train --video-frames (default: {RECIPE_FRAMES}); they count as "
        "the turn's images when its image tags are checked",
    )
    p.set_defaults(func=cmd_validate)

    from .train.export import add_export_arguments

    p = sub.add_parser(
        "export",
        aliases=["merge"],
        help="turn a run's model into a serving folder (LoRA merged, published layout, bf16; alias: merge)",
        description="Write a run's model (OUTPUT_DIR or its final/, a checkpoint, a LoRA adapter + base, a model "
        "folder or hub id) as a folder that loads and serves like the published model: merged weights in the "
        "published layout and dtype (sharded safetensors + index), processor and tokenizer files, the publisher's "
        "remote-code files, a generation config that stops at <|end|>, the run's train_config.yaml and a model "
        "card README.md. Optionally uploads it to the Hugging Face hub.",
    )
    add_export_arguments(p)
    p.set_defaults(func=cmd_export)

    from .demo import DEFAULTS as DEMO_DEFAULTS

    p = sub.add_parser(
        "demo",
        help="the quick-start demo: fine-tune a tiny model on synthetic data (CPU, minutes)",
        description="Generates a synthetic multi-task data set (the colour of a shape in one image; which of two "
        "images shows the bigger shape; the colour a dot ends with in an 8-frame video) as a conversations jsonl "
        "with PNG files, trains a tiny randomly initialised Phi-3-vision on it and prints accuracy before and after "
        "on a held-out split. Writes the data, the final checkpoint, demo_metrics.json, predictions.jsonl, "
        "loss.png and tensorboard logs to --output-dir.",
    )
    p.add_argument("--output-dir", default="outputs/demo", help="where everything goes (default: outputs/demo)")
    p.add_argument(
        "--train-per-task",
        type=int_in(1),
        default=None,
        help=f"training samples per task (default: {DEMO_DEFAULTS['train_per_task']})",
    )
    p.add_argument(
        "--eval-per-task",
        type=int_in(1),
        default=None,
        help=f"held-out samples per task (default: {DEMO_DEFAULTS['eval_per_task']})",
    )
    p.add_argument("--epochs", type=float, default=None, help=f"training epochs (default: {DEMO_DEFAULTS['epochs']})")
    p.add_argument("--seed", type=int, default=0, help="random seed (data and model; default: 0)")
    p.add_argument(
        "--strict", action="store_true", help="exit with code 1 if a task ends below 90%% accuracy (default: exit 0)"
    )
    p.set_defaults(func=cmd_demo)

    from .cli_extra import register

    register(sub)
    sub.add_parser(
        "bench",
        help="GPU training throughput: phi3v-tune vs a plain Hugging Face build (see 'phi3v-tune bench --help')",
        add_help=False,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser (many flags, shared with benchmarks/bench_train.py)
        from .perf.bench import main as bench_main

        rows = bench_main(argv[1:])
        failed = [f"{r.build} {r.method}" for r in rows if r.error]
        if failed:  # the table shows every row; the exit code says whether all of them ran
            print(f"error: {len(failed)} bench row(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1 if failed else 0
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
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
