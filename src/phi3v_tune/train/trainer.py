"""The HF `Trainer` with what the original recipe lacked: complete-or-marked checkpoints, resume, throughput logging,
a progress bar with loss / lr / samples/s / tokens/s / ETA, and sample ids in error messages."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback

from .checkpoints import write_marker


class LengthGroupedEpochSampler(torch.utils.data.Sampler):
    """Similar lengths in the same batch (less padding), reshuffled per epoch from `seed + epoch`.

    Seeding per epoch (instead of one generator that advances) keeps the order identical after a resume.
    """

    def __init__(self, lengths: list[int], group_size: int, seed: int):
        self.lengths = list(lengths)
        self.group_size = group_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.group_size, generator=g))


class Phi3VTrainer(Trainer):
    """`Trainer` for Phi3V batches (pops the `ids` that travel with a batch, counts tokens, marks checkpoints)."""

    def __init__(self, *args, train_config=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_config = train_config
        self._tokens = 0
        self._samples = 0
        self._last_log = (time.time(), 0, 0)
        self.last_batch_ids: list[str] = []

    # ----------------------------------------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        lengths = getattr(ds, "lengths", None)
        cfg = self.train_config
        if cfg is not None and cfg.group_by_length and lengths and self.args.per_device_train_batch_size > 1:
            group = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedEpochSampler(lengths, group, self.args.data_seed or self.args.seed)
        return super()._get_train_sampler(train_dataset) if train_dataset is not None else super()._get_train_sampler()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs.pop("ids", None)
        if ids is not None:
            self.last_batch_ids = list(ids)
        if model.training:
            self._tokens += int(inputs["attention_mask"].sum())
            self._samples += int(inputs["input_ids"].shape[0])
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = dict(inputs)
        inputs.pop("ids", None)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    # ----------------------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            now, tokens0, samples0 = self._last_log
            t = time.time()
            world = max(1, self.args.world_size)
            dt = max(1e-9, t - now)
            logs["train_samples_per_second"] = round((self._samples - samples0) * world / dt, 3)
            logs["train_tokens_per_second"] = round((self._tokens - tokens0) * world / dt, 1)
            self._last_log = (t, self._tokens, self._samples)
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            from pathlib import Path

            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            if self.train_config is not None:
                self.train_config.save(folder / "train_config.yaml")
            write_marker(folder, self.state.global_step)
        self.accelerator.wait_for_everyone()


class ProgressBar(TrainerCallback):
    """One bar over optimizer steps: loss, learning rate, samples/s, tokens/s, and tqdm's ETA."""

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
            ("learning_rate", "lr", "{:.2e}"),
            ("train_samples_per_second", "samples/s", "{:.2f}"),
            ("train_tokens_per_second", "tok/s", "{:.0f}"),
        ):
            value = logs.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                post[name] = fmt.format(value)
        if post:
            self.bar.set_postfix(post, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def nonfinite_guard(loss: torch.Tensor, step: int, ids: list[str]) -> None:
    """Stop with the step and the sample ids when the loss is NaN/inf."""
    if not torch.isfinite(loss).all():
        raise FloatingPointError(f"non-finite loss at step {step}; samples in the batch: {', '.join(map(str, ids))}")


class StopAtStep(TrainerCallback):
    """Save and stop at a given step; the LR schedule and data order stay those of the whole run."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True
