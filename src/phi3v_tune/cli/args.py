"""Every command-line flag defined once.

Training flags are the fields of `TrainConfig` (name, type, choices, help); the other commands build the flags they
share with training (`--image-dir`, `--split`, `--multi-turn`, `--video-frames`, `--num-crops`, `--metric`, ...) from
the same fields, so a flag means the same everywhere; only its default may differ, and its help then says so.
Flags of the inference commands (`eval`, `predict`) are defined here once for both.

This module and the parsers import no torch or transformers: `phi3v-tune --help` answers at once.
"""

from __future__ import annotations

import argparse
import difflib
from typing import Any

from ..config import FIELDS, base_type, default_note
from ..processing.geometry import TRAIN_NUM_CROPS

#: Hugging Face Trainer / script spellings users bring along, and names this tool used before.
HF_SPELLINGS = {
    "num-frames": "--video-frames",
    "batch-size": "--eval-batch-size (prompts per generation batch; --batch-size is training's global batch)",
    "learning_rate": "--learning-rate",
    "num_train_epochs": "--epochs",
    "per_device_train_batch_size": "--batch-size-per-device",
    "per_device_eval_batch_size": "--eval-batch-size",
    "gradient_accumulation_steps": "--batch-size (the global batch; accumulation follows from it)",
    "lr_scheduler_type": "--lr-scheduler",
    "model_name_or_path": "--model",
    "dataset_name": "--data",
    "train_file": "--data",
    "validation_file": "--eval-data",
    "eval_strategy": "--eval-steps",
    "evaluation_strategy": "--eval-steps",
    "resume_from_checkpoint": "--resume",
    "gradient_checkpointing_kwargs": "--checkpointing-scope / --checkpointing-layers",
    "use_peft": "--method lora",
    "lora_r": "--lora-rank",
}

#: Extra names of training flags (the flag's first name is the field's).
ALIASES = {"learning_rate": ("--lr",)}


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


def flag(name: str) -> str:
    """The command-line spelling of a setting: `video_frames` -> `--video-frames`."""
    return "--" + name.replace("_", "-")


#: The value types of fields whose flag takes a checked range instead of the bare type.
FIELD_TYPES: dict[str, Any] = {
    "num_crops": int_in(TRAIN_NUM_CROPS.start, TRAIN_NUM_CROPS.stop - 1),
    "video_frames": int_in(1),
    "max_image_pixels": int_in(1),
    "eval_batch_size": int_in(1),
    "eval_max_new_tokens": int_in(1),
}

_UNSET: Any = object()


def field_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    name: str,
    *names: str,
    default: Any = _UNSET,
    note: str | None = None,
    required: bool = False,
    dest: str | None = None,
) -> argparse.Action:
    """Add the flag of `TrainConfig` field `name` (type, choices, help from the field) to `parser`.

    `names`: the flag's spellings (default: the field's flag and its aliases). `default`: this command's default
    (default: the field's); `note`: how the help states it when it is not a plain value (e.g. "what the model was
    trained with"). Training passes `argparse.SUPPRESS`, so only flags given on the command line override a recipe.
    """
    f = FIELDS[name]
    names = names or (flag(name), *ALIASES.get(name, ()))
    value = f.default if default is _UNSET else default
    help_text = f.metadata.get("help", "")
    if required:
        help_text += " Required."
    elif note is not None:
        help_text += f" (default: {note})"
    elif value in (None, argparse.SUPPRESS) and f.default is None and "default_note" in f.metadata:
        help_text += f" (default: {f.metadata['default_note']})"  # a default no plain value states
    else:
        help_text += default_note(f.default if value is argparse.SUPPRESS else value, help_text)
    kwargs: dict[str, Any] = {"dest": dest or name, "help": help_text.replace("%", "%%")}
    if not required:
        kwargs["default"] = value
    else:
        kwargs["required"] = True
    tp = base_type(f.type)
    if tp is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = FIELD_TYPES.get(name, tp)
        for key in ("choices", "nargs", "const"):
            if key in f.metadata:
                kwargs[key] = f.metadata[key]
    return parser.add_argument(*names, **kwargs)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """`phi3v-tune train`: one flag per `TrainConfig` field, in the field's group; defaults are suppressed so that
    only flags given on the command line override `--task` and `--config`."""
    parser.add_argument("--config", help="YAML file with settings (flags given here override it).")
    add_task_argument(parser)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f in FIELDS.items():
        group = f.metadata.get("group", "other")
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        field_option(groups[group], name, default=argparse.SUPPRESS)


def add_task_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task",
        help="A packaged recipe (src/phi3v_tune/recipes: docvqa, hateful_memes, nlvr2, ucf101, dpo, demo, demo_dpo) "
        "whose settings "
        "come first: train takes all of them; eval its metric, held-out rows (--eval-holdout), multi-turn layout and "
        "questions, so eval --task T with the training data scores the rows train --task T held out.",
    )


def settings_given(args: argparse.Namespace) -> dict[str, Any]:
    """The training settings given on the command line (the others were suppressed)."""
    return {k: v for k, v in vars(args).items() if k in FIELDS}


# --------------------------------------------------------------------------------------------------------------------
# the flags eval and predict share (model loading and generation)
def add_model_source_arguments(parser: argparse.ArgumentParser, what: str, aliases: tuple[str, ...] = ()) -> None:
    """--model (what), --base and --revision: a model folder, a LoRA adapter and its base, or hub ids."""
    parser.add_argument(
        "--model", *aliases, dest="model", required=True, help=f"{what[0].upper()}{what[1:]}. Required."
    )
    parser.add_argument(
        "--base", help="Base model folder or hub id of a LoRA adapter (default: the one the adapter records)."
    )
    field_option(parser, "revision")


def add_inference_arguments(parser: argparse.ArgumentParser, *, task: bool = True) -> None:
    """The model and generation flags of eval and predict; `task`: the command takes --task (its recipe's settings
    are then defaults)."""
    add_model_source_arguments(
        parser,
        what="a full model folder (a run's final/, best/ or a checkpoint), a LoRA adapter folder, or a hub id "
        "(downloaded once, or taken from the cache)",
    )
    field_option(parser, "num_crops", default=None, note="the model folder's")
    field_option(parser, "apply_exif_orientation", default=None, note="as the model folder's processor says")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="Weights dtype (default: auto, bf16 on GPUs that support it, else fp32).",
    )
    field_option(parser, "attn_implementation")
    field_option(parser, "eval_batch_size")
    field_option(parser, "eval_max_new_tokens", "--max-new-tokens", "--eval-max-new-tokens", default=None,
                 note="the --task recipe's, else 64" if task else "64")  # fmt: skip
    field_option(
        parser, "video_frames", default=None, note="what the model was trained with (its train_config.yaml), else 8"
    )
    field_option(parser, "progress")


def add_data_arguments(
    parser: argparse.ArgumentParser, *, split: str | None = "train", multi_turn: bool = True
) -> None:
    """--image-dir, --split (this command's default; None: decided by the command) and --multi-turn, as training
    defines them."""
    field_option(parser, "image_dir")
    if split is None:
        field_option(parser, "split", default=None, note="train for --eval-holdout rows, else test")
    else:
        field_option(parser, "split", default=split)
    if multi_turn:
        field_option(parser, "multi_turn")


# --------------------------------------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse without prefix abbreviations (`--lr` must never silently become `--lr-scheduler`), and with
    "did you mean" for a misspelt flag or a Hugging Face spelling (`--learning_rate`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self._chosen_subparser(parsed)
            (command or self).error(unknown_message(extras, command or self))
        return parsed

    def error(self, message: str):  # type: ignore[override]
        """The error after a short usage: `train`'s full usage is some 80 lines, which would bury the message."""
        usage = self.format_usage()
        if usage.count("\n") > 6:
            usage = f"usage: {self.prog} [flags] (every flag: {self.prog} --help)\n"
        self.exit(2, f"{usage}{self.prog}: error: {message}\n")

    def _chosen_subparser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser | None:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = getattr(parsed, action.dest, None)
                return action.choices.get(chosen) if chosen else None
        return None


def known_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]


def unknown_message(extras: list[str], parser: argparse.ArgumentParser) -> str:
    """ "unrecognized arguments" with a suggestion per misspelt flag."""
    known = known_flags(parser)
    hints = []
    for token in extras:
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        key = name[2:]
        if key in HF_SPELLINGS:
            hints.append(f"{name}: did you mean {HF_SPELLINGS[key]}")
        elif "--" + key.replace("_", "-") in known:
            hints.append(f"{name}: did you mean --{key.replace('_', '-')}")
        else:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            if close:
                hints.append(f"{name}: did you mean {close[0]}")
    message = f"unrecognized arguments: {' '.join(extras)}"
    return message + ("\n  " + "\n  ".join(hints) if hints else "")
