"""`phi3v-tune train` from top to bottom: settings -> checks -> data -> model + strategy -> Trainer -> training ->
final model, metrics, loss plot and a summary.

`TrainingRun(cfg).setup()` resolves everything once (the `Runtime`, the data, the model, the Trainer and its
callbacks) and hands each component the plain values it needs; `.train()` runs the loop and writes the results.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed
from transformers.trainer_callback import ProgressCallback

from ..config import TrainConfig, adopt_run_settings, flag_text, load_yaml, show_progress
from ..evaluate.runner import split_questions
from ..model.loading import base_record
from ..model.serving_files import remote_code_note, write_serving_files
from ..model.tiny import save_tiny_checkpoint, tiny_layers
from ..processing.hub import resolve_model_source
from ..processing.processor import Phi3VProcessor
from .callbacks import (
    BestModel,
    EpochReport,
    FaultInjection,
    LogFinalStep,
    ProgressBar,
    ScheduledGC,
    StopAtStep,
    TaskMetricCallback,
)
from .checkpoints import (
    CHECKPOINT,
    claim_output_dir,
    marked_step,
    quarantine_incomplete,
    resolve_resume,
    write_marker,
)
from .distributed import (
    check_complete,
    check_resume_world_size,
    gathered_state_dict,
    leave_process_group,
    peak_memory_per_rank,
    single_process_engine,
)
from .gc_control import collector_restored
from .inputs import LoadedData, collators, datasets, read_data
from .model_setup import Checkpointing, load_model, prepare_model
from .plots import plot_losses
from .preference import (
    REFERENCE_FILE,
    PreferenceSettings,
    PreferenceTrainer,
    frozen_reference,
    run_preference_metrics,
)
from .runtime import Runtime
from .strategies import LoraSettings
from .trainer import Phi3VTrainer, Phi3VTrainingArguments

SETTINGS_FILE = "train_config.yaml"  # the resolved settings, in the output folder, every checkpoint and final/


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    if is_main_process():
        print(message, flush=True)


# --------------------------------------------------------------------------------------------------------------------
class TrainingRun:
    """One training run: `setup()` (checks, data, model, Trainer), then `train()` (loop, final model, summary)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        self.out = Path(cfg.output_dir)

    def setup(self) -> TrainingRun:
        cfg = self.cfg
        cfg.check_environment()
        show_progress(cfg.progress)
        single_process_engine(cfg.deepspeed)
        if is_main_process():
            gone = claim_output_dir(self.out, bool(cfg.resume), cfg.overwrite_output_dir)
            if gone:
                say(f"--overwrite-output-dir: deleted the previous run's {', '.join(p.name for p in gone)}")
        self.out.mkdir(parents=True, exist_ok=True)
        if is_main_process():
            for moved in quarantine_incomplete(self.out):
                say(f"warning: {moved.name}: an interrupted checkpoint write, renamed (never resumed from)")
        self.resume_from = resolve_resume(cfg.resume, self.out)
        if self.resume_from is not None:
            saved = self.resume_from / SETTINGS_FILE
            if saved.is_file():
                taken = adopt_run_settings(cfg, load_yaml(saved), self.resume_from.name)
                if taken:
                    say(f"from {self.resume_from.name}: " + ", ".join(flag_text(n, getattr(cfg, n)) for n in taken))
                cfg.validate()
        self.runtime = runtime = Runtime.resolve(cfg)
        accumulation_steps(cfg, runtime.world_size)  # a batch that does not divide fails now, not after loading
        if self.resume_from is not None:
            note = check_resume_world_size(self.resume_from, runtime.world_size, cfg.deepspeed)
            if note:
                say(f"note: {note}")
        set_seed(cfg.seed)
        self.base = ensure_base_model(
            cfg.model, self.out, seed=cfg.seed, num_crops=cfg.num_crops, revision=cfg.revision
        )
        self.processor = Phi3VProcessor.from_pretrained(
            self.base,
            num_crops=cfg.num_crops,
            apply_exif_orientation=cfg.apply_exif_orientation,
            max_image_pixels=cfg.max_image_pixels,
        )
        self.data = read_data(cfg.data_settings(), self.processor, self.out, is_main=is_main_process(), say=say)
        self.schedule = Schedule.of(cfg, len(self.data.train), runtime.world_size)
        say(self.schedule.describe())
        if self.resume_from is not None:
            say(
                f"resuming from {self.resume_from.name} (step {marked_step(self.resume_from)} of {self.schedule.steps})"
            )
        for warning in self.schedule.warnings(cfg, len(self.data.train)):
            say(f"warning: {warning}")
        if (cfg.metric or cfg.eval_steps) and not self.data.eval:
            say(
                "warning: --metric/--eval-steps are set but there is no evaluation data (--eval-data or "
                "--eval-holdout): this run evaluates nothing"
            )
        if is_main_process():
            cfg.save(self.out / SETTINGS_FILE)

        loaded = load_model(self.base, runtime, cfg.method)
        dpo = cfg.objective == "dpo"
        reference = frozen_reference(loaded, cfg.method, cfg.dpo_precompute_reference, runtime.compile) if dpo else None
        model = prepare_model(
            loaded,
            runtime,
            cfg.method,
            freeze_projector=cfg.freeze_projector,
            lora=lora_settings(cfg),
            checkpointing=Checkpointing(cfg.gradient_checkpointing, cfg.checkpointing_scope, cfg.checkpointing_layers),
            compile_fall_back=cfg.compile is None,
            say=say,
        )
        self.trainer = trainer = build_trainer(cfg, runtime, self.data, self.processor, model, self.out, reference)
        if dpo and cfg.dpo_precompute_reference:
            trainer.use_stored_reference(self.out / REFERENCE_FILE, resumed=self.resume_from is not None, say=say)
        if cfg.stop_at_step:
            trainer.add_callback(StopAtStep(cfg.stop_at_step))
        trainer.add_callback(LogFinalStep())  # after StopAtStep: it reads the stop that one sets
        start_step = marked_step(self.resume_from) if self.resume_from is not None else 0
        trainer.add_callback(
            EpochReport(trainer.ledger, self.data, self.out / "epoch_reports.jsonl", start_step, is_main_process())
        )
        if os.environ.get("PHI3V_FAULT_INJECT"):
            trainer.add_callback(FaultInjection())
        self.task_metric = None
        if cfg.metric and self.data.eval:
            evaluated = [p.answered() for p in self.data.eval] if dpo else self.data.eval  # pairs: vs the chosen
            records = split_questions(evaluated, cfg.layout(), cfg.eval_questions)
            self.task_metric = TaskMetricCallback(
                self.processor,
                records,
                cfg.metric,
                log=trainer.log,
                output_dir=self.out,
                eval_steps=cfg.eval_steps,
                start_step=start_step,
                is_main=is_main_process(),
                stop_at_step=cfg.stop_at_step,
                batch_size=cfg.eval_batch_size,
                max_new_tokens=cfg.eval_max_new_tokens,
                video_frames=cfg.video_frames,
                progress=cfg.progress,
            )
            trainer.add_callback(self.task_metric)
        self.best = None
        key = cfg.best_key()
        if self.data.eval and key and (cfg.keeps_best() or cfg.early_stopping_patience is not None):
            self.best = BestModel(
                key,
                save=self.save_model_folder if cfg.keeps_best() else None,
                output_dir=self.out,
                patience=cfg.early_stopping_patience,
                threshold=cfg.early_stopping_threshold,
            )
            trainer.add_callback(self.best)
        return self

    def save_model_folder(self, folder: Path) -> None:
        """The model as it is now as a folder that loads and serves like the base: the weights (full, published
        layout) or the adapter, the processor, the run's settings and a completion marker. Every rank calls it
        (gathering sharded weights is collective); rank 0 writes."""
        trainer, cfg = self.trainer, self.cfg
        save_final(trainer, cfg.method, self.runtime.compute_dtype, folder)
        if trainer.is_world_process_zero():
            self.processor.save_pretrained(folder)
            cfg.save(folder / SETTINGS_FILE)
            if cfg.method in ("lora", "qlora"):
                (folder / "base_model.txt").write_text(base_record(self.base))
            for warning in write_serving_files(folder, self.base, self.processor.stop_token_ids):  # remote code, stops
                say(f"warning: {warning}")
            write_marker(folder, trainer.state.global_step)
        trainer.accelerator.wait_for_everyone()

    def train(self) -> dict[str, Any]:
        """Train; returns the final metrics (also written to OUTPUT_DIR/metrics.json)."""
        cfg, trainer, out = self.cfg, self.trainer, self.out
        metrics: dict[str, Any] = {}
        # the loss before training: evaluated by the Trainer once its engine is set up (a DeepSpeed engine built for
        # evaluation first is an inference engine: ZeRO-2 refuses it, ZeRO-3 then fails in the first backward)
        trainer.args.eval_on_start = trainer.eval_dataset is not None and not self.resume_from
        with collector_restored():
            result = trainer.train(resume_from_checkpoint=str(self.resume_from) if self.resume_from else None)
        history = trainer.state.log_history  # restored from the checkpoint on --resume: the whole run's
        metrics["train"] = whole_run_train_loss(result.metrics, history, resumed_step(self.resume_from),
                                                trainer.state.global_step)  # fmt: skip
        metrics["steps"] = trainer.state.global_step
        metrics["log_history"] = history  # per-step loss, lr, throughput (also without checkpoints)
        losses = [e for e in history if "eval_loss" in e]
        if losses and losses[0].get("step") == 0:
            metrics["eval_before"] = losses[0]
        if trainer.eval_dataset is not None:
            last = losses[-1] if losses else None
            # the last step was already evaluated when it falls on --eval-steps: the same weights, not evaluated twice
            same = last is not None and last.get("step") == trainer.state.global_step and len(losses) > 1
            metrics["eval_after"] = last if same else trainer.evaluate()
        if self.task_metric is not None:
            metrics["task_metric"] = self.task_metric.points(history)
        peak = peak_memory_per_rank(on_gpu=not trainer.args.use_cpu and torch.cuda.is_available())
        if peak is not None:
            metrics["peak_gpu_memory_gib_per_rank"] = peak

        final = out / "final"
        # --stop-at-step ended a slice of the run: its checkpoint is what --resume continues; a final model would
        # claim a finished run
        stopped = bool(cfg.stop_at_step) and trainer.state.global_step < trainer.state.max_steps
        if stopped:
            metrics["stopped_at_step"] = trainer.state.global_step
            say(
                f"stopped at step {trainer.state.global_step} of {trainer.state.max_steps} "
                f"(checkpoint-{trainer.state.global_step}); continue with --resume"
            )
        if cfg.save_checkpoints and not stopped:
            self.save_model_folder(final)
            metrics["final_dir"] = str(final)
        if self.best is not None:
            best, _ = self.best.standing(trainer.state)
            if best is not None:
                metrics["best"] = {"step": best[0], self.best.key: best[1]}
                if self.best.save is not None and (out / "best").is_dir():
                    metrics["best"]["dir"] = str(out / "best")
            if self.best.stopped_early_at is not None:
                metrics["stopped_early_at_step"] = self.best.stopped_early_at
        if trainer.is_world_process_zero():
            metrics["data"] = {
                "train_samples": len(self.data.train),
                "train_refused": len(self.data.train_plan.refused),
                "train_truncated": len(self.data.train_plan.truncated),
                "train_tokens": self.data.train_plan.num_tokens,
            }
            (out / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2))
            plot_losses(trainer.state.log_history, out / "loss.png")
            summary = run_summary(metrics, cfg.metric, out, cfg.model)
            if self.best is not None:
                summary += "\n" + "\n".join(self.best.summary(trainer.state))
            say(summary.rstrip())
        leave_process_group(trainer)
        return metrics


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Train as `cfg` says; returns the final metrics (also written to OUTPUT_DIR/metrics.json)."""
    return TrainingRun(cfg).setup().train()


# --------------------------------------------------------------------------------------------------------------------
def ensure_base_model(
    model: str | None, output_dir: Path, *, seed: int, num_crops: int, revision: str | None = None
) -> str:
    """The base model folder (a hub id: its snapshot, resolved once); 'tiny' (or 'tiny:N', N decoder layers) writes a
    tiny random model under the output folder (smoke tests, demo)."""
    if model is None:
        raise ValueError("--model is required (a model folder, a hub id, or 'tiny')")
    layers = tiny_layers(model)
    if layers is None:
        return str(resolve_model_source(model, revision))
    folder = output_dir / "base-tiny"
    if is_main_process():
        if not (folder / "config.json").is_file():
            tmp = folder.with_name(f"base-tiny.tmp-{os.getpid()}")
            save_tiny_checkpoint(
                tmp, seed=seed, num_crops=num_crops, **({"num_hidden_layers": layers} if layers else {})
            )
            os.replace(tmp, folder)  # complete or absent: other ranks never see a half-written folder
    else:  # the process group does not exist yet: wait for rank 0's folder to appear
        deadline = time.time() + 600
        while not (folder / "config.json").is_file():
            if time.time() > deadline:
                raise TimeoutError(f"{folder}: rank 0 did not write the tiny base model")
            time.sleep(0.2)
    return str(folder)


def preference_settings(cfg: TrainConfig) -> PreferenceSettings:
    return PreferenceSettings(
        beta=cfg.dpo_beta,
        loss_type=cfg.dpo_loss,
        label_smoothing=cfg.dpo_label_smoothing,
        sft_weight=cfg.dpo_sft_weight,
    )


def lora_settings(cfg: TrainConfig) -> LoraSettings:
    return LoraSettings(
        rank=cfg.lora_rank,
        alpha=cfg.effective_lora_alpha,
        dropout=cfg.lora_dropout,
        lm_head=cfg.lora_lm_head,
        vision=cfg.lora_vision,
        variant=cfg.lora_variant,
    )


# FSDP units: the layers whose weights are gathered together (the model's `_no_split_modules`)
FSDP_LAYERS = ["Phi3DecoderLayer", "CLIPEncoderLayer"]


def fsdp_arguments(enabled: bool) -> dict[str, Any]:
    """TrainingArguments for FSDP2 (what configs/accelerate/fsdp2.yaml says, for plain torchrun).

    Activation checkpointing stays with --gradient-checkpointing (not FSDP's own wrapper, which would rename the
    state-dict keys); the full state dict is gathered for the final save.
    """
    if not enabled:
        return {}
    return {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": list(FSDP_LAYERS),
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": False,
        },
    }


def accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    """Forward passes per optimizer step on each device: --batch-size / (--batch-size-per-device x devices)."""
    per_step = cfg.batch_size_per_device * world_size
    if cfg.batch_size % per_step:
        raise ValueError(
            f"--batch-size {cfg.batch_size} must be a multiple of --batch-size-per-device x devices = {per_step}"
        )
    return cfg.batch_size // per_step


@dataclass(frozen=True)
class Schedule:
    """The run's optimizer steps and warm-up, known before the model loads (the Trainer's own arithmetic: passes
    per device per epoch, rounded up to whole optimizer steps)."""

    steps: int
    steps_per_epoch: int
    warmup: int

    @classmethod
    def of(cls, cfg: TrainConfig, samples: int, world_size: int) -> Schedule:
        per_device = math.ceil(samples / world_size)  # the distributed sampler evens out the ranks
        passes = math.ceil(per_device / cfg.batch_size_per_device)
        accumulation = accumulation_steps(cfg, world_size)
        per_epoch = max(passes // accumulation + int(passes % accumulation > 0), 1)
        steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * per_epoch)
        warmup = math.ceil(steps * cfg.warmup_ratio) if cfg.warmup_ratio is not None else cfg.warmup_steps
        return cls(steps, per_epoch, warmup)

    def describe(self) -> str:
        return f"schedule: {self.steps} optimizer step(s), {self.steps_per_epoch} per epoch, {self.warmup} warm-up"

    def warnings(self, cfg: TrainConfig, samples: int) -> list[str]:
        """What would make a run train little or nothing, said before anything slow starts."""
        found = []
        if self.steps <= self.warmup:
            longer = "train longer (--epochs, a smaller --batch-size)"
            if cfg.warmup_ratio is not None:
                given, fix = f"--warmup-ratio {cfg.warmup_ratio:g}", f"{longer.capitalize()}, or set --warmup-ratio 0"
            else:
                given, fix = "--warmup-steps", f"Lower --warmup-steps, use --warmup-ratio 0.1, or {longer}"
            found.append(
                f"the run has {self.steps} optimizer step(s) and {self.warmup} warm-up step(s) ({given}): the learning "
                f"rate never reaches --learning-rate {cfg.learning_rate:g} (the first step runs at 0). {fix}"
            )
        if cfg.batch_size > samples:
            found.append(
                f"--batch-size {cfg.batch_size} is more than the {samples} training samples: every epoch is a single "
                f"optimizer step; lower --batch-size (e.g. {max(1, 2 ** int(math.log2(max(1, samples // 4))))})"
            )
        return found


def training_arguments(cfg: TrainConfig, runtime: Runtime) -> Phi3VTrainingArguments:
    """The settings as the Trainer's arguments (ours ride on the subclass)."""
    accumulation = accumulation_steps(cfg, runtime.world_size)
    evaluate = cfg.eval_steps is not None and (cfg.eval_data or cfg.eval_holdout)
    on_cuda = runtime.on_cuda
    return Phi3VTrainingArguments(
        output_dir=cfg.output_dir,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size_per_device,
        per_device_eval_batch_size=cfg.batch_size_per_device,
        gradient_accumulation_steps=accumulation,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_epsilon,
        # a ratio is resolved by the Trainer from its own step count (a float below 1 is a share of the steps)
        warmup_steps=cfg.warmup_ratio if cfg.warmup_ratio is not None else cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=runtime.autocast_bf16,  # all-bf16 weights (bf16-sr) need no autocast
        fp16=runtime.fp16,
        save_strategy="steps" if cfg.save_checkpoints else "no",
        save_steps=cfg.save_steps,
        save_total_limit=None,  # rotated by Phi3VTrainer once the new checkpoint is marked complete
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        # our compute_loss stops on (or, within --skip-nonfinite, skips) a non-finite loss before its backward; the
        # Trainer's own filter would only add a GPU-to-host read after every backward
        logging_nan_inf_filter=False,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=cfg.eval_steps if evaluate else None,
        report_to=cfg.trackers(),
        dataloader_num_workers=cfg.num_workers,
        # keep the workers across epochs: re-forking them at every epoch start leaves the GPU waiting
        dataloader_persistent_workers=cfg.num_workers > 0,
        dataloader_pin_memory=on_cuda,
        # pinned batches go to the GPU asynchronously: a blocking copy would wait at every step's start until the GPU
        # has finished the previous step, so the host could never prepare a step while the GPU runs the last one
        accelerator_config={"non_blocking": on_cuda},
        remove_unused_columns=False,
        label_names=["labels"],
        deepspeed=cfg.deepspeed,
        **fsdp_arguments(cfg.fsdp),
        ddp_find_unused_parameters=False,
        # the model's buffers are constants (RoPE inverse frequencies, CLIP position ids): no broadcast every forward
        ddp_broadcast_buffers=False,
        optim="adamw_torch_fused" if on_cuda else "adamw_torch",
        disable_tqdm=False,
        use_cpu=not on_cuda,
        save_only_model=False,
        # ours
        skip_nonfinite=cfg.skip_nonfinite,
        optimizer_in_backward=cfg.optimizer_in_backward,
        master_weights=runtime.master_weights,
        length_grouped_batches=cfg.group_by_length,
        checkpoints_to_keep=cfg.save_total_limit,
        part_learning_rates=cfg.part_learning_rates(),
        settings_file=str(Path(cfg.output_dir) / SETTINGS_FILE),
    )


def select_sdpa_backend(on_cuda: bool, backend: str) -> None:
    """--sdpa-backend: flash turns PyTorch's cuDNN attention off for this process (CUDA only; the CPU has neither)."""
    if on_cuda:
        torch.backends.cuda.enable_cudnn_sdp(backend == "cudnn")


def build_trainer(
    cfg: TrainConfig,
    runtime: Runtime,
    data: LoadedData,
    processor: Phi3VProcessor,
    model: torch.nn.Module,
    output_dir: Path,
    reference: torch.nn.Module | None = None,
) -> Phi3VTrainer:
    """Datasets, collators and our Trainer with its progress bar and garbage-collection schedule (--objective dpo:
    the preference Trainer, with `reference` as its reference model when it keeps one in memory)."""
    select_sdpa_backend(runtime.on_cuda, cfg.sdpa_backend)
    settings = cfg.data_settings()
    train_ds, eval_ds = datasets(data, processor, settings)
    config = getattr(model, "config", None)
    train_collator, eval_collator = collators(
        processor.tokenizer.pad_token_id,
        runtime.packing,
        cfg.packing_max_tokens,
        getattr(config, "rope_switch_length", None),
        pairs=cfg.objective == "dpo",
    )
    trainer_class, objective = Phi3VTrainer, {}
    if cfg.objective == "dpo":
        trainer_class = PreferenceTrainer
        objective = {"preference": preference_settings(cfg), "reference_model": reference}
    trainer = trainer_class(
        model=model,
        args=training_arguments(cfg, runtime),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=train_collator,
        eval_data_collator=eval_collator,
        processing_class=processor,
        **objective,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressBar(disable=not cfg.progress))
    if cfg.gc_interval:
        trainer.add_callback(ScheduledGC(cfg.gc_interval))
    return trainer


# --------------------------------------------------------------------------------------------------------------------
def resumed_step(checkpoint: Path | None) -> int:
    """The optimizer step a run resumed from (0 for a fresh run): the N of checkpoint-N."""
    if checkpoint is None:
        return 0
    match = CHECKPOINT.match(checkpoint.name)
    return int(match[1]) if match else 0


def whole_run_train_loss(
    train_metrics: dict[str, Any], history: list[dict[str, Any]], start: int, steps: int
) -> dict[str, Any]:
    """The Trainer's train_loss averages the steps this process ran; after --resume from step `start` the earlier
    steps' losses come from the restored log history, whose logging windows end at the checkpoint's step when they
    tile steps 1..start (each entry's loss is its window's mean). Then train_loss is the mean over the whole run, as
    an uninterrupted run reports it; otherwise `train_loss_from_step` says which steps it averages."""
    if start <= 0 or "train_loss" not in train_metrics or steps <= start:
        return train_metrics
    logged = [(e["step"], e["loss"]) for e in history if "loss" in e and "step" in e and e["step"] <= start]
    if not logged or logged[-1][0] != start:
        return {**train_metrics, "train_loss_from_step": start + 1}
    earlier, previous = 0.0, 0
    for step, loss in logged:
        earlier += loss * (step - previous)
        previous = step
    return {**train_metrics, "train_loss": (earlier + train_metrics["train_loss"] * (steps - start)) / steps}


def evaluation_label(metrics: dict[str, Any], when: str) -> str:
    """'before' or 'after' training; a --stop-at-step slice's last evaluation is 'at step N', the run goes on."""
    if when == "eval_after" and "stopped_at_step" in metrics:
        return f"at step {metrics['stopped_at_step']}"
    return when.removeprefix("eval_")


def run_summary(metrics: dict[str, Any], metric: str | None, out: Path, model: str | None = None) -> str:
    """The lines a finished run ends with: steps and loss, the evaluation before/after, and where everything is."""
    # the first and the last logged loss (the log history is restored on --resume: the whole run's)
    logged = [(e["step"], e["loss"]) for e in metrics.get("log_history", []) if "loss" in e and "step" in e]
    if logged:
        (first_step, first), (last_step, last) = logged[0], logged[-1]
        loss = f"train loss {first:.4f} (step {first_step}) -> {last:.4f} (step {last_step})"
    else:
        loss = f"train loss {metrics.get('train', {}).get('train_loss', float('nan')):.4f}"
    lines = [f"done: {metrics.get('steps', '?')} steps, {loss}"]
    for when in ("eval_before", "eval_after"):
        if when in metrics and "eval_loss" in metrics[when]:
            lines.append(f"  eval loss {evaluation_label(metrics, when)}: {metrics[when]['eval_loss']:.4f}")
    lines += run_preference_metrics(metrics, lambda when: evaluation_label(metrics, when))
    for entry in metrics.get("task_metric", []):
        if entry.get("when") in ("before", "after"):
            lines.append(f"  {metric} {entry['when']} (step {entry['step']}): {entry[f'eval_{metric}']:.4f}")
    if "final_dir" in metrics:
        lines.append(f"  final model: {metrics['final_dir']}")
        if tiny_layers(model) is None and (note := remote_code_note(metrics["final_dir"])):  # how to add remote code
            lines.append(f"  note: {note}")
    lines.append(f"  metrics: {out / 'metrics.json'}; loss plot: {out / 'loss.png'}")
    return "\n".join(lines)


def save_final(trainer: Phi3VTrainer, method: str, dtype: torch.dtype, final: Path) -> None:
    """The final model: an adapter for lora/qlora; for full/freeze-vision, the published layout (safetensors shards
    of at most 5 GB, the published key names) in `dtype`, the training's precision: bf16/fp16 like the published
    checkpoint, fp32 when trained in fp32.

    The same writer serves every engine: under ZeRO-3 and FSDP the shards are first gathered into one state on
    rank 0 (every rank takes part), under ZeRO-2 / DDP / one device rank 0 already has all weights.
    """
    if method in ("lora", "qlora"):
        trainer.save_model(str(final))
        return
    state = gathered_state_dict(trainer)
    if trainer.is_world_process_zero():
        assert state is not None
        model = trainer.accelerator.unwrap_model(trainer.model)
        check_complete(state, model)
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.save_pretrained(final, state_dict=state, max_shard_size="5GB")
        cfg_file = final / "config.json"
        data = json.loads(cfg_file.read_text())
        data["torch_dtype"] = data["dtype"] = str(dtype).replace("torch.", "")
        cfg_file.write_text(json.dumps(data, indent=2))
    trainer.accelerator.wait_for_everyone()


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x
