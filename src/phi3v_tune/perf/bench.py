"""`phi3v-tune bench`: training throughput of phi3v-tune against a plain Hugging Face build, on the same card.

Both run a full-size Phi-3.5-vision with random weights (real speed, no download). Ours goes through the training
code path users run: data planning, image decoding in data-loader workers, collation, our Trainer (forward, backward,
optimizer step). The plain build (`perf/baseline.py`) gets random inputs made on the GPU, which favours it.

Per row: images/s, tokens/s, model TFLOP/s and MFU (FLOPs from `perf/flops.py`, checked against
torch.utils.flop_counter; the MFU denominator is this card's measured dense bf16 matmul rate), peak GPU memory,
and the host gap (share of wall time between the end of one step and the start of the next: data waits).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from PIL import Image
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule
from transformers import TrainerCallback

from ..config import FIELDS, TrainConfig
from ..data.examples import build_example
from ..data.sources import read_jsonl
from ..model.configuration import Phi3VConfig
from ..model.modeling import Phi3VForCausalLM
from ..model.presets import phi35_vision_config
from ..model.tiny import build_tiny_tokenizer, save_tiny_checkpoint
from ..processing.geometry import hd_size, num_crops_used, num_image_tokens
from ..processing.processor import Phi3VProcessor
from ..train.run import TrainingRun
from .baseline import build_plain, plain_step
from .flops import SampleShape, training_flops
from .options import add_arguments, check
from .workloads import write_workload

#: `--tuned`: the fastest setting measured so far per (method, checkpointing row) at the DocVQA shape, within the plain
#: build's memory for that row (benchmarks/RESULTS.md, fourth to seventh sessions). Rows without an entry (lora's
#: checkpointed row: one document, every layer checkpointed) run as the row says. Two documents per forward pass are
#: packed into one row (training's default), which halves the host work per document; checkpointing some layers buys
#: back the memory of the second document. The checkpointed (low-memory) rows of full and freeze-vision update each
#: weight in backward, so no gradients are held (--optimizer-in-backward; it cannot clip, nor does the plain build).
TUNED: dict[tuple[str, bool], dict[str, Any]] = {
    ("full", False): {"batch_size": 2, "batch_size_per_device": 2, "gradient_checkpointing": True,
                      "checkpointing_scope": "vision"},
    ("freeze-vision", False): {"batch_size": 2, "batch_size_per_device": 2, "gradient_checkpointing": True,
                               "checkpointing_layers": 12},
    ("lora", False): {"batch_size": 2, "batch_size_per_device": 2, "gradient_checkpointing": True,
                      "checkpointing_layers": 8},
    ("qlora", False): {"batch_size": 2, "batch_size_per_device": 2, "gradient_checkpointing": True,
                       "checkpointing_layers": 24},
    ("full", True): {"batch_size": 2, "batch_size_per_device": 2, "optimizer_in_backward": True, "max_grad_norm": 0},
    ("freeze-vision", True): {"batch_size": 2, "batch_size_per_device": 2, "optimizer_in_backward": True,
                              "max_grad_norm": 0, "checkpointing_layers": 24},
    ("qlora", True): {"batch_size": 2, "batch_size_per_device": 2},
}  # fmt: skip


@dataclass
class Row:
    workload: str
    build: str
    method: str
    checkpointing: bool
    batch: int
    packing: bool | None = None  # None: training's default (packed when a forward pass takes several samples)
    img_s: float = 0.0
    tokens_s: float = 0.0
    tflops: float = 0.0
    mfu: float = 0.0
    peak_gib: float = 0.0
    host_gap: float = 0.0
    loss_first: float | None = None
    loss_last: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


#: False only for the CPU smoke mode (`--tiny`), which runs the same code on a tiny model so tests can check it.
ON_GPU = torch.cuda.is_available()


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def matmul_peak_tflops(n: int = 8192, iters: int = 30) -> float:
    """This card's dense bf16 matmul rate (TFLOP/s): the MFU denominator (fp32 on the CPU smoke mode)."""
    if not ON_GPU:
        n, iters = 512, 5
    dev, dtype = ("cuda", torch.bfloat16) if ON_GPU else ("cpu", torch.float32)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync()
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e12


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if ON_GPU else 0.0


def free_gpu() -> None:
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------------------------------------------
def sample_shapes(records, lengths: list[int], num_crops: int, tokenizer) -> dict[str, SampleShape]:
    """Per sample id: LM tokens (as planned), real crops and image tokens (from the image header), label tokens."""

    shapes = {}
    for rec, length in zip(records, lengths):
        crops = image_tokens = 0
        for ref in rec.images:
            with Image.open(ref) as im:
                h, w = hd_size(im.width, im.height, num_crops)
            crops += num_crops_used(h, w)
            image_tokens += num_image_tokens(h, w)
        answers = sum(len(tokenizer(t.assistant, add_special_tokens=False)["input_ids"]) + 2 for t in rec.turns)
        shapes[rec.id] = SampleShape(length, crops, image_tokens, answers)
    return shapes


class StepTimer(TrainerCallback):
    """Trainer callback: host time of every optimizer step and the host gap before it, with the step's sample ids.

    The device is synchronised only at the end of the last warm-up step and of the last step (`sync_after`), as in a
    real run, where the host queues the next step while the GPU still works on the previous one; a sync at every step
    would make each step start from an empty GPU queue. So single steps are host times, but their sum over the timed
    window is its wall time. The gap before a step is the host's time between steps (waiting for data included).
    """

    def __init__(self, trainer, sync_after: tuple[int, ...] = ()):
        self.trainer = trainer
        self.sync_after = set(sync_after)  # 0-based indices of the steps whose end waits for the device
        self.begin: list[float] = []
        self.end: list[float] = []
        self.ids: list[list[str]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.begin.append(time.perf_counter())
        self.ids.append([])

    def on_substep_end(self, args, state, control, **kwargs):
        self.ids[-1].extend(self.trainer.last_batch_ids)

    def on_step_end(self, args, state, control, **kwargs):
        if len(self.end) in self.sync_after:
            sync()
            sync_debug(len(self.end) == min(self.sync_after))
        self.end.append(time.perf_counter())
        self.ids[-1].extend(self.trainer.last_batch_ids)


def sync_debug(on: bool) -> None:
    """With PHI3V_SYNC_DEBUG=1, PyTorch warns (once per code line) at every operation of the timed steps that makes
    the host wait for the GPU: the list of stalls left in a training step."""
    if ON_GPU and os.environ.get("PHI3V_SYNC_DEBUG") == "1":
        torch.cuda.set_sync_debug_mode("warn" if on else "default")


#: kernel-name fragments -> the kind of work, for the profile's summary (first match wins)
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("communication", ("nccl",)),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90", "cublas", "splitk")),
    ("compiled (triton)", ("triton",)),
    ("copy / fill", ("memcpy", "memset", "copy", "fill")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, parts in KERNEL_KINDS:
        if any(p in low for p in parts):
            return kind
    return "other"


#: GPU-side ranges the profiler records around steps, optimizer calls and compiled graphs: not kernels
ANNOTATION_PREFIXES = ("ProfilerStep", "## ", "Torch-Compiled Region", "Optimizer.", "CompiledFunction")


def is_annotation(event) -> bool:
    """A user/compiler range on the GPU timeline (it spans kernels; counting it would count them twice)."""
    return bool(getattr(event, "is_user_annotation", False)) or event.key.startswith(ANNOTATION_PREFIXES)


def is_kernel(event) -> bool:
    """A kernel on the GPU timeline. The CPU-side op that launched it (aten::mm, a compiled graph's triton launcher
    of the same name) reports the kernel's time as its own 'self' device time too: counting it would count twice."""

    return getattr(event, "device_type", DeviceType.CPU) != DeviceType.CPU and not is_annotation(event)


def profile_summary(prof, wall_s: float) -> str:
    """GPU busy time by kind of kernel against the profiled steps' wall time: what a step spends its time on, and
    how long the GPU sits idle (host-bound steps)."""
    busy: dict[str, float] = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0.0) or 0.0
        if us > 0 and is_kernel(e):
            kind = kernel_kind(e.key)
            busy[kind] = busy.get(kind, 0.0) + us / 1e3
    total = sum(busy.values())
    wall_ms = wall_s * 1e3
    lines = [
        f"profiled steps: wall {wall_ms:.1f} ms, GPU kernels {total:.1f} ms ({100 * total / max(wall_ms, 1e-9):.0f}% busy)"
    ]
    for kind, ms in sorted(busy.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {kind:<20} {ms:9.1f} ms  {100 * ms / max(total, 1e-9):5.1f}% of kernel time")
    return "\n".join(lines) + "\n\n"


def write_kernel_table(prof, name: str, wall_s: float = 0.0) -> None:
    """The profiler's top operations by device time (CPU time on the CPU) into PHI3V_PROFILE/name.txt, after a
    summary of GPU busy time by kind of kernel."""
    folder = Path(os.environ["PHI3V_PROFILE"])
    folder.mkdir(parents=True, exist_ok=True)
    key = "cuda_time_total" if ON_GPU else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=90)
    head = profile_summary(prof, wall_s) if ON_GPU else ""
    (folder / f"{name}.txt").write_text(head + table)


class profiled:
    """With PHI3V_PROFILE=FOLDER: profile the two steps right after `warmup` (the first timed ones; step warmup-1 is
    the profiler's own warm-up) and write the top kernels to FOLDER/name.txt, for our rows and the plain ones alike.
    Call `step()` after every training step; with a `trainer`, a callback does it."""

    def __init__(self, warmup: int, name: str, trainer=None):
        self.folder = os.environ.get("PHI3V_PROFILE")
        self.warmup, self.name, self.trainer = warmup, name, trainer
        self.prof = None
        self.steps_seen, self.t0, self.wall = 0, 0.0, 0.0

    def __enter__(self):
        if not self.folder:
            return self

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])
        when = schedule(wait=max(self.warmup - 1, 0), warmup=min(self.warmup, 1), active=2, repeat=1)
        self.prof = profile(activities=acts, schedule=when)
        if self.trainer is not None:
            step = self.step

            class _Step(TrainerCallback):
                def on_step_end(self, args, state, control, **kwargs):
                    step()

            self.trainer.add_callback(_Step())
        self.prof.__enter__()
        return self

    def step(self) -> None:
        if self.prof is not None:
            self.prof.step()
            self.steps_seen += 1
            # the active window: after step `warmup` (the profiler records from there) through step warmup + 2
            if self.steps_seen == self.warmup:
                sync()
                self.t0 = time.perf_counter()
            elif self.steps_seen == self.warmup + 2:
                sync()
                self.wall = time.perf_counter() - self.t0

    def __exit__(self, *exc):
        if self.prof is None:
            return False
        self.prof.__exit__(*exc)
        write_kernel_table(self.prof, self.name, self.wall)
        return False


def summarise(
    row: Row,
    cycles: list[float],
    gaps: list[float],
    step_flops: list[float],
    step_tokens: list[int],
    step_samples: list[int],
    peak_tflops: float,
) -> Row:
    wall = sum(cycles)
    row.img_s = sum(step_samples) / wall
    row.tokens_s = sum(step_tokens) / wall
    row.tflops = sum(step_flops) / wall / 1e12
    row.mfu = row.tflops / peak_tflops
    row.host_gap = sum(gaps) / wall
    row.peak_gib = peak_gib()
    return row


# ----------------------------------------------------------------------------------------------------------------
def run_ours(row: Row, model_dir: Path, wl, work: Path, steps: int, warmup: int, peak: float, **overrides) -> Row:
    """`steps` timed optimizer steps (after `warmup`) of our training path on workload files `wl`."""
    free_gpu()
    settings = dict(
        data=str(wl.jsonl),
        model=str(model_dir),
        method=row.method,
        bf16=ON_GPU,
        num_crops=wl.num_crops,
        gradient_checkpointing=row.checkpointing,
        batch_size=row.batch,
        batch_size_per_device=row.batch,
        max_steps=warmup + steps,
        warmup_steps=0,
        learning_rate=5e-6,
        logging_steps=warmup + steps,  # the first step and the last: logging reads the loss (a device sync)
        save_checkpoints=False,
        report_to="none",
        num_workers=8 if ON_GPU else 0,
        cpu=not ON_GPU,
        progress=False,
        lora_rank=64,
        lora_alpha=128,
        output_dir=str(work / "run"),
    )
    if row.packing is not None:  # the short workload's packed-vs-padded pairs
        settings["packing"] = row.packing
    settings.update(overrides)
    row.extra.update(overrides)
    cfg = TrainConfig(**settings)
    row.batch = cfg.batch_size_per_device  # --set / --tuned may change how many samples a forward pass takes
    row.checkpointing = cfg.gradient_checkpointing
    run = TrainingRun(cfg).setup()  # the path `phi3v-tune train` takes, up to the training loop
    row.packing = run.runtime.packing
    row.extra.setdefault("compile", run.runtime.compile)
    shapes = sample_shapes(run.data.train, run.data.train_plan.lengths, wl.num_crops, run.processor.tokenizer)
    config = Phi3VConfig.from_pretrained(str(model_dir))
    trainer, model = run.trainer, run.trainer.model
    timer = StepTimer(trainer, sync_after=(warmup - 1, warmup + steps - 1))
    trainer.add_callback(timer)
    with profiled(warmup, f"ours-{row.workload}-{row.method}", trainer):
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    row.loss_first, row.loss_last = (losses[0], losses[-1]) if losses else (None, None)
    cycles, gaps, flops, toks, samples = [], [], [], [], []
    for i in range(warmup, len(timer.end)):
        cycles.append(timer.end[i] - timer.end[i - 1])
        gaps.append(timer.begin[i] - timer.end[i - 1])
        ids = list(dict.fromkeys(timer.ids[i]))
        batch = [shapes[x] for x in ids]
        flops.append(training_flops(config, batch, row.method, lora_rank=cfg.lora_rank))
        toks.append(sum(s.tokens for s in batch))
        samples.append(len(batch))
    summarise(row, cycles, gaps, flops, toks, samples, peak)
    trainer.accelerator.free_memory()
    del trainer, model, run
    free_gpu()
    return row


def run_plain(row: Row, config, shapes: list[SampleShape], steps: int, warmup: int, peak: float) -> Row:
    """The plain build on the same per-sample shapes (CLIP on all crop slots: 17 at num_crops 16)."""

    free_gpu()
    row.packing = False  # one sample per step
    if ON_GPU:  # PyTorch's default SDPA order (cuDNN first on H100), whatever an earlier row of ours selected
        torch.backends.cuda.enable_cudnn_sdp(True)
    device = "cuda" if ON_GPU else "cpu"
    setup = build_plain(config, row.method, row.checkpointing, device=device)
    slots = row.extra.get("crop_slots", 17)
    cycles, flops, toks, losses = [], [], [], []
    last = time.perf_counter()
    with profiled(warmup, f"plain-{row.workload}-{row.method}") as prof:
        for i in range(warmup + steps):
            s = shapes[i % len(shapes)]
            losses.append(plain_step(setup, slots, s.tokens, s.image_tokens, s.label_tokens, device=device))
            if i in (warmup - 1, warmup + steps - 1):  # as ours: the device is waited for at the window's ends only
                sync()
            prof.step()
            now = time.perf_counter()
            if i >= warmup:
                cycles.append(now - last)
                flops.append(training_flops(config, [s], row.method))
                toks.append(s.tokens)
            last = now
    row.loss_first, row.loss_last = float(losses[0]), float(losses[-1])
    summarise(row, cycles, [0.0] * len(cycles), flops, toks, [1] * len(cycles), peak)
    del setup
    free_gpu()
    return row


# ----------------------------------------------------------------------------------------------------------------
def write_checkpoint(folder: Path, tiny: bool = False) -> None:
    """A full-size random-weight bf16 checkpoint in the published layout, with a small local tokenizer."""

    if (folder / "config.json").is_file():
        return
    if tiny:
        save_tiny_checkpoint(folder, num_crops=16)
        return
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Phi3VForCausalLM(phi35_vision_config())
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder, max_shard_size="5GB")
    Phi3VProcessor.from_tokenizer(build_tiny_tokenizer(), num_crops=16).save_pretrained(folder)
    del model
    free_gpu()


def markdown(rows: list[Row], peak: float, command: str) -> str:
    card = torch.cuda.get_device_name() if ON_GPU else "CPU (tiny model smoke run)"

    head = (
        f"\n## {time.strftime('%Y-%m-%d')} — training throughput, {card}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}\n\nCommand: `{command}`. Measured dense bf16 matmul rate "
        f"{peak:.0f} TFLOP/s (the MFU denominator).\n\n"
        "| workload | build | method | ckpt | batch | packing | img/s | tokens/s | TFLOP/s | MFU | peak GiB | "
        "host gap | loss first→last | notes |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        if r.error:
            lines.append(
                f"| {r.workload} | {r.build} | {r.method} | {r.checkpointing} | {r.batch} | {bool(r.packing)} | "
                f"failed: {r.error[:120]} ||||||||\n"
            )
            continue
        notes = ", ".join(f"{k}={v}" for k, v in r.extra.items())
        loss = f"{r.loss_first:.3f}→{r.loss_last:.3f}" if r.loss_first is not None else ""
        lines.append(
            f"| {r.workload} | {r.build} | {r.method} | {'yes' if r.checkpointing else 'no'} | {r.batch} | "
            f"{'yes' if r.packing else 'no'} | {r.img_s:.2f} | {r.tokens_s:.0f} | {r.tflops:.0f} | "
            f"{100 * r.mfu:.0f}% | {r.peak_gib:.1f} | {100 * r.host_gap:.1f}% | {loss} | {notes} |\n"
        )
    return head + "".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="phi3v-tune bench", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        check(args)
    except ValueError as err:
        ap.error(str(err))
    return args


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def docvqa_docs_per_step(tuned: bool, overrides: dict[str, Any]) -> int:
    """The most documents one optimizer step of our DocVQA rows takes: --set batch_size, else the largest of TUNED's
    batch sizes under --tuned, else 1."""
    if "batch_size" in overrides:
        return int(overrides["batch_size"])
    return max((int(s.get("batch_size", 1)) for s in TUNED.values()), default=1) if tuned else 1


def docvqa_plain_shapes(wl, model_dir: Path, n: int) -> list[SampleShape]:
    """The first `n` DocVQA samples' shapes, for the plain rows (same lengths as ours, CLIP on all 17 slots)."""

    proc = Phi3VProcessor.from_pretrained(str(model_dir), num_crops=wl.num_crops)
    recs = read_jsonl(wl.jsonl)[0][:n]
    lengths = [int(build_example(r, proc)["input_ids"].shape[0]) for r in recs]
    return list(sample_shapes(recs, lengths, wl.num_crops, proc.tokenizer).values())


def main(argv: list[str] | None = None) -> list[Row]:
    """`benchmarks/bench_train.py`: parse the flags, then `run`."""
    args = parse_args(argv)
    return run(args, command="phi3v-tune bench " + " ".join(sys.argv[1:] if argv is None else argv))


def run(args: argparse.Namespace, command: str) -> list[Row]:
    """Every row the flags ask for; `command` is printed with the table."""
    global ON_GPU
    ON_GPU = torch.cuda.is_available() and not args.tiny
    if not ON_GPU and not args.tiny:
        raise SystemExit("phi3v-tune bench needs a CUDA GPU (it measures GPU training throughput); --tiny: CPU smoke")
    overrides = dict(kv.split("=", 1) for kv in args.set)
    overrides = {k.replace("-", "_"): _value(v) for k, v in overrides.items()}

    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:  # a mistyped --set must not silently measure the default setting
        raise SystemExit(f"--set: unknown training setting(s) {', '.join(unknown)} (see phi3v-tune train --help)")
    work, model_dir = Path(args.work), Path(args.model_dir)
    peak = matmul_peak_tflops()
    print(f"matmul rate {peak:.1f} TFLOP/s", flush=True)
    t = time.time()
    write_checkpoint(model_dir, tiny=args.tiny)
    print(f"random checkpoint ready in {time.time() - t:.0f} s", flush=True)
    config = Phi3VConfig.from_pretrained(str(model_dir)) if args.tiny else phi35_vision_config()
    methods = args.methods.split(",")
    if not ON_GPU and "qlora" in methods:  # bitsandbytes' 4-bit kernels run on CUDA only
        methods.remove("qlora")
        print("skipped on the CPU: the qlora rows (4-bit kernels need a CUDA GPU)", flush=True)
    ckpts = [c.strip() in ("yes", "true", "1") for c in args.checkpointing.split(",")]
    builds = args.builds.split(",")
    rows: list[Row] = []
    out_json = open(args.json, "a") if args.json else None

    def record(row: Row, fn, *a, **kw) -> None:
        t0 = time.time()
        try:
            fn(row, *a, **kw)
        except Exception as err:  # one failing row must not lose the others
            traceback.print_exc()
            row.error = f"{type(err).__name__}: {err}"
            free_gpu()
        row.extra["wall_s"] = round(time.time() - t0)
        rows.append(row)
        print(json.dumps(asdict(row)), flush=True)
        if out_json:
            out_json.write(json.dumps(asdict(row)) + "\n")
            out_json.flush()

    def ours(row: Row, wl) -> None:
        tuned = TUNED.get((row.method, row.checkpointing), {}) if args.tuned and row.workload == "docvqa" else {}
        record(row, run_ours, model_dir, wl, work, args.steps, args.warmup, peak, **{**tuned, **overrides})

    def plain(row: Row, shapes: list[SampleShape]) -> None:
        record(row, run_plain, config, shapes, args.steps, args.warmup, peak)

    for name in args.workloads.split(","):
        # enough samples that the timed steps stay inside the first epoch (no epoch-boundary effects)
        per_step = args.short_batch if name != "docvqa" else docvqa_docs_per_step(args.tuned, overrides)
        wl = write_workload(name, work / name, max(args.samples, (args.warmup + args.steps + 1) * per_step))
        if name == "docvqa":
            plain_shapes: list[SampleShape] = []
            if "plain" in builds:
                plain_shapes = docvqa_plain_shapes(wl, model_dir, args.steps + args.warmup)
                if args.fixed_plain:
                    fixed = [SampleShape(2560, 17, 2509, 10)]
                    plain(Row(name, "plain", "full", False, 1, extra={"shape": "fixed 17 crops 2560 tokens"}), fixed)
            for method in methods:
                for ck in ckpts:
                    if "plain" in builds:
                        plain(Row(name, "plain", method, ck, 1), plain_shapes)
                    if "ours" in builds:
                        ours(Row(name, "ours", method, ck, 1), wl)
        elif "ours" in builds:
            padded = args.padded_too.split(",") if args.padded_too else []
            for method in methods:
                for ck in ckpts:
                    ours(Row(name, "ours", method, ck, args.short_batch, packing=True), wl)
                    if method in padded:
                        ours(Row(name, "ours", method, ck, args.short_batch, packing=False), wl)
    table = markdown(rows, peak, command)
    print(table)
    if args.results:
        with open(args.results, "a") as f:
            f.write(table)
    return rows
