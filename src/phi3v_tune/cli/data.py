"""Commands about data: `validate` (every problem of a data set at once) and `convert` (public data sets -> the
conversations jsonl)."""

from __future__ import annotations

import argparse

from .args import add_data_arguments, field_option


def cmd_validate(args: argparse.Namespace) -> int:
    from ..data import SampleLayout, validate_path

    report = validate_path(
        args.data,
        image_dir=args.image_dir,
        split=args.split,
        max_image_pixels=args.max_image_pixels,
        layout=SampleLayout(multi_turn=args.multi_turn, video_frames=args.video_frames),
        answers_required=args.purpose != "predict",
        # train: what the data holds (preference pairs are checked as for dpo); the others say what they need
        objective={"train": None, "dpo": "dpo"}.get(args.purpose, "sft"),
    )
    print(report.format())
    if args.purpose != "predict" and missing_answers_only(report.problems):
        print("(every problem is a missing answer: for prompts to answer, check them with --for predict, as "
              "predict --data reads them)")  # fmt: skip
    return 0 if report.ok else 1


def missing_answers_only(problems) -> bool:
    """Problems that all say a turn has no answer: a file of prompts, most likely."""
    return bool(problems) and all(p.field.endswith(".assistant") and p.message.startswith("missing") for p in problems)


def cmd_convert(args: argparse.Namespace) -> int:
    if args.kind == "ucf101":
        from ..data.convert import convert_ucf101

        files = convert_ucf101(args.src, args.out, video_frames=args.video_frames)
    else:
        from ..data.convert import convert_cauldron

        files = convert_cauldron(args.src, args.out, split=args.split)
    for f in files:
        print(f)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="check a data set without training and report every problem",
        description="Check a data set (jsonl, json, HF data set) and report every problem at once: "
        "file:line, id, field, what was expected. Exit code 1 when problems exist.",
    )
    p.add_argument("data", help="A conversations .jsonl/.json file, a local HF data set folder, or a hub id.")
    add_data_arguments(p)
    field_option(p, "max_image_pixels")
    field_option(p, "video_frames")
    p.add_argument(
        "--for",
        dest="purpose",
        choices=("train", "eval", "predict", "dpo"),
        default="train",
        help="What the data is for: train and eval need every answer; predict accepts samples whose last turn has "
        "no answer, as predict --data does; dpo needs preference pairs (the last turn's 'chosen' and 'rejected' "
        "answers, non-empty and different), as train --objective dpo does. train checks a data set of preference "
        "pairs as dpo does (default: train).",
    )
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "convert",
        help="convert a data set to the conversations jsonl (ucf101 videos, the_cauldron)",
        description="ucf101: {split}/{class}/*.avi (or UCF101_subset.tar.gz) -> frames per video as "
        "images/{split}/{class}/{video}.{k}.jpg + ucf101_{split}.jsonl, the original recipe's layout (ids counted "
        "across train, val, test; one class list for all splits). cauldron: any the_cauldron-"
        "style table -> {split}.jsonl + image files.",
    )
    p.add_argument("kind", choices=["ucf101", "cauldron"], help="What to convert.")
    p.add_argument("--src", required=True, help="Source folder (or .tar.gz for ucf101, HF data set for cauldron).")
    p.add_argument("--out", required=True, help="Output folder.")
    field_option(p, "video_frames")
    field_option(p, "split")
    p.set_defaults(func=cmd_convert)
