"""One typed config for training: every CLI flag is a field here, and a YAML recipe can set any of them.

Precedence: field defaults < `--task` recipe < `--config file.yaml` < flags given on the command line.
The resolved config is written to the output folder (`train_config.yaml`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .data.layout import MULTI_TURN, SampleLayout
from .data.video import DEFAULT_VIDEO_FRAMES
from .evaluate.metrics import METRICS, QUESTIONS
from .processing.geometry import DEFAULT_MAX_IMAGE_PIXELS, TRAIN_NUM_CROPS
from .processing.hub import check_model_path, is_hub_id

METHODS = ("full", "freeze-vision", "lora", "qlora")
MASTER_WEIGHTS = ("auto", "fp32", "bf16-sr")
FP8_SCALINGS = ("tensorwise", "rowwise")
LORA_VARIANTS = ("lora", "dora", "rslora")
TRACKERS = ("tensorboard", "wandb", "mlflow")
OBJECTIVES = ("sft", "dpo")
DPO_LOSSES = ("sigmoid", "ipo")


def _f(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    # -- data --------------------------------------------------------------------------------------------------------
    data: str | list[str] | None = _f(
        None,
        "Training data: a conversations .jsonl/.json file, a local Hugging Face data set "
        "(save_to_disk folder, parquet/arrow files) or a hub id; several are read in order. Required (a recipe or "
        "--config may set it).",
        nargs="+",
        group="data",
    )
    eval_data: str | list[str] | None = _f(
        None,
        "Evaluation data in the same forms (one or several). Default: none (unless --eval-holdout).",
        nargs="+",
        group="data",
    )
    eval_holdout: int = _f(
        0,
        "The first N records of --data are the evaluation set (the recipe's NLVR2 / hateful-memes split): train "
        "holds them out when --eval-data is not given, and eval scores exactly them.",
        group="data",
    )
    image_dir: str | None = _f(
        None,
        "Folder that relative image paths are relative to (default: the jsonl's folder, then images/ below it).",
        group="data",
    )
    split: str = _f(
        "train",
        "Split to read from a Hugging Face data set (or SPLIT.jsonl / NAME_SPLIT.jsonl in a data folder).",
        group="data",
    )
    eval_split: str | None = _f(
        None,
        "Split to read from --eval-data when it is a data set with splits, e.g. validation (default: --split).",
        group="data",
    )
    max_length: int | None = _f(
        None,
        "Truncate samples to this many tokens (text after the last image only; samples "
        "whose images alone are longer are refused and reported). Default: no truncation.",
        group="data",
    )
    num_crops: int = _f(16, "HD crops per image, 1..16 (the recipe uses 4 for video frames).", group="data")
    video_frames: int = _f(
        DEFAULT_VIDEO_FRAMES, "Frames sampled from each video given as a turn's 'video'.", group="data"
    )
    multi_turn: str = _f(
        "conversation",
        "Layout of a sample with several turns: conversation (one chat, images numbered 1..n across it, every answer "
        "learned, <|endoftext|> after the last) or recipe (the original recipe's: every turn its own prompt with its "
        "own <s> and images numbered from 1, each answer followed by <|endoftext|>, concatenated). Single-turn "
        "samples are the same either way.",
        choices=MULTI_TURN,
        group="data",
    )
    skip_bad_samples: bool = _f(
        False,
        "Train on the valid samples when the data has problems; the skipped ids and reasons are written to "
        "OUTPUT_DIR/skipped_samples.tsv (samples too long for --max-length: refused_samples.tsv, and "
        "refused_eval_samples.tsv for evaluation data). Default: stop and report.",
        group="data",
    )
    max_image_pixels: int | None = _f(
        DEFAULT_MAX_IMAGE_PIXELS, "Refuse images with more pixels than this (decompression bombs).", group="data"
    )
    apply_exif_orientation: bool | None = _f(
        None,
        "Rotate photos by their EXIF orientation tag, as image viewers show them. Off in the published checkpoints' "
        "processor, which ignores the tag (so does inference with it): a model should be trained on images as it "
        "will see them. Saved with the model's processor, so eval and predict follow it.",
        default_note="as the base model's processor says",
        group="data",
    )
    # -- model and method --------------------------------------------------------------------------------------------
    model: str | None = _f(
        None,
        "Base model: a local folder in the published layout (config.json, safetensors, "
        "tokenizer) or a hub id. 'tiny' builds a tiny random model (smoke tests). Required (a recipe or --config "
        "may set it).",
        group="model and method",
    )
    revision: str | None = _f(
        None,
        "Branch, tag or commit of a hub id given as --model (or --base). Default: the repository's default branch.",
        group="model and method",
    )
    method: str = _f(
        "full", "Strategy: full | freeze-vision | lora | qlora.", choices=METHODS, group="model and method"
    )
    freeze_projector: bool = _f(
        False, "With freeze-vision: also freeze the image projector and separators.", group="model and method"
    )
    lora_rank: int = _f(64, "LoRA rank.", group="model and method")
    lora_alpha: int | None = _f(
        None,
        "LoRA alpha. Default: 2 x --lora-rank, the recipe's ratio (128 at rank 64; 64 at rank 32).",
        group="model and method",
    )
    lora_dropout: float = _f(0.0, "LoRA dropout.", group="model and method")
    lora_lm_head: bool = _f(True, "Also put LoRA on lm_head (the recipe does).", group="model and method")
    lora_vision: bool = _f(
        False, "Also put LoRA on the CLIP tower (q/k/v/out_proj, fc1, fc2) and the projector.", group="model and method"
    )
    lora_variant: str = _f(
        "lora",
        "Adapter variant (lora/qlora): lora; dora (weight-decomposed LoRA: a learned magnitude per output feature, "
        "slower per step); rslora (rank-stabilised scaling alpha/sqrt(rank) instead of alpha/rank).",
        choices=LORA_VARIANTS,
        group="model and method",
    )
    # -- preference tuning -------------------------------------------------------------------------------------------
    objective: str = _f(
        "sft",
        "What the run optimises: sft (the likelihood of the data's answers) or dpo (direct preference optimisation on "
        "preference pairs: the last turn's 'chosen' and 'rejected' answers to the same prompt and images).",
        choices=OBJECTIVES,
        group="preference tuning",
    )
    dpo_beta: float = _f(
        0.1,
        "DPO's beta: the implicit reward is beta x the log-ratio of policy and reference; a larger beta keeps the "
        "model closer to the reference (ipo: the target margin of the per-token log-ratios is 1/(2 beta)).",
        group="preference tuning",
    )
    dpo_loss: str = _f(
        "sigmoid",
        "sigmoid (DPO's loss on the summed answer log-probabilities) or ipo (squared distance of the per-token mean "
        "log-ratio margin from 1/(2 beta)).",
        choices=DPO_LOSSES,
        group="preference tuning",
    )
    dpo_sft_weight: float = _f(
        0.0,
        "Add this weight x the chosen answer's mean negative log-likelihood per token to the loss (RPO); 0: none.",
        group="preference tuning",
    )
    dpo_label_smoothing: float = _f(
        0.0,
        "Conservative DPO (sigmoid loss only): the probability, in [0, 0.5), that a recorded preference is wrong.",
        group="preference tuning",
    )
    dpo_precompute_reference: bool = _f(
        False,
        "Compute the reference log-probabilities of every training and evaluation pair in one pass before training "
        "and store them in OUTPUT_DIR/reference_logps.json (--resume reads them): no reference model in memory and no "
        "reference pass per step. Without it full/freeze-vision keep a frozen copy of the model as the reference; "
        "lora/qlora always can use the base model with the adapters disabled.",
        group="preference tuning",
    )
    attn_implementation: str = _f(
        "sdpa",
        "Attention kernels: sdpa (PyTorch flash/cuDNN/efficient) or eager. In training with --packing, sdpa runs "
        "packed rows through variable-length attention.",
        choices=("sdpa", "eager"),
        group="precision, memory and speed",
    )
    sdpa_backend: str = _f(
        "flash",
        "Which PyTorch SDPA kernels sdpa may use on a GPU: flash (FlashAttention, or memory-efficient where a mask "
        "needs it; cuDNN's off) or cudnn (PyTorch's default order, which tries cuDNN first on Hopper GPUs; its "
        "host-side cost per call grows when sequence lengths vary from step to step).",
        choices=("flash", "cudnn"),
        group="precision, memory and speed",
    )
    cpu: bool = _f(
        False,
        "Train on the CPU even when a GPU is present (smoke tests, exact fp32 reproducibility).",
        group="precision, memory and speed",
    )
    bf16: bool = _f(
        False,
        "bf16 mixed precision (default on GPUs that support it unless --fp16).",
        group="precision, memory and speed",
    )
    fp16: bool = _f(
        False, "fp16 mixed precision with loss scaling (fp32 master weights).", group="precision, memory and speed"
    )
    gradient_checkpointing: bool = _f(
        False,
        "Non-reentrant activation checkpointing: less memory, one more forward pass of the checkpointed layers.",
        group="precision, memory and speed",
    )
    checkpointing_scope: str = _f(
        "all",
        "With --gradient-checkpointing, the layers that recompute their forward in backward: all, vision (CLIP "
        "layers only: when the tower trains, its 17 crops x 577 tokens per document hold more activations than the "
        "decoder's ~2.5k tokens, for a small share of the compute) or language (decoder layers only).",
        choices=("all", "vision", "language"),
        group="precision, memory and speed",
    )
    checkpointing_layers: int | None = _f(
        None,
        "With --gradient-checkpointing and scope all or language: recompute only the first N decoder layers (the "
        "others keep their activations). A dial between speed and memory, e.g. to fit two packed documents per "
        "forward pass in the memory one unpacked document takes without checkpointing. Default: all decoder layers.",
        group="precision, memory and speed",
    )
    compile: bool | None = _f(
        None,
        "Regional torch.compile of every decoder and CLIP layer: fused elementwise work and far fewer kernel "
        "launches per step, after a one-off compile of about a minute. Default: on for full, freeze-vision and lora "
        "on a CUDA GPU without DeepSpeed/FSDP (and for qlora only with --gradient-checkpointing, where it "
        "pays), off elsewhere (CPU runs stay quick to start).",
        group="precision, memory and speed",
    )
    master_weights: str = _f(
        "auto",
        "Trained weights (for lora/qlora: the adapters): fp32 (fp32 weights or adapters + bf16/fp16 autocast; for "
        "full 16 bytes/parameter with AdamW; for qlora PEFT's k-bit preparation, which also upcasts the frozen "
        "non-4-bit weights to fp32) or "
        "bf16-sr (bf16 weights and moments, AdamW computed in fp32 and written back with stochastic rounding: "
        "8 bytes/parameter, small updates are not lost, no autocast; bf16 only, not with --deepspeed or --fsdp). "
        "auto: bf16-sr on a CUDA GPU with bf16 without DeepSpeed or FSDP2, else fp32.",
        choices=MASTER_WEIGHTS,
        group="precision, memory and speed",
    )
    fp8: bool = _f(
        False,
        "Float8 matmuls (torchao's float8 training, scales computed from each tensor at every step) in the language "
        "model's linear layers: the decoder's qkv_proj, o_proj, gate_up_proj and down_proj, trained (full, "
        "freeze-vision) or the frozen base under the adapters (lora: the adapters stay bf16). lm_head, the vision "
        "tower and the projector keep bf16, and weights, optimizer and saved models keep their precision. Needs a "
        "CUDA GPU with float8 (compute capability 8.9 or later: Ada, Hopper, Blackwell) and torchao (pip install "
        "'phi3v-tune[fp8]'); not with qlora, --fp16, --deepspeed or --fsdp. Fastest with --compile (the default).",
        group="precision, memory and speed",
    )
    fp8_scaling: str = _f(
        "tensorwise",
        "With --fp8: one scale per tensor (tensorwise: cuBLAS's float8 matmul, the fastest) or one per row "
        "(rowwise: power-of-two scales and float8 e4m3 gradients, more accurate where a few rows hold much larger "
        "values than the rest, slower).",
        choices=FP8_SCALINGS,
        group="precision, memory and speed",
    )
    # -- optimisation ------------------------------------------------------------------------------------------------
    output_dir: str = _f(
        "outputs/run", "Where checkpoints, logs, loss.png and the final model go.", group="output and checkpoints"
    )
    epochs: float = _f(1.0, "Training epochs.", group="optimisation")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (overrides --epochs when > 0).", group="optimisation")
    batch_size: int = _f(64, "Global batch size (samples per optimizer step, all GPUs together).", group="optimisation")
    batch_size_per_device: int = _f(
        1, "Samples per forward pass per device; gradient accumulation makes up the rest.", group="optimisation"
    )
    learning_rate: float = _f(
        4e-5,
        "Peak learning rate of the language model (and of LoRA adapters on it), and of every part without a rate "
        "of its own.",
        group="optimisation",
    )
    vision_lr: float | None = _f(
        None,
        "Peak learning rate of the CLIP tower (and of LoRA adapters on it). Default: --learning-rate.",
        group="optimisation",
    )
    projector_lr: float | None = _f(
        None,
        "Peak learning rate of the image projector and the separators glb_GN / sub_GN (and of LoRA adapters on the "
        "projector). Default: --learning-rate.",
        group="optimisation",
    )
    weight_decay: float = _f(0.01, "AdamW weight decay.", group="optimisation")
    adam_beta1: float = _f(0.9, "AdamW beta1.", group="optimisation")
    adam_beta2: float = _f(0.95, "AdamW beta2.", group="optimisation")
    adam_epsilon: float = _f(1e-7, "AdamW epsilon.", group="optimisation")
    warmup_steps: int = _f(
        50,
        "Linear warm-up steps (the recipe's 50). A run with no more optimizer steps than this never reaches "
        "--learning-rate (train warns before loading the model); --warmup-ratio scales with the run instead.",
        group="optimisation",
    )
    warmup_ratio: float | None = _f(
        None,
        "Warm-up as a share of the run's optimizer steps, e.g. 0.05 (rounded up); when set, --warmup-steps is not "
        "used. Default: --warmup-steps.",
        group="optimisation",
    )
    lr_scheduler: str = _f(
        "linear",
        "Learning-rate schedule after warm-up (transformers' names: linear, cosine, constant_with_warmup, ...).",
        group="optimisation",
    )
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0: no clipping).", group="optimisation")
    optimizer_in_backward: bool = _f(
        False,
        "Update each weight as soon as its gradient is complete in backward and free the gradient, so the gradients "
        "of all weights are never held at once; pays with --gradient-checkpointing, where those gradients set the peak. "
        "Same AdamW update; needs --max-grad-norm 0, one forward pass per optimizer step (--batch-size = "
        "--batch-size-per-device), one process without --deepspeed/--fsdp, no --fp16 and --skip-nonfinite 0.",
        group="precision, memory and speed",
    )
    group_by_length: bool = _f(
        True,
        "Batch samples of similar token length together (less padding) when --batch-size-per-device > 1.",
        group="precision, memory and speed",
    )
    packing: bool = _f(
        True,
        "Padding-free training when --batch-size-per-device > 1 (with --objective dpo also at 1: a pair's two "
        "answers): the samples of a forward pass are concatenated into one row with attention kept inside each "
        "sample (varlen attention), so no compute goes to padding. Exact: the same loss and gradients as the padded "
        "batch. Evaluation batches stay padded.",
        group="precision, memory and speed",
    )
    packing_max_tokens: int | None = _f(
        None,
        "With --packing: at most this many tokens per packed row (samples fill rows in order; a longer sample gets a "
        "row of its own). Default: one row per forward pass.",
        group="precision, memory and speed",
    )
    seed: int = _f(42, "Random seed (data order, initialisation of adapters).", group="optimisation")
    # -- checkpoints, logging, evaluation ----------------------------------------------------------------------------
    save_steps: int = _f(
        500, "Write a checkpoint every N optimizer steps (and always at the end).", group="output and checkpoints"
    )
    overwrite_output_dir: bool = _f(
        False,
        "Delete another run's checkpoints, final/ and best/ models, logs and metrics in --output-dir before training "
        "(without it, a folder that holds another run is refused unless --resume continues it).",
        group="output and checkpoints",
    )
    save_checkpoints: bool = _f(
        True,
        "Write checkpoints and the final model (--no-save-checkpoints: neither, for benchmarks and smoke runs).",
        group="output and checkpoints",
    )
    save_total_limit: int | None = _f(
        None, "Keep only the newest N checkpoints. Default: keep all.", group="output and checkpoints"
    )
    resume: str | None = _f(
        None,
        "Resume: 'latest' (also --resume alone: the newest complete checkpoint in --output-dir; none yet: start at step "
        "0) or a checkpoint path. Default: start from step 0.",
        nargs="?",
        const="latest",
        group="output and checkpoints",
    )
    stop_at_step: int | None = _f(
        None,
        "Checkpoint and stop at this step while keeping the schedule of the whole run "
        "(time-sliced jobs: continue later with --resume). Default: run to the end.",
        group="output and checkpoints",
    )
    skip_nonfinite: int = _f(
        0,
        "Skip up to N batches whose loss is NaN/inf (reported with step and sample ids) "
        "instead of stopping at the first one.",
        group="optimisation",
    )
    logging_steps: int = _f(10, "Log loss, learning rate and throughput every N steps.", group="output and checkpoints")
    eval_steps: int | None = _f(
        None,
        "Evaluate (loss; task metric where set) every N steps, plus before and after. Default: only before and "
        "after training.",
        group="evaluation",
    )
    metric: str | None = _f(
        None,
        "Task metric computed by greedy generation on the evaluation data (in training: before, during "
        "(--eval-steps) and after): anls | accuracy.",
        default_note="none: training reports the evaluation loss only",
        choices=tuple(METRICS),
        group="evaluation",
    )
    keep_best: bool | None = _f(
        None,
        "Keep the best evaluated model as OUTPUT_DIR/best (the published layout, or the adapter for lora/qlora), "
        "never deleted by --save-total-limit; the summary names its step and score. Default: on when --eval-steps "
        "and --metric are set (with --best-by loss: when --eval-steps is set and there is evaluation data).",
        group="evaluation",
    )
    best_by: str = _f(
        "metric",
        "What 'best' means for --keep-best and --early-stopping-patience: metric (the task metric, higher is better) "
        "or loss (the evaluation loss, lower is better).",
        choices=("metric", "loss"),
        group="evaluation",
    )
    early_stopping_patience: int | None = _f(
        None,
        "Stop training after this many evaluations (--eval-steps) without an improvement of the best score by at "
        "least --early-stopping-threshold; final/ is then the last state and best/ the best. Default: no early stop.",
        group="evaluation",
    )
    early_stopping_threshold: float = _f(
        0.0, "The smallest improvement of the best score that counts for --early-stopping-patience.", group="evaluation"
    )
    eval_questions: str = _f(
        "all",
        "Which questions of a multi-question evaluation sample (the_cauldron rows) the task metric scores: all "
        "(each on its own, with the sample's images) or first (the recipe's NLVR2 and hateful-memes scripts).",
        choices=QUESTIONS,
        group="evaluation",
    )
    eval_batch_size: int = _f(8, "Prompts per generation batch during evaluation.", group="evaluation")
    eval_max_new_tokens: int = _f(
        64, "Longest generated answer during evaluation (the recipe: 64).", group="evaluation"
    )
    report_to: str = _f(
        "tensorboard",
        "Experiment trackers, comma separated: tensorboard, wandb, mlflow, or none (wandb and mlflow need their "
        "package installed and configured as those tools document).",
        group="output and checkpoints",
    )
    num_workers: int = _f(
        2, "Data-loader worker processes (image decoding and HD transform happen there).", group="data"
    )
    gc_interval: int = _f(
        100,
        "Run Python's garbage collector every N optimizer steps (and after each evaluation) on all ranks at once, "
        "automatic collection off while training (its pauses otherwise land at a different step on every rank, "
        "and all ranks wait); 0: Python's automatic collection.",
        group="precision, memory and speed",
    )
    deepspeed: str | None = _f(
        None,
        "DeepSpeed JSON config: configs/deepspeed/zero2.json, zero3.json or zero3_offload.json (launch with "
        "torchrun). Default: none (DDP under torchrun, or what accelerate launch configures).",
        group="precision, memory and speed",
    )
    fsdp: bool = _f(
        False,
        "PyTorch FSDP2 under torchrun: full sharding, one unit per decoder and CLIP layer, full state dict on save "
        "(the same as `accelerate launch --config_file configs/accelerate/fsdp2.yaml`).",
        group="precision, memory and speed",
    )
    progress: bool = _f(
        True, "Show the progress bar (--no-progress: logs still go to the loggers).", group="output and checkpoints"
    )

    # ----------------------------------------------------------------------------------------------------------------
    # settings groups: what one part of the run needs, as a plain value (the part never sees the whole config)
    def data_settings(self) -> DataSettings:
        return DataSettings(
            sources=self.data,
            split=self.split,
            eval_sources=self.eval_data,
            eval_split=self.eval_split or self.split,
            eval_holdout=self.eval_holdout,
            image_dir=self.image_dir,
            max_image_pixels=self.max_image_pixels,
            layout=self.layout(),
            skip_bad_samples=self.skip_bad_samples,
            objective=self.objective,
        )

    def layout(self) -> SampleLayout:
        """How every sample of the run is laid out (validation, planning, examples and evaluation questions)."""
        return SampleLayout(max_length=self.max_length, multi_turn=self.multi_turn, video_frames=self.video_frames)

    def given_settings(self) -> set[str]:
        """The settings chosen for this run (a recipe, a YAML file, flags); made in Python, those that differ from
        their defaults."""
        given = getattr(self, "given", None)
        if given is not None:
            return given
        return {f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}

    def has_eval_data(self) -> bool:
        return bool(self.eval_data) or self.eval_holdout > 0

    def best_key(self) -> str | None:
        """The logged value that --keep-best and --early-stopping-patience compare: eval_<metric> or eval_loss."""
        if self.best_by == "loss":
            return "eval_loss"
        return f"eval_{self.metric}" if self.metric else None

    def keeps_best(self) -> bool:
        """--keep-best, or its default: on when evaluations during training give the score it compares."""
        if self.keep_best is not None:
            return self.keep_best
        return self.eval_steps is not None and self.best_key() is not None and self.has_eval_data()

    def trackers(self) -> list[str]:
        """--report-to as a list (empty for none)."""
        names = [x.strip() for x in str(self.report_to or "").split(",") if x.strip()]
        return [] if names in ([], ["none"]) else names

    def part_learning_rates(self) -> dict[str, float]:
        """The parts whose learning rate differs from --learning-rate: {"vision": ..., "projector": ...}."""
        rates = {"vision": self.vision_lr, "projector": self.projector_lr}
        return {part: rate for part, rate in rates.items() if rate is not None}

    def frozen_parts(self) -> dict[str, str]:
        """{part: why it does not train} for the parts --vision-lr / --projector-lr name (see train.strategies)."""
        frozen = {}
        adapters = self.method in ("lora", "qlora")
        if self.method == "freeze-vision":
            frozen["vision"] = "--method freeze-vision freezes the CLIP tower"
            if self.freeze_projector:
                frozen["projector"] = "--freeze-projector freezes the projector"
        elif adapters and not self.lora_vision:
            for part in ("vision", "projector"):
                frozen[part] = f"with --method {self.method} it has no adapters without --lora-vision"
        return frozen

    @property
    def effective_lora_alpha(self) -> int:
        """--lora-alpha, or 2 x --lora-rank when not given (the recipe's `lora_alpha=round(rank * 2)`)."""
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank

    def validate(self) -> TrainConfig:
        """Every check that needs no model and no data, so a bad command fails in a second, not after loading."""
        for name in SOURCE_LISTS:  # one source is kept as a plain string (messages, saved settings)
            value = getattr(self, name)
            if isinstance(value, (list, tuple)) and len(value) == 1:
                setattr(self, name, value[0])
        for f in dataclasses.fields(self):  # every field with choices: --method, --multi-turn, --metric, ...
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value not in choices and not (value is None and f.default is None):
                flag = "--" + f.name.replace("_", "-")
                raise ValueError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
        if self.model is not None:
            check_model_path(self.model, "--model")
        if self.revision is not None and not (self.model and is_hub_id(self.model)):
            raise ValueError(f"--revision {self.revision} applies to a hub id as --model, not to {self.model}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError(f"--epochs must be > 0 (or give --max-steps), got {self.epochs:g}")
        if self.stop_at_step is not None and 0 < self.max_steps <= self.stop_at_step:
            raise ValueError(f"--stop-at-step {self.stop_at_step} is not before --max-steps {self.max_steps}")
        for name in ("learning_rate", "vision_lr", "projector_lr"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value:g}")
        for part, why in self.frozen_parts().items():
            if part in self.part_learning_rates():
                raise ValueError(f"--{part}-lr applies to a part that trains, but {why}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio:g}")
        if self.lr_scheduler not in scheduler_names():
            raise ValueError(
                f"--lr-scheduler {self.lr_scheduler}: unknown schedule; transformers knows "
                f"{', '.join(scheduler_names())}"
            )
        if self.resume and self.overwrite_output_dir:
            raise ValueError("--resume continues the run in --output-dir; --overwrite-output-dir deletes it: pick one")
        trackers = self.trackers()
        unknown = [t for t in trackers if t not in TRACKERS]
        if unknown:
            raise ValueError(
                f"--report-to: unknown tracker(s) {', '.join(unknown)}; expected some of {', '.join(TRACKERS)}, or none"
            )
        wants_best = self.keep_best or self.early_stopping_patience is not None
        if wants_best and self.best_key() is None:
            raise ValueError(
                "--keep-best / --early-stopping-patience compare the task metric: set --metric, or --best-by loss"
            )
        if wants_best and (self.eval_steps is None or not self.has_eval_data()):
            raise ValueError(
                "--keep-best / --early-stopping-patience need evaluations during training: --eval-steps N and "
                "evaluation data (--eval-data or --eval-holdout)"
            )
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(f"--early-stopping-patience must be >= 1, got {self.early_stopping_patience}")
        if self.early_stopping_threshold < 0:
            raise ValueError(f"--early-stopping-threshold must be >= 0, got {self.early_stopping_threshold:g}")
        if self.lora_variant != "lora" and self.method not in ("lora", "qlora"):
            raise ValueError(f"--lora-variant {self.lora_variant} needs --method lora or qlora (got {self.method})")
        if self.method in ("lora", "qlora") and self.lora_rank < 1:
            raise ValueError(f"--lora-rank must be >= 1, got {self.lora_rank}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if self.lora_alpha is None and self.method in ("lora", "qlora"):
            self.lora_alpha = self.effective_lora_alpha  # train_config.yaml records the value used
        self._validate_preference(fsdp_on(self.fsdp))
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ValueError(f"--output-dir {self.output_dir} is a file, not a folder")
        if self.bf16 and self.fp16:
            raise ValueError("--bf16 and --fp16 are exclusive")
        if self.batch_size < 1 or self.batch_size_per_device < 1:
            raise ValueError("batch sizes must be >= 1")
        if self.fsdp and self.deepspeed:
            raise ValueError("--fsdp and --deepspeed are exclusive (two ways of sharding the same model)")
        fsdp = fsdp_on(self.fsdp)
        if fsdp and self.method == "qlora":
            raise ValueError("--fsdp does not shard 4-bit (qlora) weights; use --method lora or plain torchrun")
        if fsdp and self.cpu:
            raise ValueError(
                "--fsdp shards over GPUs; on the CPU accelerate would quietly train plain DDP instead (drop --fsdp or "
                "--cpu)"
            )
        if fsdp and self.skip_nonfinite > 0:
            raise ValueError(
                "--skip-nonfinite cannot be combined with FSDP: a skipped batch's zero loss needs whole weights on "
                "every rank, which FSDP shards (use --skip-nonfinite 0, or DDP / ZeRO-2)"
            )
        if self.gc_interval < 0:
            raise ValueError(f"--gc-interval must be >= 0 (0: automatic collection), got {self.gc_interval}")
        if self.optimizer_in_backward:
            why = {
                "--max-grad-norm 0 (clipping needs the norm of all gradients before the first update)": (
                    self.max_grad_norm > 0
                ),
                "--batch-size equal to --batch-size-per-device (no gradient accumulation)": (
                    self.batch_size != self.batch_size_per_device
                ),
                "no --deepspeed or --fsdp (their gradient reduction comes after the updates)": bool(
                    self.deepspeed or fsdp
                ),
                "no --fp16 (a scaled loss must be checked before any update)": self.fp16,
                "--skip-nonfinite 0 (a skipped batch would already have updated the weights)": self.skip_nonfinite > 0,
            }
            missing = [need for need, broken in why.items() if broken]
            if missing:
                raise ValueError("--optimizer-in-backward needs " + "; ".join(missing))
        if self.checkpointing_layers is not None:
            if self.checkpointing_layers < 0:
                raise ValueError(f"--checkpointing-layers must be >= 0, got {self.checkpointing_layers}")
            if not self.gradient_checkpointing:
                raise ValueError("--checkpointing-layers needs --gradient-checkpointing")
            if self.checkpointing_scope == "vision":
                raise ValueError("--checkpointing-layers counts decoder layers: use it with scope all or language")
        if self.packing_max_tokens is not None and self.packing_max_tokens < 1:
            raise ValueError(f"--packing-max-tokens must be >= 1, got {self.packing_max_tokens}")
        if self.num_crops not in TRAIN_NUM_CROPS:
            raise ValueError(
                f"--num-crops must be in {TRAIN_NUM_CROPS.start}..{TRAIN_NUM_CROPS.stop - 1}, got {self.num_crops}"
            )
        if self.video_frames < 1:
            raise ValueError(f"--video-frames must be >= 1, got {self.video_frames}")
        if self.fp8:
            deepspeed = bool(self.deepspeed) or zero_stage(None) is not None  # or accelerate launch's DeepSpeed
            why = {
                "--cpu (float8 matmuls run on a CUDA GPU)": self.cpu,
                "--fp16 (float8 training computes in bf16)": self.fp16,
                "--method qlora (its weights are 4-bit: nothing to multiply in float8)": self.method == "qlora",
                "--deepspeed (its engine is not set up for float8 layers)": deepspeed,
                "--fsdp (float8 layers are not sharded by this tool yet)": fsdp,
            }
            refused = [name for name, broken in why.items() if broken]
            if refused:
                raise ValueError("--fp8 cannot be combined with " + "; ".join(refused))
        elif self.fp8_scaling != "tensorwise":
            raise ValueError(f"--fp8-scaling {self.fp8_scaling} needs --fp8")
        if self.master_weights == "bf16-sr":
            if self.fp16:
                raise ValueError("--master-weights bf16-sr trains in bf16; it cannot be combined with --fp16")
            if fsdp:
                raise ValueError(
                    "--master-weights bf16-sr cannot be combined with --fsdp: FSDP2 shards the weights and keeps "
                    "fp32 master weights in its own mixed precision (use --master-weights fp32 or auto)"
                )
            if self.deepspeed:
                raise ValueError(
                    "--master-weights bf16-sr cannot be combined with --deepspeed: DeepSpeed brings its own optimizer "
                    "and master weights (use --master-weights fp32, or drop --deepspeed)"
                )
        return self

    def _validate_preference(self, fsdp: bool) -> None:
        """--objective dpo and its --dpo-* settings (which an SFT run refuses rather than ignores)."""
        # (a saved train_config.yaml given as --config holds every setting: only values off their defaults count)
        dpo_flags = sorted(
            n for n in self.given_settings() if n.startswith("dpo_") and getattr(self, n) != FIELDS[n].default
        )
        # a resumed run learns its objective from the checkpoint (`adopt_run_settings`), then is validated again
        objective_unknown = bool(self.resume) and "objective" not in self.given_settings()
        if self.objective != "dpo":
            if dpo_flags and not (objective_unknown and not getattr(self, "adopted", False)):
                raise ValueError(f"--{dpo_flags[0].replace('_', '-')} applies to --objective dpo (this run: sft)")
            return
        if self.dpo_beta <= 0:
            raise ValueError(f"--dpo-beta must be > 0, got {self.dpo_beta:g}")
        if not 0 <= self.dpo_label_smoothing < 0.5:
            raise ValueError(f"--dpo-label-smoothing must be in [0, 0.5), got {self.dpo_label_smoothing:g}")
        if self.dpo_loss == "ipo" and self.dpo_label_smoothing:
            raise ValueError("--dpo-label-smoothing applies to --dpo-loss sigmoid only (ipo has no label smoothing)")
        if self.dpo_sft_weight < 0:
            raise ValueError(f"--dpo-sft-weight must be >= 0, got {self.dpo_sft_weight:g}")
        frozen_copy = self.method in ("full", "freeze-vision") and not self.dpo_precompute_reference
        if frozen_copy and (fsdp or zero_stage(self.deepspeed) == 3):
            raise ValueError(
                f"--objective dpo with --method {self.method} under {'--fsdp' if fsdp else 'ZeRO-3'} needs "
                "--dpo-precompute-reference: the reference would otherwise be a frozen copy of the whole model, "
                "unsharded, on every GPU"
            )

    def check_environment(self) -> None:
        """What the settings need from this machine (files, packages), checked before any data or model loads."""
        if self.method == "qlora":
            import torch  # the settings module loads without torch (fast --help); this check needs it

            if self.cpu or not torch.cuda.is_available():
                raise ValueError("--method qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); use lora on the CPU")
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ValueError("--method qlora needs bitsandbytes: pip install 'phi3v-tune[qlora]'")
        if zero_stage(self.deepspeed) == 3 and self.skip_nonfinite > 0:
            raise ValueError(
                "--skip-nonfinite cannot be combined with ZeRO-3: a skipped batch's zero loss needs whole weights "
                "on every rank, which ZeRO-3 partitions (use --skip-nonfinite 0, or zero2.json)"
            )
        for tracker in self.trackers():
            if tracker != "tensorboard" and importlib.util.find_spec(tracker) is None:
                raise ValueError(f"--report-to {tracker} needs the {tracker} package: pip install {tracker}")
        if "tensorboard" in self.trackers() and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
        if self.deepspeed:
            if not Path(self.deepspeed).is_file():
                raise ValueError(f"--deepspeed {self.deepspeed}: no such file (configs/deepspeed/ has zero2.json, ...)")
            if importlib.util.find_spec("deepspeed") is None:
                raise ValueError(
                    "--deepspeed needs the deepspeed package: DS_BUILD_OPS=0 pip install deepspeed (see README)"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path


@dataclass(frozen=True)
class DataSettings:
    """Where the training and evaluation data come from and how samples are laid out (`TrainConfig.data_settings`)."""

    sources: str | list[str] | None
    split: str
    eval_sources: str | list[str] | None
    eval_split: str
    eval_holdout: int
    image_dir: str | None
    max_image_pixels: int | None
    layout: SampleLayout
    skip_bad_samples: bool
    objective: str = "sft"  # "dpo": the samples are preference pairs


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def show_progress(show: bool) -> None:
    """--progress / --no-progress for the libraries' bars too (weight loading and shard writing in transformers,
    downloads in huggingface_hub, split generation in datasets), not only ours."""
    import huggingface_hub.utils  # loaded by every command that runs anyway; imported here to keep --help fast
    import transformers.utils.logging

    if show:
        transformers.utils.logging.enable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()
    else:
        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
    if importlib.util.find_spec("datasets") is not None:  # an optional reader: only where it is installed
        import datasets

        datasets.enable_progress_bars() if show else datasets.disable_progress_bars()


def scheduler_names() -> list[str]:
    """transformers' learning-rate schedules (`--lr-scheduler`)."""
    from transformers.trainer_utils import SchedulerType  # a command that checks settings loads transformers anyway

    return [s.value for s in SchedulerType]


def fsdp_on(flag: bool) -> bool:
    """--fsdp, or `accelerate launch` with an FSDP config (which says so in the environment)."""
    return bool(flag) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def zero_stage(deepspeed: str | None) -> int | None:
    """The ZeRO stage a DeepSpeed JSON config asks for, or `accelerate launch` with a DeepSpeed config (which says
    so in the environment); None without either, or without a readable stage."""
    if not deepspeed:
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
        return int(stage) if stage.isdigit() else None
    if not Path(deepspeed).is_file():
        return None
    try:
        stage = json.loads(Path(deepspeed).read_text()).get("zero_optimization", {}).get("stage")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"--deepspeed {deepspeed}: not a DeepSpeed JSON config ({err})") from err
    return stage if isinstance(stage, int) else None


def base_type(tp: Any) -> Any:
    if isinstance(tp, str):
        tp = eval(tp, {**vars(typing), "types": types})  # annotations are strings (from __future__)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


#: Settings that take one data source or a list of them (read in order).
SOURCE_LISTS = ("data", "eval_data")


def coerce(name: str, value: Any) -> Any:
    """Check and convert a YAML value to the field's type, with an error naming the key."""
    if name not in FIELDS:
        close = difflib.get_close_matches(name, list(FIELDS), n=1, cutoff=0.75)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown setting {name!r} ({hint}see `phi3v-tune train --help`)")
    if value is None:
        return None
    tp = base_type(FIELDS[name].type)
    if name in SOURCE_LISTS and isinstance(value, list):
        if not value or not all(isinstance(v, str) for v in value):
            raise ValueError(f"setting {name}: expected a path or a list of paths, got {value!r}")
        return list(value)
    if isinstance(value, (list, dict)) and tp is not list:
        raise ValueError(f"setting {name}: expected {tp.__name__}, got a {type(value).__name__}: {value!r}")
    try:
        if tp is bool:
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        return tp(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"setting {name}: expected {tp.__name__}, got {value!r}") from err


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read the config ({err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of settings")
    try:
        return {k.replace("-", "_"): coerce(k.replace("-", "_"), v) for k, v in raw.items()}
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def recipe(task: str) -> dict[str, Any]:
    """Settings of a packaged recipe (`recipes/{task}.yaml`)."""
    files = resources.files("phi3v_tune").joinpath("recipes")
    path = files.joinpath(f"{task}.yaml")
    if not path.is_file():
        names = sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))
        raise ValueError(f"unknown task {task!r}; known: {', '.join(names)}")
    raw = yaml.safe_load(path.read_text()) or {}
    return {k.replace("-", "_"): coerce(k.replace("-", "_"), v) for k, v in raw.items() if k != "task"}


def default_note(default: Any, help_text: str) -> str:
    """' (default: X)' for --help, unless the help text already states it; switches read on/off, and `is` checks
    keep 0 and 0.0 visible (they compare equal to False)."""
    if default is None or "(default" in help_text:
        return ""
    if isinstance(default, bool):
        return " (default: on)" if default else " (default: off)"
    return f" (default: {default})"


def resolve(args: Any) -> TrainConfig:
    """Settings from `--task`, then `--config`, then the flags given (attributes of `args` named like fields)."""
    values: dict[str, Any] = {}
    if getattr(args, "task", None):
        values.update(recipe(args.task))
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
    values.update({k: v for k, v in vars(args).items() if k in FIELDS})
    cfg = TrainConfig(**values)
    cfg.given = set(values)
    return cfg.validate()


#: Settings that shape the trained weights (the model's parts and the loss): a resumed run takes them from its
#: checkpoint. The DPO settings define the loss, and the stored reference log-probabilities belong to the run.
RUN_SHAPING = (
    "objective", "method", "freeze_projector", "lora_rank", "lora_alpha", "lora_dropout", "lora_lm_head",
    "lora_vision", "lora_variant", "num_crops", "dpo_beta", "dpo_loss", "dpo_sft_weight", "dpo_label_smoothing",
    "dpo_precompute_reference",
)  # fmt: skip


def flag_text(name: str, value: Any) -> str:
    """A setting as the flag that sets it: `--lora-rank 4`, `--dpo-precompute-reference` / `--no-...` for switches."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value:g}" if isinstance(value, float) else f"--{flag} {value}"


def adopt_run_settings(cfg: TrainConfig, saved: dict[str, Any], checkpoint: str) -> list[str]:
    """Resume: the settings that shape the weights come from the checkpoint's train_config.yaml when not given; one
    given differently stops the run with both values. Returns the names taken from the checkpoint."""
    taken = []
    cfg.adopted = True
    for name in RUN_SHAPING:
        if name not in saved or (name.startswith("dpo_") and saved.get("objective") != "dpo"):
            continue  # (an SFT run's DPO settings are defaults that never applied)
        value, theirs = getattr(cfg, name), saved[name]
        if name in cfg.given_settings():
            if value != theirs:
                raise ValueError(
                    f"{flag_text(name, value)} conflicts with {checkpoint}, trained with {flag_text(name, theirs)}: "
                    "drop the flag to continue that run, or start a new run in another --output-dir"
                )
        elif value != theirs:
            setattr(cfg, name, theirs)
            taken.append(name)
    return taken
