"""The HF `Trainer` with what the original recipe lacked: complete-or-marked checkpoints, resume, throughput logging,
exact evaluation loss, per-epoch sample accounting, and sample ids in error messages."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_pt_utils import get_length_grouped_indices

from ..model.loss import IGNORE_INDEX
from ..model.modeling import set_rope_per_sample
from ..model.serving_files import write_serving_files_for
from .checkpoints import MARKER, latest_complete, rotate, write_marker
from .optim import AdamWSR, OptimizerInBackward
from .step_boundary import install, uninstall
from .strategies import PARTS, parameter_part


@dataclass
class Phi3VTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the options only our Trainer reads (resolved by `train/run.py`, passed as values).

    Its CPU device is plain `cpu`: accelerate names the device of a multi-process CPU (gloo) run
    `torch.device("cpu", 0)`, and the Trainer of transformers < 5.24 loads the optimizer state of a distributed resume
    with `map_location=args.device`; `torch.load` cannot map storages to "cpu:0" ("don't know how to restore data
    location ... (tagged with cpu:0)"). CPU tensors have no device index anyway, so nothing else changes.
    """

    skip_nonfinite: int = field(default=0, metadata={"help": "Batches with a NaN/inf loss skipped before stopping."})
    optimizer_in_backward: bool = field(
        default=False, metadata={"help": "Update each weight in backward as soon as its gradient is complete."}
    )
    master_weights: str = field(
        default="fp32", metadata={"help": "fp32 (the Trainer's optimizer) or bf16-sr (AdamW with stochastic rounding)."}
    )
    length_grouped_batches: bool = field(
        default=True, metadata={"help": "Batches of similar token lengths (per-epoch seeded), with several per pass."}
    )
    checkpoints_to_keep: int | None = field(
        default=None, metadata={"help": "Keep the newest N complete checkpoints (rotated once a new one is marked)."}
    )
    part_learning_rates: dict[str, float] | None = field(
        default=None,
        metadata={"help": "Peak learning rates of model parts (vision, projector) that differ from learning_rate."},
    )
    settings_file: str | None = field(
        default=None, metadata={"help": "The run's settings (train_config.yaml), copied into every checkpoint."}
    )

    @property
    def device(self) -> torch.device:
        device = super().device
        return torch.device("cpu") if device.type == "cpu" else device


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
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.group_size, generator=g))


EPOCH_PROGRESS = "epoch_progress.json"  # in each checkpoint: the epoch's accounting so far (see SampleLedger)


class SampleLedger:
    """The samples this rank trained on in the running epoch, and those of batches skipped for a non-finite loss.

    The Trainer fills it; `callbacks.EpochReport` reads it at each epoch's end; a checkpoint stores it (all ranks'
    lists, on rank 0), so a run resumed mid-epoch accounts for the samples trained before the stop.
    """

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.nonfinite: list[str] = []

    def gather(self) -> tuple[list[str], list[str]]:
        """(seen, nonfinite) of every rank (a collective: all ranks call it)."""
        seen, bad = list(self.seen), list(self.nonfinite)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, (seen, bad))
            seen = [i for p in parts for i in p[0]]
            bad = [i for p in parts for i in p[1]]
        return seen, bad

    def clear(self) -> None:
        self.seen.clear()
        self.nonfinite.clear()

    @staticmethod
    def write(folder: Path, epoch: float | None, seen: list[str], bad: list[str]) -> None:
        (folder / EPOCH_PROGRESS).write_text(json.dumps({"epoch": epoch, "epoch_ids": seen, "epoch_nonfinite": bad}))

    def restore(self, checkpoint: str | Path) -> None:
        """A run resumed in the middle of an epoch continues that epoch's accounting; from an epoch boundary there is
        nothing to continue. Called on rank 0 only (it holds the lists; the report gathers every rank's)."""
        path = Path(checkpoint) / EPOCH_PROGRESS
        if not path.is_file():
            return
        saved = json.loads(path.read_text())
        epoch = saved.get("epoch") or 0.0
        if epoch != math.floor(epoch):  # mid-epoch
            self.seen[:0] = saved.get("epoch_ids", [])
            self.nonfinite[:0] = saved.get("epoch_nonfinite", [])


class Phi3VTrainer(Trainer):
    """`Trainer` for Phi3V batches (pops the `ids` that travel with a batch, counts tokens, marks checkpoints).

    Our options ride on `Phi3VTrainingArguments`; `eval_data_collator` builds evaluation batches (padded) when the
    training collator packs.
    """

    args: Phi3VTrainingArguments

    def __init__(self, *args, eval_data_collator=None, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        use_cache = getattr(getattr(model, "config", None), "use_cache", None)
        super().__init__(*args, **kwargs)
        if use_cache is not None:
            # the Trainer turns the config's use_cache off, which every saved config.json would then carry; the
            # loss path builds no cache anyway (a forward with labels defaults to use_cache=False)
            self.model.config.use_cache = use_cache
        # every sample of a padded batch takes the su-RoPE factor set of its own length: training on a batch then
        # computes what the recipe computes on its samples one by one (and what packed rows compute)
        set_rope_per_sample(self.model)
        self.eval_data_collator = eval_data_collator  # evaluation batches (None: the training collator)
        self.ledger = SampleLedger()
        self.nonfinite_skipped = 0
        self._tokens = 0
        self._samples = 0
        self._last_log = (time.time(), 0, 0)
        self.last_batch_ids: list[str] = []
        self._tree = None  # step_boundary.ModuleTree of the model being trained (see training_step)
        self._flop_params: int | None = None  # num_parameters(exclude_embeddings=True), counted once
        self._eval_token_loss: list[torch.Tensor] | None = None  # [token losses' sum, tokens] of the running eval

    # ----------------------------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """With bf16-sr master weights: AdamWSR (train/optim/adamw_sr.py) with HF's parameter groups (no decay on biases and
        norms) and hyper-parameters; otherwise the Trainer's own choice. Wrapped to step in backward when asked."""
        args = self.args
        if self.optimizer is None and args.master_weights == "bf16-sr":
            self.optimizer_cls_and_kwargs = (
                AdamWSR,
                dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                     weight_decay=args.weight_decay, seed=args.seed),
            )  # fmt: skip
        if self.optimizer is None and args.part_learning_rates:
            self.optimizer = self._optimizer_with_part_rates(model if model is not None else self.model)
        optimizer = super().create_optimizer(model)
        if args.optimizer_in_backward and not isinstance(optimizer, OptimizerInBackward):
            if args.world_size > 1:
                raise ValueError(
                    "--optimizer-in-backward runs in one process: under DDP each rank would update its weights before "
                    "the gradients are averaged across ranks"
                )
            self.optimizer = optimizer = OptimizerInBackward(optimizer)
        return optimizer

    def _optimizer_with_part_rates(self, model) -> torch.optim.Optimizer:
        """The Trainer's parameter groups (weight decay except on biases and norms), split by model part, each part
        with its own peak learning rate (the schedule scales every group alike)."""
        decay = set(self.get_decay_parameter_names(model))
        rates = self.args.part_learning_rates or {}
        groups = []
        for part in PARTS:
            lr = rates.get(part, self.args.learning_rate)
            for decays in (True, False):
                params = [
                    p
                    for n, p in model.named_parameters()
                    if p.requires_grad and parameter_part(n) == part and (n in decay) == decays
                ]
                if params:
                    wd = self.args.weight_decay if decays else 0.0
                    groups.append({"params": params, "weight_decay": wd, "lr": lr, "part": part})
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        return optimizer_cls(groups, **kwargs)

    def _get_grad_norm(self, model, grad_norm=None):
        """No norm to log when backward has already used and freed every gradient (--optimizer-in-backward)."""
        if grad_norm is None and self.args.optimizer_in_backward:
            return None
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        lengths = getattr(ds, "lengths", None)
        if self.args.length_grouped_batches and lengths and self.args.per_device_train_batch_size > 1:
            group = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedEpochSampler(lengths, group, self.args.data_seed or self.args.seed)
        return super()._get_train_sampler(train_dataset) if train_dataset is not None else super()._get_train_sampler()

    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_data_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    # ----------------------------------------------------------------------------------------------------------------
    # per-step bookkeeping from lists made once (train/step_boundary.py): same modes, gradients, norms and FLOP count
    def _module_tree(self, model):
        """The ModuleTree routing `model.train` / `model.zero_grad`; None under DeepSpeed or FSDP, whose engines
        own those calls and the gradient norm."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return None
        if self._tree is None or self._tree.model is not model:
            if self._tree is not None:
                uninstall(self._tree.model)
            self._tree = install(model)
        return self._tree

    def train(self, *args, **kwargs):
        resume = kwargs.get("resume_from_checkpoint")
        if isinstance(resume, str) and self.is_world_process_zero():
            self.ledger.restore(resume)
        try:
            return super().train(*args, **kwargs)
        finally:
            if self._tree is not None:
                uninstall(self._tree.model)
                self._tree = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._module_tree(model)
        return super().training_step(model, inputs, num_items_in_batch)

    def _clip_grad_norm(self, model):
        tree = self._module_tree(model)
        if tree is None:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_(tree.trainable, self.args.max_grad_norm)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's estimate (6 x tokens x parameters without embeddings), parameters counted once."""
        main = getattr(self.model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._flop_params is None:
            self._flop_params = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main].numel() * self._flop_params

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs.pop("ids", None)
        num_tokens = inputs.pop("num_tokens", None)  # packed batches: real tokens (they have no attention_mask)
        if ids is not None:
            self.last_batch_ids = list(ids)
            if model.training:
                self.ledger.seen.extend(self.last_batch_ids)
        inputs["return_logits"] = False  # the loss path needs no full-vocabulary logits, in evaluation neither
        if model.training:
            self._tokens += int(num_tokens) if num_tokens is not None else int(inputs["attention_mask"].sum())
            self._samples += len(ids) if ids is not None else int(inputs["input_ids"].shape[0])
        result = self.batch_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if model.training:
            loss = result[0] if isinstance(result, tuple) else result
            if not self._finite_on_every_rank(loss):
                loss = self._nonfinite(model, loss)
                result = (loss, *result[1:]) if isinstance(result, tuple) else loss
        return result

    def batch_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The objective on one batch (the Trainer's: the model's own loss); `compute_loss` does the bookkeeping
        around it (sample ids, token counts, non-finite losses). `train.preference` computes DPO here."""
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    @staticmethod
    def _finite_on_every_rank(loss: torch.Tensor) -> bool:
        """One answer for all ranks (a small all-reduce; the host waits for the loss here anyway): a rank that
        stopped or skipped alone would leave the others waiting in the next collective until the timeout."""
        finite = torch.isfinite(loss.detach()).all()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = finite.to(torch.int32).reshape(1)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            return bool(flag)
        return bool(finite)

    def _nonfinite(self, model, loss: torch.Tensor) -> torch.Tensor:
        """Stop with the step and sample ids, or (within --skip-nonfinite) replace the batch by a zero loss; every
        rank takes the same branch (see _finite_on_every_rank), and the message names every rank's samples."""
        step = self.state.global_step + 1
        bad = [(str(float(loss.detach())), list(map(str, self.last_batch_ids)))]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, bad[0])
            bad = [p for p in parts if p[0] in ("nan", "inf", "-inf")] or parts
        loss_text = ", ".join(sorted({value for value, _ in bad}))
        ids = ", ".join(i for _, batch in bad for i in batch) or "unknown"
        allowed = self.args.skip_nonfinite
        if self.nonfinite_skipped >= allowed:
            last = latest_complete(self.args.output_dir)
            raise FloatingPointError(
                f"non-finite loss ({loss_text}) at step {step}; samples in the batch: {ids}. "
                f"Last good checkpoint: {last or 'none yet'}. Check those samples, lower the learning rate, or pass "
                f"--skip-nonfinite N to skip up to N such batches."
            )
        self.nonfinite_skipped += 1
        self.ledger.nonfinite.extend(self.last_batch_ids)
        if self.is_world_process_zero():
            print(
                f"warning: non-finite loss at step {step} (samples: {ids}); batch skipped "
                f"({self.nonfinite_skipped}/{allowed})",
                flush=True,
            )
        # a zero loss that still touches every trainable weight (DDP expects gradients for all of them)
        return sum(
            (p.reshape(-1)[:1].sum() * 0.0 for p in model.parameters() if p.requires_grad),
            torch.zeros((), device=loss.device),
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = dict(inputs)
        inputs.pop("ids", None)
        inputs.pop("num_tokens", None)
        labels = inputs.get("labels")
        if labels is not None:
            prediction_loss_only = True  # the loss path computes no logits (model/loss.py); nothing else to gather
        loss, logits, label_ids = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        if loss is not None and labels is not None and self._eval_token_loss is not None:
            self._count_eval_tokens(loss, labels)
        return loss, logits, label_ids

    def _count_eval_tokens(self, loss: torch.Tensor, labels: torch.Tensor) -> None:
        """Add the batch's token losses to the running evaluation: the batch mean times each row's answer tokens
        (exact for the batch; rows are samples, as evaluation batches are padded, never packed). Gathered as
        `gather_for_metrics` gathers, so the samples a rank repeats to even out the last batches count once."""
        tokens = (labels[..., 1:] != IGNORE_INDEX).sum(-1).to(loss.device, torch.float32)
        per_row = torch.where(tokens > 0, loss.detach().float() * tokens, 0.0)  # no answer token: 0, not NaN
        sums, counts = self.accelerator.gather_for_metrics((per_row, tokens))
        self._eval_token_loss = [sums.sum() + self._eval_token_loss[0], counts.sum() + self._eval_token_loss[1]]

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """The evaluation loss is the mean over every answer token of the evaluation data, as the training loss is
        over a step's: the same number whatever the batch size (the Trainer's own is a mean of batch means)."""
        self._eval_token_loss = [torch.zeros(()), torch.zeros(())]  # on the device of the first batch's sums
        try:
            out = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
            total, count = (float(x) for x in self._eval_token_loss)  # read once, not once per batch
        finally:
            self._eval_token_loss = None
        if count > 0 and f"{metric_key_prefix}_loss" in out.metrics:
            out.metrics[f"{metric_key_prefix}_loss"] = total / count
        return out

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

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """An adapter holds the adapter weights only: PEFT would also store the frozen base `lm_head` (~200 MB in
        bf16 for Phi-3.5-vision) in every checkpoint because LoRA targets a layer named like an embedding."""
        try:
            from peft import PeftModel
        except ImportError:
            PeftModel = None
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if PeftModel is None or not isinstance(model, PeftModel):
            return super()._save(output_dir, state_dict)
        model.save_pretrained = functools.partial(type(model).save_pretrained, model, save_embedding_layers=False)
        try:
            return super()._save(output_dir, state_dict)
        finally:
            del model.save_pretrained  # the class's method again

    def _save_checkpoint(self, model, trial) -> None:
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.is_world_process_zero():
            # the same step saved again after a resume from an earlier checkpoint: the old marker goes first, so a
            # crash while the new files are written cannot leave a folder that looks complete
            (folder / MARKER).unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()
        try:
            super()._save_checkpoint(model, trial)
        except OSError as err:
            last = latest_complete(self.args.output_dir)
            raise OSError(
                f"could not write checkpoint-{self.state.global_step} ({err.strerror or err}); it is left incomplete "
                f"and will never be resumed from. Last complete checkpoint: {last or 'none'}. Free disk space, "
                "then continue with --resume."
            ) from err
        fault_injection("kill_in_save", self.state.global_step)  # files written, marker not yet
        self.accelerator.wait_for_everyone()
        seen, bad = self.ledger.gather()
        if self.is_world_process_zero():
            if self.args.settings_file and Path(self.args.settings_file).is_file():
                shutil.copyfile(self.args.settings_file, folder / "train_config.yaml")
            # remote code, auto_map and stop ids as the base model has them
            write_serving_files_for(folder, self.accelerator.unwrap_model(self.model), self.processing_class)
            SampleLedger.write(folder, self.state.epoch, seen, bad)
            write_marker(folder, self.state.global_step)
            rotate(folder, self.args.checkpoints_to_keep)
        self.accelerator.wait_for_everyone()


def fault_injection(point: str, step: int) -> None:
    """Crash tests: `PHI3V_FAULT_INJECT=kill_at_step:N` or `kill_in_save:N` SIGKILLs rank 0 at that point."""
    spec = os.environ.get("PHI3V_FAULT_INJECT")
    if not spec or int(os.environ.get("RANK", "0")) != 0:
        return
    name, _, at = spec.partition(":")
    if name == point and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)
