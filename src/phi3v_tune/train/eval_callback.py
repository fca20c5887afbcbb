"""Task metric (ANLS / accuracy) by generation during training: before, every --eval-steps, and after."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..evaluate.runner import evaluate_records, write_rows


class TaskMetricCallback(TrainerCallback):
    """Runs sharded greedy generation on the evaluation records and logs `eval_{metric}` (progress bar,
    tensorboard, `eval_metrics.jsonl`), writing per-sample predictions to `eval_predictions/step-N.jsonl`."""

    def __init__(self, trainer, processor, records, cfg):
        self.trainer = trainer
        self.processor = processor
        self.records = records
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.history: list[dict[str, Any]] = []

    def run(self, model, step: int, label: str) -> float:
        value, rows = evaluate_records(
            model,
            self.processor,
            self.records,
            self.cfg.metric,
            batch_size=self.cfg.eval_batch_size,
            max_new_tokens=self.cfg.eval_max_new_tokens,
            video_frames_per_clip=self.cfg.video_frames,
            progress=self.cfg.progress,
        )
        entry = {"step": step, "when": label, f"eval_{self.cfg.metric}": value}
        self.history.append(entry)
        if self.trainer.is_world_process_zero():
            write_rows(rows, self.out / "eval_predictions" / f"step-{step}.jsonl")
            with open(self.out / "eval_metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        self.trainer.log({f"eval_{self.cfg.metric}": value})
        return value

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.run(model, 0, "before")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every = self.cfg.eval_steps
        if every and state.global_step % every == 0 and state.global_step < state.max_steps:
            self.run(model, state.global_step, "during")
            import gc

            gc.collect()  # generation's leftovers in reference cycles (automatic collection is off: --gc-interval)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.run(model, state.global_step, "after")
