"""Commands that use a model: `eval` (the task metric on a data set) and `predict` (answers to a prompt or a file)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

from ..config import FIELDS, recipe, show_progress
from ..data.video import DEFAULT_VIDEO_FRAMES
from .args import add_data_arguments, add_inference_arguments, add_task_argument, field_option


def trained_video_frames(model: str) -> int:
    """The --video-frames a model folder was trained with (its train_config.yaml, written by train), else 8."""
    path = Path(model) / "train_config.yaml"
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8")).get("video_frames")
    except (OSError, AttributeError, yaml.YAMLError):
        return DEFAULT_VIDEO_FRAMES
    return value if isinstance(value, int) and value > 0 else DEFAULT_VIDEO_FRAMES


def default_predictions_path(model: str, metric: str) -> Path:
    """Next to a local model folder (a trained run keeps its scores with it); here for a hub id or a folder that
    cannot be written, so eval never makes a `microsoft/...` tree in the working directory or fails at the end."""
    name = f"predictions-{metric}.jsonl"
    folder = Path(model)
    return folder / name if folder.is_dir() and os.access(folder, os.W_OK) else Path(name)


def _init_distributed() -> tuple[int, int]:
    """Under torchrun: join the process group (gloo on CPU, nccl on GPUs) so evaluation is sharded."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return rank, world


def _load(args: argparse.Namespace):
    """(model on this process's device in eval mode, processor) for --model (+ --base, --revision): a hub id is
    resolved once, so weights and processor come from the same snapshot."""
    import torch

    from ..model.loading import load_for_inference, load_processor, locate

    if args.dtype == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    source = locate(args.model, args.base, args.revision)
    model = load_for_inference(source, dtype=dtype, attn_implementation=args.attn_implementation)
    processor = load_processor(source, num_crops=args.num_crops, apply_exif_orientation=args.apply_exif_orientation)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), processor


# --------------------------------------------------------------------------------------------------------------------
def eval_settings(args: argparse.Namespace) -> None:
    """Fill what was not given: from --task's recipe (the metric, the held-out rows, the layout and questions it
    trains and scores with), then the defaults. `eval --task T --data D` thus scores the rows `train --task T --data
    D` held out."""
    settings = recipe(args.task) if args.task else {}
    defaults = {name: FIELDS[name].default for name in ("metric", "eval_holdout", "multi_turn", "eval_max_new_tokens")}
    defaults["questions"] = FIELDS["eval_questions"].default
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setting = "eval_questions" if name == "questions" else name
            setattr(args, name, settings.get(setting, default))
    if args.metric is None:
        raise ValueError("eval needs --metric (anls or accuracy), or a --task whose recipe names one")
    if args.split is None:  # held-out rows come from the data train reads (its split); other data: a test split
        args.split = settings.get("split", "train") if args.eval_holdout else "test"
    if args.video_frames is None:
        args.video_frames = trained_video_frames(args.model)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from ..data import DataError, SampleLayout, load_records, validate_records
    from ..data.preference import PreferenceRecord
    from ..data.validate import objective_of
    from ..evaluate.runner import evaluate_records, split_questions, write_rows

    show_progress(args.progress)
    eval_settings(args)
    layout = SampleLayout(multi_turn=args.multi_turn, video_frames=args.video_frames)

    records, problems = load_records(args.data, image_dir=args.image_dir, split=args.split)
    if args.eval_holdout:
        held = records[: args.eval_holdout]
        problems = [p for p in problems if p.origin in {r.origin for r in held}] if held else problems
        print(f"evaluating the first {len(held)} of {len(records)} rows of {args.data} (--eval-holdout "
              f"{args.eval_holdout}: the rows training held out)", flush=True)  # fmt: skip
        records = held
    # preference pairs are scored as training's --metric scores them: greedy answers against the chosen answers
    objective = objective_of(records)
    # every problem (missing or broken images and videos included) before the model loads, not mid-way through generation
    problems = validate_records(records, problems, layout=layout, decode_videos=True, objective=objective)
    if problems:
        raise DataError(problems)
    if objective == "dpo":
        records = [PreferenceRecord.of(r).answered("chosen") for r in records]
        print(f"{len(records)} preference pairs: greedy answers are scored against the chosen answers (reward "
              "accuracy and margin come from training: train --objective dpo --eval-data)", flush=True)  # fmt: skip
    records = split_questions(records, layout, args.questions)
    rank, world = _init_distributed()
    model, processor = _load(args)
    value, rows = evaluate_records(
        model,
        processor,
        records,
        args.metric,
        batch_size=args.eval_batch_size,
        max_new_tokens=args.eval_max_new_tokens,
        video_frames=args.video_frames,
        progress=args.progress,
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
    from ..data import DataError, Record, SampleLayout, Turn, load_records, validate_records
    from ..evaluate.generate import generate_answers
    from ..evaluate.runner import write_rows

    if (args.data is None) == (args.prompt is None):
        raise ValueError("give either --prompt (with --image/--video) or --data")
    show_progress(args.progress)
    if args.video_frames is None:
        args.video_frames = trained_video_frames(args.model)
    if args.eval_max_new_tokens is None:
        args.eval_max_new_tokens = FIELDS["eval_max_new_tokens"].default
    if args.data:
        records, problems = load_records(args.data, image_dir=args.image_dir, split=args.split, answers_required=False)
    else:
        turn = Turn(args.prompt, "", list(args.image or []), video=args.video)
        records = [Record("prompt", None, [turn], origin="--prompt")]
        problems = []
    problems = validate_records(
        records,
        problems,
        answers_required=False,
        layout=SampleLayout(video_frames=args.video_frames),
        decode_videos=True,
    )
    if problems:
        raise DataError(problems)
    model, processor = _load(args)
    answers = generate_answers(
        model,
        processor,
        records,
        batch_size=args.eval_batch_size,
        max_new_tokens=args.eval_max_new_tokens,
        video_frames=args.video_frames,
        progress=bool(args.data) and args.progress,
    )
    if args.data:
        out = Path(args.output or "predictions.jsonl")
        write_rows([{"id": r.id, "prediction": a} for r, a in zip(records, answers)], out)
        print(f"{len(answers)} predictions written to {out}")
    else:
        print(answers[0])
    return 0


# --------------------------------------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score a model on a data set (ANLS or accuracy) by greedy generation",
        description="Greedy generation on every question of DATA (or each sample's first, --questions first), the "
        "task metric, and a per-sample predictions jsonl (id, prediction, gold, score). Runs sharded under torchrun.",
    )
    add_task_argument(p)
    add_inference_arguments(p)
    p.add_argument(
        "--data", required=True, help="Evaluation data (jsonl, json, HF data set folder or hub id). Required."
    )
    add_data_arguments(p, split=None, multi_turn=False)
    field_option(p, "multi_turn", default=None, note="the --task recipe's, else conversation")
    field_option(p, "eval_holdout", default=None, note="the --task recipe's, else 0: every row")
    field_option(p, "metric", default=None, note="the --task recipe's; required without --task")
    field_option(p, "eval_questions", "--questions", "--eval-questions", dest="questions", default=None,
                 note="the --task recipe's, else all")  # fmt: skip
    p.add_argument(
        "--output",
        help="Predictions jsonl (default: MODEL/predictions-METRIC.jsonl when MODEL is a local folder you can write "
        "to, else predictions-METRIC.jsonl here).",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "predict",
        help="answer a prompt about images (or every sample of a data file)",
        description="Answer one prompt (--prompt with --image ... or --video) or every sample of "
        "--data (written to --output as jsonl).",
    )
    add_inference_arguments(p)
    p.add_argument("--image", action="append", help="An image file; repeat for several (tags are prepended).")
    p.add_argument("--video", help="A video file (frames are sampled).")
    p.add_argument("--prompt", help="The question.")
    p.add_argument("--data", help="A data file to answer in batch instead of --prompt.")
    add_data_arguments(p, split="test", multi_turn=False)
    p.add_argument("--output", help="Predictions jsonl for --data (default: predictions.jsonl).")
    p.set_defaults(func=cmd_predict)
