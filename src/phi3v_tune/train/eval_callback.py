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
            video_frames=self.cfg.video_frames,
            progress=self.cfg.progress,
        )
        if self.trainer.is_world_process_zero():
            write_rows(rows, self.out / "eval_predictions" / f"step-{step}.jsonl")
        self.record(step, label, value)
        return value

    def record(self, step: int, label: str, value: float) -> None:
        """History, `eval_metrics.jsonl` and the Trainer's log (progress bar, tensorboard)."""
        entry = {"step": step, "when": label, f"eval_{self.cfg.metric}": value}
        self.history.append(entry)
        if self.trainer.is_world_process_zero():
            with open(self.out / "eval_metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        # Trainer.log clears control.should_log (its on_log handler does): called from on_step_end, that dropped
        # the training loss the Trainer was about to log for this very step
        control = self.trainer.control
        keep = control.should_log
        self.trainer.log({f"eval_{self.cfg.metric}": value})
        control.should_log = keep

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
        last = self.history[-1] if self.history else None
        if last is not None and last["step"] == state.global_step and last["when"] == "during":
            # a run stopped (--stop-at-step, early stop) right after an evaluation: the same weights, not generated twice
            self.record(state.global_step, "after", last[f"eval_{self.cfg.metric}"])
        else:
            self.run(model, state.global_step, "after")
