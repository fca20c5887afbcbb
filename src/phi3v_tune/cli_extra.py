"""Subcommands besides training: eval, predict, convert."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def int_in(low: int, high: int | None = None):
    """argparse type: an int in low..high (no upper bound when high is None), refused with the range otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"must be {'>= ' + str(low) if high is None else f'in {low}..{high}'}, got {value}"
            )
        return value

    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


def _dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def _init_distributed() -> tuple[int, int]:
    """Under torchrun: join the process group (gloo on CPU, nccl on GPUs) so evaluation is sharded."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return rank, world


def _device() -> torch.device:
    """The local rank's GPU under torchrun, else the CPU."""
    import os

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _load(args) -> tuple:
    from .model.loading import load_for_inference, load_processor, locate

    source = locate(args.model, args.base, args.revision)  # hub ids resolved once: weights and processor agree
    model = load_for_inference(source, dtype=_dtype(args.dtype), attn_implementation=args.attn_implementation)
    processor = load_processor(source, num_crops=args.num_crops, apply_exif_orientation=args.apply_exif_orientation)
    return model.to(_device()).eval(), processor


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="a full checkpoint folder, a LoRA adapter folder, or a hub id (downloaded once, or from the cache)",
    )
    p.add_argument("--base", help="base model folder or hub id of a LoRA adapter (default: the one it records)")
    p.add_argument("--revision", help="branch, tag or commit of a hub id given as --model or --base (default: main)")
    p.add_argument(
        "--num-crops", type=int_in(1, 16), default=None, help="HD crops per image (default: the model folder's)"
    )
    p.add_argument(
        "--apply-exif-orientation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rotate photos by their EXIF orientation tag, or not (default: as the model folder's processor says; "
        "off unless the model was trained with it, as the published processor ignores the tag)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="weights dtype (default: bf16 on GPUs that support it, else fp32)",
    )
    p.add_argument(
        "--attn-implementation", default="sdpa", choices=["sdpa", "eager"], help="attention kernels (default: sdpa)"
    )
    p.add_argument("--batch-size", type=int_in(1), default=8, help="prompts per generation batch (default: 8)")
    p.add_argument("--max-new-tokens", type=int_in(1), default=64, help="longest answer (default: 64, as the recipe)")
    p.add_argument(
        "--video-frames",
        type=int_in(1),
        default=None,
        help="frames sampled from a turn's video (default: what the model was trained with, from its "
        "train_config.yaml; 8 for other models)",
    )


# --------------------------------------------------------------------------------------------------------------------
def default_predictions_path(model: str, metric: str) -> Path:
    """Next to a local model folder (a trained run keeps its scores with it); here for a hub id or a folder that
    cannot be written, so eval never makes a `microsoft/...` tree in the working directory or fails at the end."""
    name = f"predictions-{metric}.jsonl"
    folder = Path(model)
    return folder / name if folder.is_dir() and os.access(folder, os.W_OK) else Path(name)


def trained_video_frames(model: str) -> int:
    """The --video-frames a model folder was trained with (its train_config.yaml, written by train), else the
    recipe's 8."""
    import yaml

    from .data.video import RECIPE_FRAMES

    path = Path(model) / "train_config.yaml"
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8")).get("video_frames")
    except (OSError, AttributeError, yaml.YAMLError):
        return RECIPE_FRAMES
    return value if isinstance(value, int) and value > 0 else RECIPE_FRAMES


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import DataError, load_records, validate_records
    from .evaluate.runner import evaluate_records, split_questions, write_rows

    if args.video_frames is None:
        args.video_frames = trained_video_frames(args.model)

    records, problems = load_records(args.data, image_dir=args.image_dir, split=args.split)
    # every problem (missing or broken images and videos included) before the model loads, not mid-way through generation
    problems = validate_records(
        records, problems, multi_turn=args.multi_turn, video_frames=args.video_frames, decode_videos=True
    )
    if problems:
        raise DataError(problems)
    records = split_questions(records, args.multi_turn, args.questions, args.video_frames)
    rank, world = _init_distributed()
    model, processor = _load(args)
    value, rows = evaluate_records(
        model,
        processor,
        records,
        args.metric,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        video_frames_per_clip=args.video_frames,
    )
    out = Path(args.output) if args.output else default_predictions_path(args.model, args.metric)
    if rank == 0:
        write_rows(rows, out)
        print(json.dumps({args.metric: value, "samples": len(rows), "predictions": str(out), "processes": world}))
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .data import DataError, Record, Turn, load_records, validate_records
    from .evaluate.generate import generate_answers
    from .evaluate.runner import write_rows

    if (args.data is None) == (args.prompt is None):
        raise ValueError("give either --prompt (with --image/--video) or --data")
    if args.video_frames is None:
        args.video_frames = trained_video_frames(args.model)
    if args.data:
        records, problems = load_records(args.data, image_dir=args.image_dir, split=args.split, answers_optional=True)
    else:
        turn = Turn(args.prompt, "", list(args.image or []), video=args.video)
        records = [Record("prompt", None, [turn], origin="--prompt")]
        problems = []
    problems = validate_records(
        records, problems, answers_required=False, video_frames=args.video_frames, decode_videos=True
    )
    if problems:
        raise DataError(problems)
    model, processor = _load(args)
    answers = generate_answers(
        model,
        processor,
        records,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        video_frames_per_clip=args.video_frames,
        progress=bool(args.data),
    )
    if args.data:
        out = Path(args.output or "predictions.jsonl")
        write_rows([{"id": r.id, "prediction": a} for r, a in zip(records, answers)], out)
        print(f"{len(answers)} predictions written to {out}")
    else:
        print(answers[0])
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    if args.kind == "ucf101":
        from .data.convert import convert_ucf101

        files = convert_ucf101(args.src, args.out, num_frames=args.num_frames)
    else:
        from .data.convert import convert_cauldron

        files = convert_cauldron(args.src, args.out, split=args.split)
    for f in files:
        print(f)
    return 0


# --------------------------------------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score a model on a data set (ANLS or accuracy) by greedy generation",
        description="Greedy generation on every question of DATA (or each sample's first, --questions first), the "
        "task metric, and a per-sample predictions jsonl (id, prediction, gold, score). Runs sharded under torchrun.",
    )
    _model_args(p)
    p.add_argument("--data", required=True, help="evaluation data (jsonl, json, HF data set folder or hub id)")
    p.add_argument(
        "--image-dir",
        help="folder that relative image paths are relative to (default: the data file's folder, then images/ below it)",
    )
    p.add_argument("--split", default="test", help="split of a HF data set (default: test)")
    p.add_argument("--metric", required=True, choices=["anls", "accuracy"], help="anls (DocVQA) or accuracy")
    p.add_argument(
        "--output",
        help="predictions jsonl (default: MODEL/predictions-METRIC.jsonl when MODEL is a local folder you can write "
        "to, else predictions-METRIC.jsonl here)",
    )
    from .data.examples import MULTI_TURN
    from .evaluate.metrics import QUESTIONS

    p.add_argument(
        "--multi-turn",
        default="conversation",
        choices=MULTI_TURN,
        help="how image tags placed in multi-turn samples are numbered: across the sample (default) or from 1 in "
        "every turn (data written for train --multi-turn recipe); each scored question is asked on its own",
    )
    p.add_argument(
        "--questions",
        "--eval-questions",
        dest="questions",
        default="all",
        choices=QUESTIONS,
        help="which questions of a multi-question sample (the_cauldron rows) are scored: all (default), each on its "
        "own with the sample's images, or first (the recipe's NLVR2 and hateful-memes scripts)",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "predict",
        help="answer a prompt about images (or every sample of a data file)",
        description="Answer one prompt (--prompt with --image ... or --video) or every sample of "
        "--data (written to --output as jsonl).",
    )
    _model_args(p)
    p.add_argument("--image", action="append", help="an image file; repeat for several (tags are prepended)")
    p.add_argument("--video", help="a video file (frames are sampled)")
    p.add_argument("--prompt", help="the question")
    p.add_argument("--data", help="a data file to answer in batch instead of --prompt")
    p.add_argument(
        "--image-dir",
        help="folder that relative image paths in --data are relative to (default: the data file's folder, then images/ below it)",
    )
    p.add_argument("--split", default="test", help="split of a HF data set (default: test)")
    p.add_argument("--output", help="predictions jsonl for --data (default: predictions.jsonl)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "convert",
        help="convert a data set to the conversations jsonl (ucf101 videos, the_cauldron)",
        description="ucf101: {split}/{class}/*.avi (or UCF101_subset.tar.gz) -> 8 frames per video as "
        "images/{split}/{class}/{video}.{k}.jpg + ucf101_{split}.jsonl, the original recipe's layout (ids counted "
        "across train, val, test; one class list for all splits). cauldron: any the_cauldron-"
        "style table -> {split}.jsonl + image files.",
    )
    p.add_argument("kind", choices=["ucf101", "cauldron"], help="what to convert")
    p.add_argument("--src", required=True, help="source folder (or .tar.gz for ucf101, HF data set for cauldron)")
    p.add_argument("--out", required=True, help="output folder")
    from .data.video import RECIPE_FRAMES

    p.add_argument(
        "--num-frames",
        type=int_in(1),
        default=RECIPE_FRAMES,
        help=f"frames per video (ucf101; default: {RECIPE_FRAMES})",
    )
    p.add_argument("--split", default="train", help="split to convert (cauldron; default: train)")
    p.set_defaults(func=cmd_convert)
