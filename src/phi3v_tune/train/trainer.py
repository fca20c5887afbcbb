"""The HF `Trainer` with what the original recipe lacked: complete-or-marked checkpoints, resume, throughput logging,
a progress bar with loss / lr / samples/s / tokens/s / ETA, and sample ids in error messages."""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..data.collate import IGNORE_INDEX
from ..model.modeling import set_rope_per_sample
from ..model.serving_files import write_serving_files_for
from .checkpoints import MARKER, write_marker


class Phi3VTrainingArguments(TrainingArguments):
    """`TrainingArguments` whose CPU device is plain `cpu`.

    accelerate names the device of a multi-process CPU (gloo) run `torch.device("cpu", 0)`, and the Trainer of
    transformers < 5.24 loads the optimizer state of a distributed resume with `map_location=args.device`;
    `torch.load` cannot map storages to "cpu:0" ("don't know how to restore data location ... (tagged with cpu:0)").
    CPU tensors have no device index anyway, so nothing else changes.
    """

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
        from transformers.trainer_pt_utils import get_length_grouped_indices

        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.group_size, generator=g))


class Phi3VTrainer(Trainer):
    """`Trainer` for Phi3V batches (pops the `ids` that travel with a batch, counts tokens, marks checkpoints)."""

    def __init__(self, *args, train_config=None, eval_data_collator=None, **kwargs):
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
        self.train_config = train_config
        self.eval_data_collator = eval_data_collator  # evaluation batches (None: the training collator)
        self._tokens = 0
        self._samples = 0
        self._last_log = (time.time(), 0, 0)
        self.last_batch_ids: list[str] = []
        self.epoch_ids: list[str] = []  # samples trained on this epoch (this rank)
        self.epoch_nonfinite: list[str] = []  # samples of batches skipped for a non-finite loss
        self._tree = None  # step_boundary.ModuleTree of the model being trained (see training_step)
        self._flop_params: int | None = None  # num_parameters(exclude_embeddings=True), counted once
        self._eval_token_loss: list[torch.Tensor] | None = None  # [token losses' sum, tokens] of the running eval

    # ----------------------------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """With --master-weights bf16-sr: AdamWSR (train/optim.py) with HF's parameter groups (no decay on biases
        and norms) and hyper-parameters; otherwise the Trainer's own choice."""
        from .run import master_weights

        cfg = self.train_config
        if self.optimizer is None and cfg is not None and master_weights(cfg) == "bf16-sr":
            from .optim import AdamWSR

            args = self.args
            self.optimizer_cls_and_kwargs = (
                AdamWSR,
                dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                     weight_decay=args.weight_decay, seed=args.seed),
            )  # fmt: skip
        optimizer = super().create_optimizer(model)
        from .optim_backward import OptimizerInBackward

        if cfg is not None and cfg.optimizer_in_backward and not isinstance(optimizer, OptimizerInBackward):
            if self.args.world_size > 1:
                raise ValueError(
                    "--optimizer-in-backward runs in one process: under DDP each rank would update its weights before "
                    "the gradients are averaged across ranks"
                )
            self.optimizer = optimizer = OptimizerInBackward(optimizer)
        return optimizer

    def _get_grad_norm(self, model, grad_norm=None):
        """No norm to log when backward has already used and freed every gradient (--optimizer-in-backward)."""
        if grad_norm is None and self.train_config is not None and self.train_config.optimizer_in_backward:
            return None
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        lengths = getattr(ds, "lengths", None)
        cfg = self.train_config
        if cfg is not None and cfg.group_by_length and lengths and self.args.per_device_train_batch_size > 1:
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
        from .step_boundary import install, uninstall

        if self._tree is None or self._tree.model is not model:
            if self._tree is not None:
                uninstall(self._tree.model)
            self._tree = install(model)
        return self._tree

    def train(self, *args, **kwargs):
        resume = kwargs.get("resume_from_checkpoint")
        if isinstance(resume, str):
            self._restore_epoch_progress(resume)
        try:
            return super().train(*args, **kwargs)
        finally:
            if self._tree is not None:
                from .step_boundary import uninstall

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
                self.epoch_ids.extend(self.last_batch_ids)
        inputs["return_logits"] = False  # the loss path needs no full-vocabulary logits, in evaluation neither
        if model.training:
            self._tokens += int(num_tokens) if num_tokens is not None else int(inputs["attention_mask"].sum())
            self._samples += len(ids) if ids is not None else int(inputs["input_ids"].shape[0])
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if model.training:
            loss = result[0] if isinstance(result, tuple) else result
            if not self._finite_on_every_rank(loss):
                loss = self._nonfinite(model, loss)
                result = (loss, *result[1:]) if isinstance(result, tuple) else loss
        return result

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
        allowed = self.train_config.skip_nonfinite if self.train_config is not None else 0
        self.nonfinite_skipped = getattr(self, "nonfinite_skipped", 0)
        if self.nonfinite_skipped >= allowed:
            from .checkpoints import latest_complete

            last = latest_complete(self.args.output_dir)
            raise FloatingPointError(
                f"non-finite loss ({loss_text}) at step {step}; samples in the batch: {ids}. "
                f"Last good checkpoint: {last or 'none yet'}. Check those samples, lower the learning rate, or pass "
                f"--skip-nonfinite N to skip up to N such batches."
            )
        self.nonfinite_skipped += 1
        self.epoch_nonfinite.extend(self.last_batch_ids)
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
        from pathlib import Path

        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.is_world_process_zero():
            # the same step saved again after a resume from an earlier checkpoint: the old marker goes first, so a
            # crash while the new files are written cannot leave a folder that looks complete
            (folder / MARKER).unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()
        try:
            super()._save_checkpoint(model, trial)
        except OSError as err:
            from .checkpoints import latest_complete

            last = latest_complete(self.args.output_dir)
            raise OSError(
                f"could not write checkpoint-{self.state.global_step} ({err.strerror or err}); it is left incomplete "
                f"and will never be resumed from. Last complete checkpoint: {last or 'none'}. Free disk space, "
                "then continue with --resume."
            ) from err
        fault_injection("kill_in_save", self.state.global_step)  # files written, marker not yet
        self.accelerator.wait_for_everyone()
        progress = self._gather_epoch_progress()
        if self.is_world_process_zero():
            import json

            if self.train_config is not None:
                self.train_config.save(folder / "train_config.yaml")
            # remote code, auto_map and stop ids as the base model has them
            write_serving_files_for(folder, self.accelerator.unwrap_model(self.model), self.processing_class)
            (folder / EPOCH_PROGRESS).write_text(json.dumps({"epoch": self.state.epoch, **progress}))
            write_marker(folder, self.state.global_step)
            if self.train_config is not None:
                from .checkpoints import rotate

                rotate(folder, self.train_config.save_total_limit)
        self.accelerator.wait_for_everyone()

    def _gather_epoch_progress(self) -> dict[str, list[str]]:
        """The samples trained (and skipped as non-finite) so far this epoch, on all ranks (EpochReport's lists)."""
        seen, bad = list(self.epoch_ids), list(self.epoch_nonfinite)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, (seen, bad))
            seen = [i for p in parts for i in p[0]]
            bad = [i for p in parts for i in p[1]]
        return {"epoch_ids": seen, "epoch_nonfinite": bad}

    def _restore_epoch_progress(self, checkpoint: str) -> None:
        """A run resumed in the middle of an epoch continues that epoch's accounting (the samples trained before the
        stop were trained this epoch); from an epoch boundary there is nothing to continue. Rank 0 holds the lists;
        EpochReport gathers every rank's."""
        import json
        import math
        from pathlib import Path

        path = Path(checkpoint) / EPOCH_PROGRESS
        if not path.is_file() or not self.is_world_process_zero():
            return
        saved = json.loads(path.read_text())
        epoch = saved.get("epoch") or 0.0
        if epoch != math.floor(epoch):  # mid-epoch
            self.epoch_ids[:0] = saved.get("epoch_ids", [])
            self.epoch_nonfinite[:0] = saved.get("epoch_nonfinite", [])


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
            ("eval_anls", "anls", "{:.4f}"),
            ("eval_accuracy", "accuracy", "{:.4f}"),
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


def fault_injection(point: str, step: int) -> None:
    """Crash tests: `PHI3V_FAULT_INJECT=kill_at_step:N` or `kill_in_save:N` SIGKILLs rank 0 at that point."""
    import os
    import signal

    spec = os.environ.get("PHI3V_FAULT_INJECT")
    if not spec or int(os.environ.get("RANK", "0")) != 0:
        return
    name, _, at = spec.partition(":")
    if name == point and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)


class FaultInjection(TrainerCallback):
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


EPOCH_PROGRESS = "epoch_progress.json"  # in each checkpoint: the epoch's accounting so far (see EpochReport)


class EpochReport(TrainerCallback):
    """At the end of every epoch: every input sample accounted for (trained, truncated, refused, invalid, skipped)."""

    def __init__(self, trainer, data, path, start_step: int = 0):
        """`start_step`: where this run starts (the checkpoint resumed from, else 0). Reports of epochs that ended
        after it (an abandoned or killed run's, or a finished run's in a reused folder) are dropped: this run
        reports those epochs again, so each epoch is reported once."""
        self.trainer = trainer
        self.data = data
        self.path = path
        if trainer.is_world_process_zero() and path.is_file():
            import json

            lines = path.read_text(encoding="utf-8").splitlines()
            kept = [x for x in lines if x.strip() and json.loads(x).get("step", 0) <= start_step]
            path.write_text("".join(x + "\n" for x in kept), encoding="utf-8")

    def on_epoch_end(self, args, state, control, **kwargs):
        import json

        progress = self.trainer._gather_epoch_progress()
        seen, bad = progress["epoch_ids"], progress["epoch_nonfinite"]
        self.trainer.epoch_ids.clear()
        self.trainer.epoch_nonfinite.clear()
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
        if self.trainer.is_world_process_zero():
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
