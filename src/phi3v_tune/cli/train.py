"""Commands that make or ship a model: `train`, `export` (alias `merge`: a run's model -> a serving folder) and
the quick-start `demo`."""

from __future__ import annotations

import argparse
import sys

from ..config import resolve
from ..data.synthetic import DEMO_SIZES, DPO_DEMO_SIZES
from .args import add_model_source_arguments, add_train_arguments, field_option, int_in


def cmd_train(args: argparse.Namespace) -> int:
    from ..train.checkpoints import latest_complete
    from ..train.run import run_training

    cfg = resolve(args)
    try:
        run_training(cfg)
    except KeyboardInterrupt:
        last = latest_complete(cfg.output_dir)
        again = "phi3v-tune " + " ".join(a for a in sys.argv[1:] if a != "--resume") + " --resume"
        where = f"the last complete checkpoint is {last}" if last else "no checkpoint was written yet"
        print(f"\ninterrupted; {where}. Continue with:\n  {again}", file=sys.stderr)
        return 130
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..train.export import export_model, report

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
    from ..train.demo import run_demo, run_dpo_demo

    if args.objective == "dpo":
        result = run_dpo_demo(
            output_dir=args.output_dir or "outputs/demo-dpo",
            train_pairs=args.train_per_task,
            eval_pairs=args.eval_per_task,
            epochs=args.epochs,
            seed=args.seed,
        )
    else:
        result = run_demo(
            output_dir=args.output_dir or "outputs/demo",
            train_per_task=args.train_per_task,
            eval_per_task=args.eval_per_task,
            epochs=args.epochs,
            seed=args.seed,
        )
    return 0 if result["passed"] or not args.strict else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a model (full, freeze-vision, lora, qlora)",
        description="Fine-tune Phi-3(.5)-vision. Settings: defaults < --task < --config < flags.",
    )
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "export",
        aliases=["merge"],
        help="turn a run's model into a serving folder (LoRA merged, published layout, bf16; alias: merge)",
        description="Write a run's model (OUTPUT_DIR or its final/, best/, a checkpoint, a LoRA adapter + base, a "
        "model folder or hub id) as a folder that loads and serves like the published model: merged weights in the "
        "published layout and dtype (sharded safetensors + index), processor and tokenizer files, the publisher's "
        "remote-code files, a generation config that stops at <|end|>, the run's train_config.yaml and a model "
        "card README.md. Optionally uploads it to the Hugging Face hub.",
    )
    add_model_source_arguments(p, what="what to export: a run's OUTPUT_DIR (its final/), final/, best/, a checkpoint, "
                               "a LoRA adapter folder, a model folder or a hub id", aliases=("--adapter",))  # fmt: skip
    p.add_argument("--out", required=True, help="Output folder (written whole at the end). Required.")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="Weight dtype of the exported model (default: bfloat16, as published).",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="Largest safetensors file (default: 5GB, the published checkpoint's shards).",
    )
    p.add_argument("--overwrite", action="store_true", help="Replace --out if it exists (default: refuse).")
    p.add_argument(
        "--push-to-hub", metavar="REPO", help="Upload the folder to this hub model repo (needs a login; default: no)."
    )
    p.add_argument("--private", action="store_true", help="With --push-to-hub: create the repo as private.")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "demo",
        help="the quick-start demo: fine-tune a tiny model on synthetic data (CPU, minutes)",
        description="Generates a synthetic multi-task data set (the colour of a shape in one image; which of two "
        "images shows the bigger shape; the colour a dot ends with in an 8-frame video) as a conversations jsonl "
        "with PNG files, trains a tiny randomly initialised Phi-3-vision on it with the settings of the packaged "
        "recipe 'demo' (phi3v-tune train --task demo) and prints accuracy before and after on a held-out split. "
        "Writes the data, the final checkpoint, demo_metrics.json, predictions.jsonl, loss.png and tensorboard logs "
        "to --output-dir. --objective dpo: preference tuning instead: the tiny model is trained briefly on the "
        "colour task, then with DPO on preference pairs of the same task (chosen: the right colour, "
        "rejected: another one; recipe 'demo_dpo'); prints the held-out reward accuracy and margin and how often the "
        "greedy answer is the chosen one, before and after.",
    )
    field_option(p, "objective")  # sft: the quick-start demo; dpo: the preference-tuning demo
    p.add_argument(
        "--output-dir", help="Where everything goes (default: outputs/demo, or outputs/demo-dpo with --objective dpo)."
    )
    p.add_argument(
        "--train-per-task",
        type=int_in(1),
        default=None,
        help=f"Training samples per task (default: {DEMO_SIZES['train_per_task']}; dpo: training pairs, "
        f"{DPO_DEMO_SIZES['train_pairs']}).",
    )
    p.add_argument(
        "--eval-per-task",
        type=int_in(1),
        default=None,
        help=f"Held-out samples per task (default: {DEMO_SIZES['eval_per_task']}; dpo: held-out pairs, "
        f"{DPO_DEMO_SIZES['eval_pairs']}).",
    )
    p.add_argument("--epochs", type=float, default=None, help="Training epochs (default: the demo recipe's).")
    p.add_argument(
        "--seed", type=int, default=None, help="Random seed of the data and the model (default: the demo recipe's)."
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="Exit with code 1 if a task ends below 90%% accuracy (dpo: the reward accuracy below 90%%, or the greedy "
        "answers no closer to the chosen ones) (default: exit 0).",
    )
    p.set_defaults(func=cmd_demo)
