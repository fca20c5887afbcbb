"""The quick-start demo: a tiny random Phi-3-vision learns three synthetic visual tasks (one image, two images,
an 8-frame video) on a CPU in a few minutes.

It exercises the real path end to end: a conversations jsonl with image files (written under the output folder so
you can look at the format), the validator, the HF-Trainer loop with checkpoints, batched greedy generation and the
recipe's accuracy metric before and after training.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig, recipe
from ..data.synthetic import CLASSES, DEMO_SIZES, DEMO_TASKS, demo_split, write_jsonl
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


def demo_config(output_dir: Path, train_file: Path, eval_file: Path, **overrides: Any) -> TrainConfig:
    """The packaged recipe `demo` with this demo's files and folder (and --seed / --epochs when given)."""
    settings = recipe("demo")
    settings.update(data=str(train_file), eval_data=str(eval_file), output_dir=str(output_dir))
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
