"""The quick-start demo: a tiny random Phi-3-vision learns three synthetic visual tasks (one image, two images,
an 8-frame video) on a CPU in a few minutes.

It exercises the real path end to end: a conversations jsonl with image files (written under the output folder so
you can look at the format), the validator, the HF-Trainer loop with checkpoints, batched greedy generation and the
recipe's accuracy metric before and after training.

The preference-tuning demo (`run_dpo_demo`, `phi3v-tune demo --objective dpo`): the tiny model is first trained
briefly on the colour task (it answers with a colour word, often the wrong one), then tuned with DPO on preference
pairs of the same task (chosen: the right colour, rejected: a wrong one; recipe `demo_dpo`); it prints the held-out
reward accuracy and margin and the greedy answers' accuracy before and after.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig, recipe
from ..data.synthetic import (
    CLASSES,
    DEMO_SIZES,
    DEMO_TASKS,
    DPO_DEMO_SIZES,
    demo_split,
    preference_pairs,
    write_jsonl,
)
from ..evaluate.generate import generate_answers
from ..evaluate.metrics import is_correct
from ..model.modeling import Phi3VForCausalLM
from ..processing.processor import Phi3VProcessor
from .run import TrainingRun, ensure_base_model


def per_task_accuracy(records, answers) -> dict[str, float]:
    hits: dict[str, list[bool]] = defaultdict(list)
    for rec, ans in zip(records, answers):
        hits[rec.source].append(is_correct(ans, rec.turns[-1].assistant))
    return {task: sum(v) / len(v) for task, v in sorted(hits.items())}


def evaluate(model_dir: Path, records, label: str) -> tuple[dict[str, float], list[str]]:
    model = Phi3VForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    processor = Phi3VProcessor.from_pretrained(model_dir)
    answers = generate_answers(model, processor, records, batch_size=8, max_new_tokens=4, desc=f"evaluating ({label})")
    return per_task_accuracy(records, answers), answers


def demo_config(
    output_dir: Path, train_file: Path, eval_file: Path | None, task: str = "demo", **overrides: Any
) -> TrainConfig:
    """The packaged recipe `task` (`demo`, `demo_dpo`) with this demo's files and folder (and --seed / --epochs when
    given)."""
    settings = recipe(task)
    settings.update(data=str(train_file), eval_data=str(eval_file) if eval_file else None, output_dir=str(output_dir))
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**settings).validate()


def run_demo(
    output_dir: str | Path = "outputs/demo",
    train_per_task: int | None = None,
    eval_per_task: int | None = None,
    epochs: float | None = None,
    seed: int | None = None,
    quiet: bool = False,
    tasks: tuple[str, ...] = DEMO_TASKS,
) -> dict[str, Any]:
    """Generate data, evaluate, train (recipe `demo`), evaluate; print a before/after table; return the metrics."""
    started = time.time()
    out = Path(output_dir)
    n_train = train_per_task or DEMO_SIZES["train_per_task"]
    n_eval = eval_per_task or DEMO_SIZES["eval_per_task"]
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))

    data_seed = seed if seed is not None else recipe("demo").get("seed", 0)
    train, held_out = demo_split(n_train, n_eval, seed=data_seed, tasks=tasks, as_png=True)
    train_file = write_jsonl(train, out / "data" / "train")
    eval_file = write_jsonl(held_out, out / "data" / "eval")
    say(f"demo data: {len(train)} training and {len(held_out)} held-out samples in {train_file.parent.parent}")
    say("tasks: " + "; ".join(f"{t} ({'/'.join(CLASSES[t])})" for t in tasks))

    # the demo writes everything anew each time: a previous demo run in the folder is replaced
    cfg = demo_config(
        out, train_file, eval_file, seed=seed, epochs=epochs, progress=not quiet, overwrite_output_dir=True
    )
    base = ensure_base_model(cfg.model, out, seed=cfg.seed, num_crops=cfg.num_crops)  # the run trains this folder
    before, _ = evaluate(Path(base), held_out, "before")
    metrics = TrainingRun(cfg).setup().train()
    after, answers = evaluate(out / "final", held_out, "after")

    chance = {t: 1 / len(CLASSES[t]) for t in before}
    say("\naccuracy on the held-out split (greedy generation, exact match):")
    say(f"  {'task':<10}{'chance':>8}{'before':>8}{'after':>8}")
    for task in before:
        say(f"  {task:<10}{chance[task]:>8.0%}{before[task]:>8.0%}{after[task]:>8.0%}")
    passed = all(v >= 0.9 for v in after.values())
    result = {
        "before": before,
        "after": after,
        "chance": chance,
        "passed": passed,
        "seconds": round(time.time() - started, 1),
        "train": metrics.get("train", {}),
        "final_dir": str(out / "final"),
        "loss_plot": str(out / "loss.png"),
    }
    (out / "demo_metrics.json").write_text(json.dumps(result, indent=2))
    with open(out / "predictions.jsonl", "w") as f:
        for rec, ans in zip(held_out, answers):
            f.write(
                json.dumps(
                    {
                        "id": rec.id,
                        "prediction": ans,
                        "gold": rec.turns[-1].assistant,
                        "score": float(is_correct(ans, rec.turns[-1].assistant)),
                    }
                )
                + "\n"
            )
    say(f"\n{'all tasks >= 90%' if passed else 'some task below 90%'}; took {result['seconds']:.0f} s")
    say(f"checkpoint: {out / 'final'}\nloss plot: {out / 'loss.png'}\nmetrics: {out / 'demo_metrics.json'}")
    return result


# --------------------------------------------------------------------------------------------------------------------
DPO_DEMO_TASK = "colour"
#: Epochs of the first stage (the `demo` recipe otherwise): enough to answer with a colour word, not to be right.
SFT_STAGE_EPOCHS = 2.0


def greedy_scores(model_dir: Path, pairs, label: str) -> tuple[dict[str, float], list[str]]:
    """Greedy answers to the pairs' prompts: the share equal to the chosen answer and to the rejected one."""
    _, answers = evaluate(model_dir, pairs, label)
    last = [p.turns[-1] for p in pairs]
    chosen = sum(is_correct(a, t.chosen) for a, t in zip(answers, last)) / len(pairs)
    rejected = sum(is_correct(a, t.rejected) for a, t in zip(answers, last)) / len(pairs)
    return {"chosen": chosen, "rejected": rejected}, answers


def run_dpo_demo(
    output_dir: str | Path = "outputs/demo-dpo",
    train_pairs: int | None = None,
    eval_pairs: int | None = None,
    sft_samples: int | None = None,
    epochs: float | None = None,
    seed: int | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Brief SFT on the colour task (recipe `demo`), then DPO on colour pairs (recipe `demo_dpo`); print and return
    the held-out reward accuracy and margin and the greedy answers' agreement with the chosen answer, before and
    after DPO."""
    started = time.time()
    out = Path(output_dir)
    sizes = {**DPO_DEMO_SIZES}
    sizes.update({k: v for k, v in (("train_pairs", train_pairs), ("eval_pairs", eval_pairs),
                                    ("sft_samples", sft_samples)) if v})  # fmt: skip
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    data_seed = seed if seed is not None else recipe("demo_dpo").get("seed", 0)
    tasks = (DPO_DEMO_TASK,)

    # stage 1: the SFT demo recipe on a few colour samples, briefly: the model answers with a colour word
    sft_train, _ = demo_split(sizes["sft_samples"], 0, seed=data_seed + 1, tasks=tasks, as_png=True)
    sft_file = write_jsonl(sft_train, out / "data" / "sft")
    pairs_train, pairs_eval = demo_split(sizes["train_pairs"], sizes["eval_pairs"], seed=data_seed, tasks=tasks,
                                         as_png=True)  # fmt: skip
    train_file = write_jsonl(preference_pairs(pairs_train, seed=data_seed), out / "data" / "train")
    held_out = preference_pairs(pairs_eval, seed=data_seed)
    eval_file = write_jsonl(held_out, out / "data" / "eval")
    say(f"demo data: {len(sft_train)} SFT samples, {len(pairs_train)} training and {len(held_out)} held-out "
        f"preference pairs in {out / 'data'} (chosen: the shape's colour, rejected: another colour)")  # fmt: skip
    sft_cfg = demo_config(out / "sft", sft_file, None, seed=seed, epochs=SFT_STAGE_EPOCHS, progress=not quiet,
                          overwrite_output_dir=True, report_to="none")  # fmt: skip
    say(f"\nstage 1: supervised training on {len(sft_train)} samples ({sft_cfg.epochs:g} epochs)")
    TrainingRun(sft_cfg).setup().train()
    start = out / "sft" / "final"

    # stage 2: DPO from that model on the pairs
    cfg = demo_config(out / "dpo", train_file, eval_file, task="demo_dpo", model=str(start), seed=seed, epochs=epochs,
                      progress=not quiet, overwrite_output_dir=True)  # fmt: skip
    say(f"\nstage 2: DPO on {len(pairs_train)} pairs ({cfg.epochs:g} epochs, beta {cfg.dpo_beta:g})")
    greedy_before, _ = greedy_scores(start, held_out, "before")
    metrics = TrainingRun(cfg).setup().train()
    greedy_after, answers = greedy_scores(out / "dpo" / "final", held_out, "after")

    before, after = metrics["eval_before"], metrics["eval_after"]
    rows = [
        ("reward accuracy", before["eval_rewards/accuracies"], after["eval_rewards/accuracies"], "{:.0%}"),
        ("reward margin", before["eval_rewards/margins"], after["eval_rewards/margins"], "{:.3f}"),
        ("greedy = chosen", greedy_before["chosen"], greedy_after["chosen"], "{:.0%}"),
        ("greedy = rejected", greedy_before["rejected"], greedy_after["rejected"], "{:.0%}"),
    ]
    say(f"\nheld-out preference pairs ({len(held_out)}; a tie counts half, so before DPO every pair scores 50%):")
    say(f"  {'':<20}{'before':>8}{'after':>8}")
    for name, b, a, fmt in rows:
        say(f"  {name:<20}{fmt.format(b):>8}{fmt.format(a):>8}")
    passed = after["eval_rewards/accuracies"] >= 0.9 and greedy_after["chosen"] > greedy_before["chosen"]
    result = {
        "reward_accuracy": {"before": before["eval_rewards/accuracies"], "after": after["eval_rewards/accuracies"]},
        "reward_margin": {"before": before["eval_rewards/margins"], "after": after["eval_rewards/margins"]},
        "greedy": {"before": greedy_before, "after": greedy_after},
        "passed": passed,
        "seconds": round(time.time() - started, 1),
        "final_dir": str(out / "dpo" / "final"),
        "loss_plot": str(out / "dpo" / "loss.png"),
    }
    (out / "demo_metrics.json").write_text(json.dumps(result, indent=2))
    with open(out / "predictions.jsonl", "w") as f:
        for pair, answer in zip(held_out, answers):
            last = pair.turns[-1]
            f.write(json.dumps({"id": pair.id, "prediction": answer, "chosen": last.chosen, "rejected": last.rejected})
                    + "\n")  # fmt: skip
    verdict = "reward accuracy >= 90% and greedy answers closer to the chosen ones" if passed else "below target"
    say(f"\n{verdict}; took {result['seconds']:.0f} s")
    say(
        f"checkpoint: {out / 'dpo' / 'final'}\nloss plot: {out / 'dpo' / 'loss.png'}\nmetrics: {out / 'demo_metrics.json'}"
    )
    return result
