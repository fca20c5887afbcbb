"""Preference tuning (DPO / IPO) in the training loop: `PreferenceTrainer` computes `model.preference.preference_step`
on pair batches, logs the DPO metrics, evaluates held-out reward accuracy and margin, and keeps the reference.

The Trainer machinery is `Phi3VTrainer`'s (checkpoints, exact resume, sample accounting by pair id, non-finite
handling, throughput); only the loss of a batch (`batch_loss`), the count that normalises it over an accumulated step
(pairs instead of answer tokens) and evaluation differ.

Reference model (see `model.preference`): lora / qlora use the policy with its adapters disabled; full /
freeze-vision a frozen copy made before the strategy is applied (`frozen_reference`), or, with
--dpo-precompute-reference, log-probabilities computed once before training and stored in the output folder
(`PreferenceTrainer.use_stored_reference`), which batches then carry.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.preference import pair_digest
from ..model.modeling import set_rope_per_sample
from ..model.preference import find_peft_model, frozen_copy, precompute_reference, preference_step
from .callbacks import shown
from .compile import compile_layers
from .trainer import Phi3VTrainer

#: The stored reference log-probabilities in the output folder: {"train": {pair id: [chosen, rejected]}, "eval": ...,
#: "digests": {"train": {pair id: `data.preference.pair_digest`}, ...}} (the digests: what a resumed run checks).
REFERENCE_FILE = "reference_logps.json"
#: Evaluation metrics (per pair, averaged over the evaluation data) besides the loss.
EVAL_KEYS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


@dataclass(frozen=True)
class PreferenceSettings:
    """The DPO loss of a run (--dpo-beta, --dpo-loss, --dpo-label-smoothing, --dpo-sft-weight)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    sft_weight: float = 0.0


def frozen_reference(model: nn.Module, method: str, precomputed: bool, compiled: bool) -> nn.Module | None:
    """The reference model to keep in memory: a frozen copy of the freshly loaded `model` for full / freeze-vision
    without precomputed log-probabilities (regionally compiled like the policy when `compiled`); None otherwise (lora
    and qlora disable their adapters instead)."""
    if method not in ("full", "freeze-vision") or precomputed:
        return None
    reference = frozen_copy(model)
    if compiled:
        compile_layers(reference, fall_back=True)
    return reference


class PreferenceTrainer(Phi3VTrainer):
    """`Phi3VTrainer` whose batches are preference pairs (`data.preference` collators) and whose loss is DPO / IPO.

    Logged per logging window (progress bar, trackers, `metrics.json`): the loss and the per-pair means of
    rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/* and ref_logps/*. Evaluation gives
    eval_loss (the mean per-pair loss) and eval_rewards/* over the whole evaluation data.
    """

    def __init__(
        self,
        *args,
        preference: PreferenceSettings = PreferenceSettings(),
        reference_model: nn.Module | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.preference = preference
        self.reference_model = reference_model
        if reference_model is not None:
            set_rope_per_sample(reference_model)  # as the policy (Phi3VTrainer): each sequence its own su-RoPE factors
            reference_model.to(self.args.device)
        # the loss of a pass is already divided by the pairs of the whole accumulated step (see batch_loss)
        self.loss_is_scaled_for_ga = True
        self._window: dict[str, list[torch.Tensor]] = defaultdict(list)  # per-pair values since the last log
        self._eval_values: dict[str, list[torch.Tensor]] | None = None  # per-pair values of the running evaluation
        self._last_step = None

    # ----------------------------------------------------------------------------------------------------------------
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        """Pairs in the accumulated step, over all processes: each pass's loss is its per-pair losses' sum divided by
        it, so the step's loss is the mean over all its pairs, whatever their split into passes and processes."""
        count = torch.tensor(sum(len(batch["ids"]) for batch in batch_samples), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def batch_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        settings = self.preference
        step = preference_step(
            model,
            inputs,
            beta=settings.beta,
            loss_type=settings.loss_type,
            label_smoothing=settings.label_smoothing,
            sft_weight=settings.sft_weight,
            reference=self.reference_model,
            num_pairs=num_items_in_batch if model.training else None,
        )
        loss = step.loss
        if model.training and num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # the pairs were counted over every process and DDP averages the gradients: scale back to the sum
            loss = loss * self.accelerator.num_processes
        self._last_step = step
        return (loss, step) if return_outputs else loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = self.nonfinite_skipped
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if model.training and self.nonfinite_skipped == skipped:  # a skipped batch's values stay out of the metrics
            for name, values in self._last_step.metrics().items():
                self._window[name].append(values)
        return result

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """The training loss's log also gets the window's per-pair means (over every process: all log together)."""
        if "loss" in logs and self._window:
            logs.update(self._means(self._window))
            self._window.clear()
        super().log(logs, *args, **kwargs)

    def _means(self, values: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        """Per-pair means of every metric, summed over the processes in one all-reduce (one host read)."""
        names = sorted(values)
        first = values[names[0]][0]
        sums = torch.stack([torch.cat(values[n]).float().sum() for n in names] + [first.new_tensor(0.0)])
        sums[-1] = sum(v.numel() for v in values[names[0]])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        totals = sums.tolist()
        pairs = max(1.0, totals[-1])
        return {name: round(total / pairs, 6) for name, total in zip(names, totals)}

    # ----------------------------------------------------------------------------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """One evaluation batch: per-pair losses and rewards, gathered from every process (each pair once)."""
        inputs = self._prepare_inputs(dict(inputs))
        inputs.pop("ids", None)
        inputs.pop("num_tokens", None)
        with torch.no_grad(), self.compute_loss_context_manager():
            _, step = self.batch_loss(model, inputs, return_outputs=True)
        if self._eval_values is not None:
            values = {"loss": step.losses, **{k: v for k, v in step.metrics().items() if k in EVAL_KEYS}}
            for name, gathered in self.accelerator.gather_for_metrics(values).items():
                self._eval_values[name].append(gathered.detach().float())
        return step.loss.detach(), None, None

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """eval_loss is the mean of the per-pair losses over the evaluation data (not a mean of batch means), with
        the mean rewards, margin and reward accuracy beside it."""
        self._eval_values = defaultdict(list)
        try:
            out = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
            values = {name: torch.cat(parts) for name, parts in self._eval_values.items()}
        finally:
            self._eval_values = None
        for name, tensor in values.items():
            out.metrics[f"{metric_key_prefix}_{name}"] = round(float(tensor.mean()), 6)
        return out

    # ----------------------------------------------------------------------------------------------------------------
    def use_stored_reference(self, path: Path, resumed: bool, say: Callable[[str], None] = print) -> None:
        """--dpo-precompute-reference: the reference log-probabilities of every training and evaluation pair, read from
        `path` when the run resumes (its values were computed from the base model before the first step), else
        computed now from the model as loaded (the reference: before any update, or with the adapters disabled), on
        every process a share, and written there; the data sets then hand them to every batch."""
        datasets = {"train": self.train_dataset, "eval": self.eval_dataset}
        datasets = {split: ds for split, ds in datasets.items() if ds is not None}
        digests = {split: {p.id: pair_digest(p) for p in ds.pairs} for split, ds in datasets.items()}
        stored = json.loads(path.read_text()) if resumed and path.is_file() else None
        if stored is not None:
            missing = [
                pair_id for split, table in digests.items() for pair_id in table if pair_id not in stored.get(split, {})
            ]
            if missing:
                raise ValueError(
                    f"{path} has no reference log-probabilities for pair(s) {', '.join(missing[:5])}: the data changed "
                    "since the run started; start a new run (without --resume) to compute them for this data"
                )
            known = stored.get("digests", {})  # files written before digests were stored have none
            changed = [
                pair_id
                for split, table in digests.items()
                for pair_id, digest in table.items()
                if known.get(split, {}).get(pair_id, digest) != digest
            ]
            if changed:
                raise ValueError(
                    f"pair(s) {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''} differ from the data the run "
                    f"started with (prompt, images or answers), so the reference log-probabilities in {path} do not "
                    "belong to them: resume with the original data, or start a new run (without --resume)"
                )
            say(f"reference log-probabilities: read from {path}")
        else:
            stored = {split: self._compute_reference(ds, split) for split, ds in datasets.items()}
            stored["digests"] = digests
            if self.is_world_process_zero():
                tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
                tmp.write_text(json.dumps(stored))
                os.replace(tmp, path)
            say(
                f"reference log-probabilities of {sum(len(stored[split]) for split in datasets)} pairs computed; stored in {path}"
            )
        for split, ds in datasets.items():
            ds.reference = {pair_id: tuple(values) for pair_id, values in stored[split].items()}

    def _compute_reference(self, dataset, split: str) -> dict[str, list[float]]:
        """{pair id: [chosen, rejected]} of `dataset`: this process's share (every world_size-th pair), gathered.

        Evaluation pairs go through the evaluation collator and batch size in evaluation order, as evaluation will
        batch them: on one process the "before" evaluation then recomputes the reference bit for bit, so every pair
        is an exact tie (a packed and a padded forward differ in the last bits, which would break ties at random)."""
        model = self.model.to(self.args.device)
        reference = None if find_peft_model(model) is not None else model  # before training the policy is the reference
        world, rank = max(1, self.args.world_size), self.args.process_index
        mine = list(range(rank, len(dataset), world))
        size = self.args.per_device_train_batch_size
        collate = self.data_collator
        if split == "eval":
            size = self.args.per_device_eval_batch_size
            collate = self.eval_data_collator or self.data_collator
        was_training = model.training
        model.eval()
        try:
            with self.accelerator.autocast():
                batches = (
                    self._prepare_inputs(collate([dataset[i] for i in mine[start : start + size]]))
                    for start in range(0, len(mine), size)
                )
                table = precompute_reference(model, batches, reference)
        finally:
            model.train(was_training)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, table)
            table = {k: v for part in parts for k, v in part.items()}
        return {pair_id: list(values) for pair_id, values in table.items()}


def run_preference_metrics(metrics: dict[str, Any], label: Callable[[str], str]) -> list[str]:
    """The closing summary's lines about held-out preferences: reward accuracy and margin before and after (`label`
    names each evaluation, from its key eval_before / eval_after)."""
    lines = []
    for when in ("eval_before", "eval_after"):
        entry = metrics.get(when, {})
        if "eval_rewards/accuracies" in entry:
            margin = shown(entry["eval_rewards/margins"], "{:.4f}")
            lines.append(
                f"  eval reward accuracy {label(when)}: {entry['eval_rewards/accuracies']:.1%}, margin {margin}"
            )
    return lines
