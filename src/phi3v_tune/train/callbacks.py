"""The Trainer callbacks of a training run: progress bar, stops, epoch accounting, task metric, garbage collection.

Each takes the plain values it needs (never the whole settings object) and talks to the Trainer only through the
callback arguments (`args`, `state`, `control`) and public methods handed to it.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback

from ..data.schema import Record
from ..evaluate.runner import evaluate_records, write_rows
from ..processing.processor import Phi3VProcessor
from .checkpoints import BEST_FILE
from .gc_control import restore as restore_collector
from .trainer import SampleLedger, fault_injection


def shown(value: float, fmt: str) -> str:
    """`value` formatted by `fmt`, without a sign where it rounds to zero (-0.0001 shows as 0.000, not -0.000)."""
    text = fmt.format(value)
    return text.lstrip("-") if float(text) == 0 else text


class ProgressBar(TrainerCallback):
    """One bar over optimizer steps: loss, learning rate, samples/s, tokens/s, and tqdm's ETA (preference tuning: the
    reward margin and accuracy too)."""

    def __init__(self, disable: bool = False):
        self.disable = disable
        self.bar: tqdm | None = None
        self.shown: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not self.disable:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if self.bar is None or not logs:
            return
        post = self.shown
        for key, name, fmt in (
            ("loss", "loss", "{:.4f}"),
            ("eval_loss", "eval_loss", "{:.4f}"),
            ("eval_anls", "anls", "{:.4f}"),
            ("eval_accuracy", "accuracy", "{:.4f}"),
            ("rewards/margins", "margin", "{:.3f}"),  # preference tuning
            ("rewards/accuracies", "reward_acc", "{:.2f}"),
            ("eval_rewards/accuracies", "eval_reward_acc", "{:.2f}"),
            ("learning_rate", "lr", "{:.2e}"),
            ("train_samples_per_second", "samples/s", "{:.2f}"),
            ("train_tokens_per_second", "tok/s", "{:.0f}"),
        ):
            value = logs.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                post[name] = shown(value, fmt)
        if post:
            self.bar.set_postfix(post, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class FaultInjection(TrainerCallback):
    """`PHI3V_FAULT_INJECT=kill_at_step:N` (crash tests): SIGKILL rank 0 at the end of step N."""

    def on_step_end(self, args, state, control, **kwargs):
        fault_injection("kill_at_step", state.global_step)


class StopAtStep(TrainerCallback):
    """Save and stop at a given step; the LR schedule and data order stay those of the whole run."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True


class LogFinalStep(TrainerCallback):
    """Log the loss at the run's last step (also a --stop-at-step stop) even off the --logging-steps grid, so the
    loss curve and the closing summary end where training did."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps or control.should_training_stop:
            control.should_log = True


class EpochReport(TrainerCallback):
    """At the end of every epoch: every input sample accounted for (trained, truncated, refused, invalid, skipped)."""

    def __init__(self, ledger: SampleLedger, data, path: Path, start_step: int = 0, is_main: bool = True):
        """`data`: the run's `LoadedData`. `start_step`: where this run starts (the checkpoint resumed from, else 0).
        Reports of epochs that ended after it (an abandoned or killed run's, or a finished run's in a reused folder)
        are dropped: this run reports those epochs again, so each epoch is reported once."""
        self.ledger = ledger
        self.data = data
        self.path = path
        if is_main and path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            kept = [x for x in lines if x.strip() and json.loads(x).get("step", 0) <= start_step]
            path.write_text("".join(x + "\n" for x in kept), encoding="utf-8")

    def on_epoch_end(self, args, state, control, **kwargs):
        seen, bad = self.ledger.gather()
        self.ledger.clear()
        plan = self.data.train_plan
        kept = {r.id for r in self.data.train}
        trained = kept & (set(seen) - set(bad))
        report = {
            "epoch": round(state.epoch or 0, 3),
            "step": state.global_step,
            "input_samples": self.data.input_total,
            "held_out_for_eval": self.data.input_total - self.data.invalid - len(kept) - len(plan.refused)
            if self.data.input_total
            else 0,
            "trained": len(trained),
            "of_which_truncated": len(trained & set(plan.truncated)),
            "refused": len(plan.refused),
            "refused_reasons": {r: sum(1 for x in plan.refused if x[1] == r) for r in {x[1] for x in plan.refused}},
            "invalid_skipped": self.data.invalid,
            "nonfinite_skipped": len(set(bad)),
            "not_reached_this_epoch": len(kept - set(seen)),
        }
        epoch_done = state.epoch is not None and abs(state.epoch - round(state.epoch)) < 1e-9
        stopped = control.should_training_stop and state.global_step < state.max_steps and not epoch_done
        if stopped:  # --stop-at-step mid-epoch: the epoch goes on after --resume, which reports it whole
            report["stopped_at_step"] = state.global_step
        if state.is_world_process_zero:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(report) + "\n")
            print(
                f"epoch {report['epoch']:g}: {report['input_samples']} input samples = {report['trained']} trained "
                f"({report['of_which_truncated']} truncated) + {report['refused']} refused + "
                f"{report['invalid_skipped']} invalid + {report['nonfinite_skipped']} skipped (non-finite) + "
                f"{report['not_reached_this_epoch']} not reached + {report['held_out_for_eval']} held out"
                + (" (stopped here; the epoch continues on --resume)" if stopped else ""),
                flush=True,
            )


class TaskMetricCallback(TrainerCallback):
    """The task metric (ANLS / accuracy) by sharded greedy generation on the evaluation records: before training,
    every `eval_steps` and after. Logs `eval_{metric}` (progress bar, tensorboard, `eval_metrics.jsonl`) and writes
    per-sample predictions to `eval_predictions/step-N.jsonl`."""

    def __init__(
        self,
        processor: Phi3VProcessor,
        records: list[Record],
        metric: str,
        *,
        log: Callable[[dict[str, float]], None],
        output_dir: Path,
        eval_steps: int | None,
        batch_size: int,
        max_new_tokens: int,
        video_frames: int,
        progress: bool,
        start_step: int = 0,
        is_main: bool = True,
        stop_at_step: int | None = None,
    ):
        """`log`: the Trainer's `log` (the value joins its log history, loggers and progress bar). `start_step`: where
        this run starts (a resumed checkpoint's step): `eval_metrics.jsonl` keeps only the lines up to it (a killed
        run's later evaluations are done again)."""
        self.processor = processor
        self.records = records
        self.metric = metric
        self.log = log
        self.out = Path(output_dir)
        self.eval_steps = eval_steps
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.video_frames = video_frames
        self.progress = progress
        self.stop_at_step = stop_at_step  # a slice of the run ends there (--stop-at-step): not the final evaluation
        self.history: list[dict[str, Any]] = []  # this process's evaluations (see `points` for the whole run's)
        path = self.out / "eval_metrics.jsonl"
        if is_main and path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            # the lines up to the checkpoint resumed from, without the "after" a slice (--stop-at-step) ended with:
            # the run goes on from there
            kept = [x for x in lines if x.strip() and kept_on_resume(json.loads(x), start_step)]
            path.write_text("".join(x + "\n" for x in kept), encoding="utf-8")

    def points(self, log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every evaluation of the run from the Trainer's log history (which a resume restores), labelled before
        (step 0), during, or after (the final one, logged at the end of training)."""
        key = f"eval_{self.metric}"
        found = [{"step": e["step"], "when": "during", key: e[key]} for e in log_history if key in e]
        for entry in found:
            if entry["step"] == 0:
                entry["when"] = "before"
        if found and self.history and self.history[-1]["when"] == "after" and found[-1]["step"] > 0:
            found[-1]["when"] = "after"
        return found

    def run(self, model, state, control, label: str) -> float:
        value, rows = evaluate_records(
            model,
            self.processor,
            self.records,
            self.metric,
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            video_frames=self.video_frames,
            progress=self.progress,
        )
        if state.is_world_process_zero:
            write_rows(rows, self.out / "eval_predictions" / f"step-{state.global_step}.jsonl")
        self.record(state, control, label, value)
        return value

    def record(self, state, control, label: str, value: float) -> None:
        """History, `eval_metrics.jsonl` and the Trainer's log (progress bar, tensorboard)."""
        entry = {"step": state.global_step, "when": label, f"eval_{self.metric}": value}
        self.history.append(entry)
        if state.is_world_process_zero:
            with open(self.out / "eval_metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        # Trainer.log clears control.should_log (its on_log handler does): called from on_step_end, that dropped
        # the training loss the Trainer was about to log for this very step
        keep = control.should_log
        self.log({f"eval_{self.metric}": value})
        control.should_log = keep

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.run(model, state, control, "before")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every, step = self.eval_steps, state.global_step
        sliced = self.stop_at_step is not None and step == self.stop_at_step < state.max_steps
        if step >= state.max_steps or (control.should_training_stop and not sliced):
            # the final evaluation runs here, while the progress bar still shows it (the bar closes at train end)
            self.run(model, state, control, "after")
        elif every and step % every == 0:
            self.run(model, state, control, "during")
        else:
            return
        gc.collect()  # generation's leftovers in reference cycles (automatic collection is off: --gc-interval)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        last = self.history[-1] if self.history else None
        if last is not None and last["step"] == state.global_step:
            if last["when"] == "during":  # stopped (early) right after an evaluation: the same weights, not run twice
                self.record(state, control, "after", last[f"eval_{self.metric}"])
        else:  # a run that had no step left to train (resumed at its end)
            self.run(model, state, control, "after")


def kept_on_resume(entry: dict[str, Any], start_step: int) -> bool:
    step = entry.get("step", 0)
    return 0 < start_step and (step < start_step or (step == start_step and entry.get("when") != "after"))


class ScheduledGC(TrainerCallback):
    """Automatic garbage collection off while training; a full collection every `interval` optimizer steps."""

    def __init__(self, interval: int):
        if interval <= 0:
            raise ValueError(f"the garbage-collection interval must be a positive number of steps, got {interval}")
        self.interval = interval
        self.collections = 0  # scheduled collections run so far (what tests and logs read)
        self._was_enabled = True
        self._first_step_done = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._was_enabled = gc.isenabled()
        self._first_step_done = False
        gc.collect()
        gc.freeze()
        gc.disable()

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if not self._first_step_done:  # step 1, or the first step after a resume
            gc.freeze()  # the first step compiled the model: its graphs and guards live as long as the run
            self._first_step_done = True
        if step % self.interval == 0:
            gc.collect()
            self.collections += 1

    def on_evaluate(self, args, state, control, **kwargs):
        gc.collect()  # whatever evaluation (generation, KV caches) left in reference cycles, freed now, on every rank

    def on_train_end(self, args, state, control, **kwargs):
        restore_collector(self._was_enabled)


class BestModel(TrainerCallback):
    """The best evaluated model and early stopping, from the scores the run logs (`eval_<metric>` or `eval_loss`).

    The scores come from the Trainer's log history, which every checkpoint stores and a resume restores: the best so
    far and the evaluations since it are the same after a kill and `--resume` as in an uninterrupted run. Each new
    best is written to OUTPUT_DIR/best (`save(folder)` writes a model folder) through a temporary folder, so `best/` is
    always a complete model. Scores of step 0 (before training) are the baseline, not a candidate.
    """

    def __init__(
        self,
        key: str,
        *,
        save: Callable[[Path], None] | None,
        output_dir: Path,
        patience: int | None = None,
        threshold: float = 0.0,
    ):
        """`key`: the logged score; higher is better except for a loss. `save`: None to only track (early stopping
        without --keep-best)."""
        self.key = key
        self.greater_is_better = not key.endswith("loss")
        self.save = save
        self.folder = Path(output_dir) / "best"
        self.patience = patience
        self.threshold = threshold
        self.stopped_early_at: int | None = None

    def scores(self, state) -> list[tuple[int, float]]:
        """(step, score) of every evaluation after step 0, once per step, in order."""
        seen: dict[int, float] = {}
        for entry in state.log_history:
            value, step = entry.get(self.key), entry.get("step", 0)
            if isinstance(value, (int, float)) and step > 0 and step not in seen:
                seen[step] = float(value)
        return sorted(seen.items())

    def better(self, value: float, than: float) -> bool:
        gain = value - than if self.greater_is_better else than - value
        return gain > self.threshold or (self.threshold == 0 and gain > 0)

    def standing(self, state) -> tuple[tuple[int, float] | None, int]:
        """(best (step, score) so far, evaluations since it without an improvement)."""
        best, since = None, 0
        for step, value in self.scores(state):
            if best is None or self.better(value, best[1]):
                best, since = (step, value), 0
            else:
                since += 1
        return best, since

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or self.key not in logs or state.global_step == 0:
            return
        here = [e for e in state.log_history if self.key in e and e.get("step") == state.global_step]
        if len(here) != 1:  # the same step scored again (the final evaluation repeats the last one): nothing new
            return
        best, since = self.standing(state)
        if best is not None and best[0] == state.global_step and since == 0 and self.save is not None:
            self.write(best, state)
        if self.patience is not None and since >= self.patience and state.global_step < state.max_steps:
            control.should_training_stop = True
            # the run ends here: its last checkpoint too, as at the end of a run (this log comes before the save)
            control.should_save = args.save_strategy != "no"
            self.stopped_early_at = state.global_step

    def write(self, best: tuple[int, float], state) -> None:
        """The model as it is now, as OUTPUT_DIR/best (replaced whole: written next to it, then renamed)."""
        tmp = self.folder.with_name("best.tmp")
        if state.is_world_process_zero and tmp.exists():
            shutil.rmtree(tmp)
        self.save(tmp)
        if state.is_world_process_zero:
            (tmp / BEST_FILE).write_text(json.dumps({"step": best[0], self.key: best[1]}))
            old = self.folder.with_name("best.old")
            if self.folder.exists():
                os.replace(self.folder, old)
            os.replace(tmp, self.folder)
            shutil.rmtree(old, ignore_errors=True)

    def summary(self, state) -> list[str]:
        best, since = self.standing(state)
        lines = []
        if best is not None:
            where = f" -> {self.folder}" if self.save is not None else ""
            lines.append(f"  best {self.key.removeprefix('eval_')}: {best[1]:.4f} at step {best[0]}{where}")
        if self.stopped_early_at is not None:
            lines.append(
                f"  stopped early at step {self.stopped_early_at}: no improvement of {self.key} by more than "
                f"{self.threshold:g} in {since} evaluations (--early-stopping-patience {self.patience})"
            )
        return lines
