"""`phi3v-tune train`: data -> checks -> model + strategy -> HF Trainer -> checkpoints, final model, loss plot."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data import DataError, load_records, validate_records
from ..data.collate import Collator
from ..data.dataset import ConversationDataset, DataPlan, plan_records, write_refused
from ..data.packing import PackingCollator
from ..data.schema import Problem, Record
from ..model.loading import base_record
from ..model.modeling import Phi3VForCausalLM
from ..model.packed_attention import ATTN_NAME as PACKED_ATTENTION
from ..model.serving_files import remote_code_note, write_serving_files
from ..processing.hub import resolve_model_source
from ..processing.processor import Phi3VProcessor
from .checkpoints import marked_step, quarantine_incomplete, resolve_resume, write_marker
from .config import TrainConfig, fsdp_on
from .distributed import (
    check_complete,
    check_resume_world_size,
    free_port,
    gathered_state_dict,
    is_distributed,
    peak_memory_per_rank,
)
from .plots import plot_losses
from .strategies import apply_strategy, count_parameters, qlora_quantization_config


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    if is_main_process():
        print(message, flush=True)


@dataclass
class LoadedData:
    train: list[Record]
    eval: list[Record]
    train_plan: DataPlan
    eval_plan: DataPlan | None
    input_total: int = 0  # every non-blank input line / row, good or bad
    invalid: int = 0  # samples skipped for data problems (--skip-bad-samples)


# --------------------------------------------------------------------------------------------------------------------
def ensure_base_model(cfg: TrainConfig) -> str:
    """The base model folder (a hub id: its snapshot, resolved once); 'tiny' writes a tiny random model under the
    output folder (smoke tests, demo)."""
    if cfg.model is None:
        raise ValueError("--model is required (a model folder, a hub id, or 'tiny')")
    if cfg.model != "tiny":
        return str(resolve_model_source(cfg.model, cfg.revision))
    from ..model.tiny import save_tiny_checkpoint

    folder = Path(cfg.output_dir) / "base-tiny"
    if is_main_process():
        if not (folder / "config.json").is_file():
            tmp = folder.with_name(f"base-tiny.tmp-{os.getpid()}")
            save_tiny_checkpoint(tmp, seed=cfg.seed, num_crops=cfg.num_crops)
            os.replace(tmp, folder)  # complete or absent: other ranks never see a half-written folder
    else:  # the process group does not exist yet: wait for rank 0's folder to appear
        import time

        deadline = time.time() + 600
        while not (folder / "config.json").is_file():
            if time.time() > deadline:
                raise TimeoutError(f"{folder}: rank 0 did not write the tiny base model")
            time.sleep(0.2)
    return str(folder)


def on_cuda(cfg: TrainConfig) -> bool:
    """Training runs on a CUDA GPU: one is present and --cpu was not asked for."""
    return not cfg.cpu and torch.cuda.is_available()


def precision(cfg: TrainConfig) -> tuple[bool, bool]:
    """(bf16, fp16) for the Trainer: bf16 by default on GPUs that support it; fp32 on CPU unless asked."""
    if cfg.fp16:
        return False, True
    if cfg.bf16 or cfg.master_weights == "bf16-sr":
        return True, False
    if on_cuda(cfg) and torch.cuda.is_bf16_supported():
        return True, False
    return False, False


def uses_packing(cfg: TrainConfig) -> bool:
    """Packing changes nothing with one sample per forward pass, so it is only used with several."""
    return cfg.packing and cfg.batch_size_per_device > 1


def attention_implementation(cfg: TrainConfig) -> str:
    """sdpa, or with packing its padding-free extension (identical to sdpa on padded batches and in generation)."""
    if uses_packing(cfg) and cfg.attn_implementation == "sdpa":
        return PACKED_ATTENTION
    return cfg.attn_implementation  # eager + packing: transformers' block-diagonal mask from the position ids


def data_collators(cfg: TrainConfig, processor: Phi3VProcessor, model: torch.nn.Module) -> tuple[Any, Collator]:
    """(training collator, evaluation collator): packed rows for training when packing is on, padded evaluation."""
    padded = Collator(processor.tokenizer.pad_token_id)
    if not uses_packing(cfg):
        return Collator(processor.tokenizer.pad_token_id, omit_full_mask=True), padded
    config = getattr(model, "config", None)
    rope = getattr(config, "rope_parameters", None) or {}
    switch = getattr(config, "original_max_position_embeddings", None) if rope.get("rope_type") == "longrope" else None
    packed = PackingCollator(processor.tokenizer.pad_token_id, cfg.packing_max_tokens, switch)
    return packed, padded


def master_weights(cfg: TrainConfig) -> str:
    """'bf16-sr' or 'fp32' ('auto': bf16-sr when training in bf16 on a CUDA GPU without DeepSpeed, so CPU runs stay
    exact fp32).

    bf16-sr trains bf16 weights (for lora/qlora: bf16 adapters) without autocast: no per-op casts, no fp32 copies of
    activations for the adapters (for qlora no fp32 copy of the frozen vision tower, embeddings and norms either),
    and the optimizer's stochastic rounding keeps small updates. Under FSDP2 (sharded DTensor parameters) and
    DeepSpeed the engine's own mixed precision keeps fp32 master weights."""
    if cfg.master_weights != "auto":
        return cfg.master_weights
    return "bf16-sr" if on_cuda(cfg) and precision(cfg)[0] and not cfg.deepspeed and not fsdp_on(cfg) else "fp32"


def compile_on(cfg: TrainConfig) -> bool:
    """--compile, or by default: on a CUDA GPU without DeepSpeed or FSDP (the engines wrap parameters in ways not
    measured together with compiled layers), for full / freeze-vision / lora, and for qlora with activation
    checkpointing. Measured on an H100 (benchmarks/RESULTS.md): qlora with checkpointing 2.92 vs 1.97 img/s eager,
    without it 3.05 vs 3.23 (a little slower, so eager stays the default there)."""
    if cfg.compile is not None:
        return cfg.compile
    if not on_cuda(cfg) or cfg.deepspeed or fsdp_on(cfg):
        return False
    return cfg.method != "qlora" or cfg.gradient_checkpointing


def load_model(cfg: TrainConfig, folder: str) -> Phi3VForCausalLM:
    bf16, fp16 = precision(cfg)
    kwargs: dict[str, Any] = {"attn_implementation": attention_implementation(cfg)}
    if cfg.method in ("lora", "qlora"):
        # frozen base weights in the compute dtype; adapters are kept in fp32 by PEFT
        kwargs["dtype"] = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    elif master_weights(cfg) == "bf16-sr":
        kwargs["dtype"] = torch.bfloat16  # bf16 weights; the optimizer rounds stochastically (train/optim.py)
    else:
        kwargs["dtype"] = torch.float32  # fp32 master weights; bf16/fp16 autocast does the math
    if cfg.method == "qlora":
        kwargs["quantization_config"] = qlora_quantization_config(cfg)
    return Phi3VForCausalLM.from_pretrained(folder, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
def prepare_model(cfg: TrainConfig, base: str):
    """Load the base model, set what trains (`--method`), compile layers if asked: the model the Trainer gets."""
    model = apply_strategy(load_model(cfg, base), cfg)
    weights = f", {master_weights(cfg)} master weights" if cfg.method in ("full", "freeze-vision") else ""
    say(f"method {cfg.method}{weights}: {count_parameters(model)}")
    if cfg.gradient_checkpointing:  # ours, not the Trainer's switch, which would also wrap every frozen CLIP layer
        from .strategies import checkpoint_only

        layers = checkpoint_only(model, cfg.checkpointing_scope, cfg.checkpointing_layers)
        which = "" if cfg.checkpointing_layers is None else f", first {cfg.checkpointing_layers} decoder layers"
        say(f"activation checkpointing: {layers} layers (scope {cfg.checkpointing_scope}{which})")
    if compile_on(cfg):
        from .compile import compile_layers

        count = compile_layers(model, fall_back=cfg.compile is None)
        say(f"torch.compile: {count} layers (compiled on first use; --no-compile runs them eagerly)")
    return model


def _longer(plan: DataPlan) -> str:
    """'raise --max-length, ' when a refusal is about length (an unreadable video is not)."""
    return "raise --max-length, " if any(reason != "invalid" for _, reason, _ in plan.refused) else ""


def _read_checked(cfg: TrainConfig, data: str | list[str], split: str) -> tuple[list[Record], list[Problem]]:
    """Records of `data` and every problem of them, read and checked with the run's settings."""
    records, problems = load_records(data, image_dir=cfg.image_dir, split=split)
    return records, validate_records(
        records,
        problems,
        max_image_pixels=cfg.max_image_pixels,
        multi_turn=cfg.multi_turn,
        video_frames=cfg.video_frames,
    )


def read_data(cfg: TrainConfig, processor: Phi3VProcessor, output_dir: Path) -> LoadedData:
    """Load and check everything up front; stop with the full report unless --skip-bad-samples."""
    if not cfg.data:
        raise ValueError("--data is required")
    records, problems = _read_checked(cfg, cfg.data, cfg.split)
    loaded = {r.origin for r in records}
    bad_origins = {p.origin for p in problems}  # one origin (file:line / row) per bad sample
    input_total = len(records) + len(bad_origins - loaded)
    if problems:
        if not cfg.skip_bad_samples:
            raise DataError(
                problems,
                header=f"{len(problems)} problem(s) in {cfg.data} (nothing was trained; fix "
                "them or pass --skip-bad-samples):",
            )
        skipped = output_dir / "skipped_samples.tsv"
        if is_main_process():
            skipped.parent.mkdir(parents=True, exist_ok=True)
            with open(skipped, "w", encoding="utf-8") as f:
                f.write("id\torigin\tfield\tproblem\n")
                for p in problems:  # a line that did not parse has no id: its origin (file:line) names it
                    f.write(f"{p.id if p.id is not None else '-'}\t{p.origin}\t{p.field}\t{p.message}\n")
        say(f"skipping {len(bad_origins)} sample(s) with {len(problems)} problem(s); listed in {skipped}")
        records = [r for r in records if r.origin not in bad_origins]
    eval_records: list[Record] = []
    if cfg.eval_data:
        eval_records, eval_problems = _read_checked(cfg, cfg.eval_data, cfg.eval_split or cfg.split)
        if eval_problems:
            raise DataError(eval_problems, header=f"{len(eval_problems)} problem(s) in {cfg.eval_data}:")
    elif cfg.eval_holdout > 0:
        eval_records, records = records[: cfg.eval_holdout], records[cfg.eval_holdout :]
    plan = plan_records(
        records, processor, cfg.max_length, cfg.video_frames, progress=is_main_process(), multi_turn=cfg.multi_turn
    )
    say(plan.summary("training data"))
    if plan.refused:
        path = output_dir / "refused_samples.tsv"
        if is_main_process():  # every rank knows the list; one writes it (a shared folder is written once)
            write_refused(plan, path)
        if not cfg.skip_bad_samples:
            raise DataError(
                [],
                header=f"{len(plan.refused)} sample(s) cannot be trained on as they are (listed in "
                f"{path}); fix them, {_longer(plan)}or pass --skip-bad-samples",
            )
    eval_plan = None
    if eval_records:
        eval_plan = plan_records(
            eval_records, processor, cfg.max_length, cfg.video_frames, progress=False, multi_turn=cfg.multi_turn
        )
        say(eval_plan.summary("evaluation data"))
        if eval_plan.refused:  # same rule as training: a metric over fewer samples than given is not silent
            path = output_dir / "refused_eval_samples.tsv"
            if is_main_process():
                write_refused(eval_plan, path)
            if not cfg.skip_bad_samples:
                raise DataError(
                    [],
                    header=f"{len(eval_plan.refused)} evaluation sample(s) cannot be evaluated as they are (listed "
                    f"in {path}); fix them, {_longer(eval_plan)}or pass --skip-bad-samples to evaluate without them",
                )
    if not plan.kept:
        raise DataError([], header="no trainable samples left")
    return LoadedData(plan.kept, eval_plan.kept if eval_plan else [], plan, eval_plan, input_total, len(bad_origins))


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


def training_arguments(cfg: TrainConfig, world_size: int):
    from .trainer import Phi3VTrainingArguments

    per_step = cfg.batch_size_per_device * world_size
    if cfg.batch_size % per_step:
        raise ValueError(
            f"--batch-size {cfg.batch_size} must be a multiple of --batch-size-per-device x devices = {per_step}"
        )
    bf16, fp16 = precision(cfg)
    report = [] if cfg.report_to in ("", "none") else [x.strip() for x in cfg.report_to.split(",") if x.strip()]
    evaluate = cfg.eval_steps is not None and (cfg.eval_data or cfg.eval_holdout)
    return Phi3VTrainingArguments(
        output_dir=cfg.output_dir,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size_per_device,
        per_device_eval_batch_size=cfg.batch_size_per_device,
        gradient_accumulation_steps=cfg.batch_size // per_step,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_epsilon,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16 and master_weights(cfg) != "bf16-sr",  # all-bf16 weights need no autocast
        fp16=fp16,
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
        report_to=report,
        dataloader_num_workers=cfg.num_workers,
        # keep the workers across epochs: re-forking them at every epoch start leaves the GPU waiting
        dataloader_persistent_workers=cfg.num_workers > 0,
        dataloader_pin_memory=on_cuda(cfg),
        # pinned batches go to the GPU asynchronously: a blocking copy would wait at every step's start until the GPU
        # has finished the previous step, so the host could never prepare a step while the GPU runs the last one
        accelerator_config={"non_blocking": on_cuda(cfg)},
        remove_unused_columns=False,
        label_names=["labels"],
        deepspeed=cfg.deepspeed,
        **fsdp_arguments(cfg.fsdp),
        ddp_find_unused_parameters=False,
        # the model's buffers are constants (RoPE inverse frequencies, CLIP position ids): no broadcast every forward
        ddp_broadcast_buffers=False,
        optim="adamw_torch_fused" if on_cuda(cfg) else "adamw_torch",
        disable_tqdm=False,
        use_cpu=not on_cuda(cfg),
        save_only_model=False,
    )


def select_sdpa_backend(cfg: TrainConfig) -> None:
    """--sdpa-backend: flash turns PyTorch's cuDNN attention off for this process (CUDA only; the CPU has neither)."""
    if on_cuda(cfg):
        torch.backends.cuda.enable_cudnn_sdp(cfg.sdpa_backend == "cudnn")


def build_trainer(cfg: TrainConfig, data: LoadedData, processor: Phi3VProcessor, model: torch.nn.Module, world: int):
    """Datasets, collators and our Trainer with its progress bar: what `run_training` and the benchmark share."""
    from transformers.trainer_callback import ProgressCallback

    from .trainer import Phi3VTrainer, ProgressBar

    select_sdpa_backend(cfg)
    train_ds = ConversationDataset(
        data.train, processor, cfg.max_length, cfg.video_frames, data.train_plan.lengths, multi_turn=cfg.multi_turn
    )
    eval_ds = (
        ConversationDataset(data.eval, processor, cfg.max_length, cfg.video_frames, multi_turn=cfg.multi_turn)
        if data.eval
        else None
    )
    train_collator, eval_collator = data_collators(cfg, processor, model)
    trainer = Phi3VTrainer(
        model=model,
        args=training_arguments(cfg, world),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=train_collator,
        eval_data_collator=eval_collator,
        processing_class=processor,
        train_config=cfg,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressBar(disable=not cfg.progress))
    if cfg.gc_interval:
        from .gc_control import ScheduledGC

        trainer.add_callback(ScheduledGC(cfg.gc_interval))
    return trainer


# --------------------------------------------------------------------------------------------------------------------
def single_process_engine(cfg: TrainConfig) -> None:
    """`phi3v-tune train --deepspeed ...` started without a launcher: DeepSpeed would look for MPI to learn its
    rank (and fail without mpi4py); give it the one-process group torchrun would have given."""
    if not cfg.deepspeed or "WORLD_SIZE" in os.environ:
        return
    mpi_or_slurm = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")  # launchers DeepSpeed finds ranks from
    if any(int(os.environ.get(key, "1") or 1) > 1 for key in mpi_or_slurm):
        return
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**defaults, "MASTER_PORT": str(free_port())}.items():  # the process group's store
        os.environ.setdefault(key, value)


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Train as `cfg` says; returns the final metrics (also written to OUTPUT_DIR/metrics.json)."""
    from transformers import set_seed

    from .trainer import FaultInjection, StopAtStep

    cfg.validate()
    cfg.check_environment()
    single_process_engine(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        moved = quarantine_incomplete(out)
        for m in moved:
            say(f"warning: {m.name}: an interrupted checkpoint write, renamed (never resumed from)")
    resume_from = resolve_resume(cfg.resume, out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if resume_from is not None:
        note = check_resume_world_size(resume_from, world, cfg.deepspeed)
        if note:
            say(f"note: {note}")
    set_seed(cfg.seed)
    base = ensure_base_model(cfg)
    processor = Phi3VProcessor.from_pretrained(
        base, num_crops=cfg.num_crops, apply_exif_orientation=cfg.apply_exif_orientation
    )
    processor.image_processor.max_image_pixels = cfg.max_image_pixels
    data = read_data(cfg, processor, out)
    if (cfg.metric or cfg.eval_steps) and not data.eval:
        say(
            "warning: --metric/--eval-steps are set but there is no evaluation data (--eval-data or --eval-holdout): "
            "this run evaluates nothing"
        )
    if is_main_process():
        cfg.save(out / "train_config.yaml")

    model = prepare_model(cfg, base)

    trainer = build_trainer(cfg, data, processor, model, world)
    if cfg.stop_at_step:
        trainer.add_callback(StopAtStep(cfg.stop_at_step))
    from .trainer import EpochReport, LogFinalStep

    trainer.add_callback(LogFinalStep())  # after StopAtStep: it reads the stop that one sets

    start_step = marked_step(resume_from) if resume_from is not None else 0
    trainer.add_callback(EpochReport(trainer, data, out / "epoch_reports.jsonl", start_step))
    if os.environ.get("PHI3V_FAULT_INJECT"):
        trainer.add_callback(FaultInjection())
    task_metric = None
    if cfg.metric and data.eval:
        from ..evaluate.runner import split_questions
        from .eval_callback import TaskMetricCallback

        task_metric = TaskMetricCallback(
            trainer, processor, split_questions(data.eval, cfg.multi_turn, cfg.eval_questions, cfg.video_frames), cfg
        )
        trainer.add_callback(task_metric)

    metrics: dict[str, Any] = {}
    # the loss before training: evaluated by the Trainer once its engine is set up (a DeepSpeed engine built for
    # evaluation first is an inference engine: ZeRO-2 refuses it, ZeRO-3 then fails in the first backward)
    trainer.args.eval_on_start = trainer.eval_dataset is not None and not resume_from
    from .gc_control import collector_restored

    with collector_restored():
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    metrics["train"] = result.metrics
    metrics["steps"] = trainer.state.global_step
    metrics["log_history"] = trainer.state.log_history  # per-step loss, lr, throughput (also without checkpoints)
    if trainer.args.eval_on_start:
        metrics["eval_before"] = next(e for e in trainer.state.log_history if "eval_loss" in e)
    if trainer.eval_dataset is not None:
        metrics["eval_after"] = trainer.evaluate()
    if task_metric is not None:
        metrics["task_metric"] = task_metric.history
    peak = peak_memory_per_rank(on_gpu=not trainer.args.use_cpu and torch.cuda.is_available())
    if peak is not None:
        metrics["peak_gpu_memory_gib_per_rank"] = peak

    final = out / "final"
    # --stop-at-step ended a slice of the run: its checkpoint is what --resume continues; a final model would claim a
    # finished run
    stopped = bool(cfg.stop_at_step) and trainer.state.global_step < trainer.state.max_steps
    if stopped:
        metrics["stopped_at_step"] = trainer.state.global_step
        say(
            f"stopped at step {trainer.state.global_step} of {trainer.state.max_steps} "
            f"(checkpoint-{trainer.state.global_step}); continue with --resume"
        )
    if cfg.save_checkpoints and not stopped:
        save_final(trainer, cfg, final)
    if trainer.is_world_process_zero():
        if cfg.save_checkpoints and not stopped:
            processor.save_pretrained(final)
            cfg.save(final / "train_config.yaml")
            if cfg.method in ("lora", "qlora"):
                (final / "base_model.txt").write_text(base_record(base))
            for warning in write_serving_files(final, base, processor.stop_token_ids):  # remote code, stop ids
                say(f"warning: {warning}")
            write_marker(final, trainer.state.global_step)
            metrics["final_dir"] = str(final)
        metrics["data"] = {
            "train_samples": len(data.train),
            "train_refused": len(data.train_plan.refused),
            "train_truncated": len(data.train_plan.truncated),
            "train_tokens": data.train_plan.num_tokens,
        }
        (out / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2))
        plot_losses(trainer.state.log_history, out / "loss.png")
        say(run_summary(metrics, cfg, out))
    leave_process_group(trainer)
    return metrics


def run_summary(metrics: dict[str, Any], cfg: TrainConfig, out: Path) -> str:
    """The lines a finished run ends with: steps and loss, the evaluation before/after, and where everything is."""
    # the logged losses, not the Trainer's train_loss: the log history is restored on --resume, while train_loss sums
    # only the resumed part's losses (and divides by every step)
    logged = [(e["step"], e["loss"]) for e in metrics.get("log_history", []) if "loss" in e and "step" in e]
    if logged:
        (first_step, first), (last_step, last) = logged[0], logged[-1]
        loss = f"train loss {first:.4f} (step {first_step}) -> {last:.4f} (step {last_step})"
    else:
        loss = f"train loss {metrics.get('train', {}).get('train_loss', float('nan')):.4f}"
    lines = [f"done: {metrics.get('steps', '?')} steps, {loss}"]
    for when in ("eval_before", "eval_after"):
        if when in metrics and "eval_loss" in metrics[when]:
            lines.append(f"  eval loss {when.removeprefix('eval_')}: {metrics[when]['eval_loss']:.4f}")
    for entry in metrics.get("task_metric", []):
        if entry.get("when") in ("before", "after"):
            lines.append(f"  {cfg.metric} {entry['when']} (step {entry['step']}): {entry[f'eval_{cfg.metric}']:.4f}")
    if "final_dir" in metrics:
        lines.append(f"  final model: {metrics['final_dir']}")
        if cfg.model != "tiny" and (note := remote_code_note(metrics["final_dir"])):  # how to add remote code
            lines.append(f"  note: {note}")
    lines.append(f"  metrics: {out / 'metrics.json'}; loss plot: {out / 'loss.png'}")
    return "\n".join(lines)


def leave_process_group(trainer) -> None:
    """End a distributed run for good while the interpreter is fully alive: a last barrier (every rank waits for
    rank 0's writes), release the DDP wrapper / DeepSpeed engine, then destroy the process group.

    `destroy_process_group()` only unregisters the group: the DDP wrapper (its `process_group` and C++ reducer)
    still owns the ProcessGroupGloo, so gloo's worker and socket threads were still running when the interpreter
    shut down, and the group was torn down (or not) in whatever order finalization reached it while the peer exited
    at the same time; now and then a rank aborted at exit ("terminate called without an active exception").
    The wrappers go first: DeepSpeed's engine.destroy() (called by accelerate's free_memory) still talks to the
    group, and once nothing else holds the group, destroying it frees it (and joins its threads) right there.
    """
    import gc

    if not is_distributed():
        return
    trainer.accelerator.wait_for_everyone()
    trainer.model_wrapped = trainer.model  # the DDP wrapper or DeepSpeed engine
    trainer.accelerator.free_memory()  # its list of prepared models holds the wrapper too; destroys a DS engine
    gc.collect()  # the Trainer and its callbacks form reference cycles
    torch.distributed.destroy_process_group()
    gc.collect()


def save_final(trainer, cfg: TrainConfig, final: Path) -> None:
    """The final model: an adapter for lora/qlora; for full/freeze-vision, the published layout (safetensors shards
    of at most 5 GB, the published key names) in the training's precision: bf16/fp16 like the published checkpoint,
    fp32 when trained in fp32.

    The same writer serves every engine: under ZeRO-3 and FSDP the shards are first gathered into one state on
    rank 0 (every rank takes part), under ZeRO-2 / DDP / one device rank 0 already has all weights.
    """
    bf16, fp16 = precision(cfg)
    dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    if cfg.method in ("lora", "qlora"):
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
