"""How long one full garbage collection takes in a training process, and after `gc.freeze()` (CPU, no GPU needed).

Why: a full collection scans every object the process holds. The model's modules and parameters, PEFT's wrappers
and torch.compile's graphs and guards make that a pause of a few hundred milliseconds, which under data parallelism
stalls every rank (see `train/gc_control.py`, `--gc-interval`). The count of objects depends on the model's depth,
not its widths, so the default model has the published depth (32 decoder, 24 CLIP layers) with tiny widths; `--full`
builds the published sizes (bf16, ~9 GB of memory, slower).
`--train N` instead trains N steps through `run_training` (lora, compiled, 2 packed samples per step, 2 data-loader
workers), once with Python's automatic collection and once with `--gc-interval 100`, and lists every full collection
that ran during the training steps: at which step, and how long it took.
Usage: python benchmarks/gc_pause.py [--method lora] [--train 200]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from phi3v_tune.config import TrainConfig
from phi3v_tune.model.modeling import Phi3VForCausalLM
from phi3v_tune.model.presets import phi35_vision_config
from phi3v_tune.model.tiny import PUBLISHED_DEPTH, build_tiny_tokenizer, tiny_config
from phi3v_tune.processing.processor import Phi3VProcessor
from phi3v_tune.train.compile import compile_layers
from phi3v_tune.train.strategies import LoraSettings, apply_strategy


def full_collection(label: str) -> None:
    start = time.perf_counter()
    gc.collect()
    ms = (time.perf_counter() - start) * 1e3
    print(f"{label:<32} {len(gc.get_objects()):>10,} tracked objects   full collection {ms:7.1f} ms", flush=True)


class FullCollectionLog:
    """(step, ms) of every full collection while `step` is set (the Trainer's current step; None outside training)."""

    def __init__(self):
        self.step: int | None = None
        self.events: list[tuple[int, float]] = []
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        elif self.step is not None:
            self.events.append((self.step, round((time.perf_counter() - self._start) * 1e3, 1)))


def collections_during_training(steps: int, interval: int, folder: Path) -> list[tuple[int, float]]:
    from transformers import TrainerCallback

    import phi3v_tune.train.run as run
    from phi3v_tune.data.synthetic import demo_split, write_jsonl
    from phi3v_tune.model.tiny import save_tiny_checkpoint

    model_dir = folder / "model"
    if not (model_dir / "config.json").is_file():
        save_tiny_checkpoint(model_dir, num_crops=1, **PUBLISHED_DEPTH)
    train, _ = demo_split(40, 1, seed=5, tasks=("colour",), as_png=True)
    data = write_jsonl(train, folder / "data")
    log = FullCollectionLog()

    class Where(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            log.step = state.global_step

        def on_train_end(self, args, state, control, **kwargs):
            log.step = None

    cfg = TrainConfig(
        data=str(data), model=str(model_dir), num_crops=1, output_dir=str(folder / f"out-{interval}"), method="lora",
        lora_rank=4, batch_size=2, batch_size_per_device=2, max_steps=steps, logging_steps=10, report_to="none",
        num_workers=2, progress=False, cpu=True, save_checkpoints=False, compile=True, gc_interval=interval,
    )  # fmt: skip
    training = run.TrainingRun(cfg).setup()
    training.trainer.add_callback(Where())
    gc.callbacks.append(log)
    try:
        training.train()
    finally:
        gc.callbacks.remove(log)
    return log.events


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="lora", choices=("full", "freeze-vision", "lora"), help="what trains")
    ap.add_argument("--full", action="store_true", help="the published sizes instead of tiny widths")
    ap.add_argument("--no-compile", action="store_true", help="leave the layers eager")
    ap.add_argument("--train", type=int, default=0, metavar="N", help="train N steps twice (see above) instead")
    args = ap.parse_args()
    if args.train:
        with tempfile.TemporaryDirectory() as tmp:
            for interval in (0, 100):
                start = time.perf_counter()
                events = collections_during_training(args.train, interval, Path(tmp))
                wall = time.perf_counter() - start
                what = "automatic collection" if interval == 0 else f"--gc-interval {interval}"
                print(
                    f"{what}: {len(events)} full collections during {args.train} steps (step, ms): {events}; "
                    f"whole run {wall:.0f} s",
                    flush=True,
                )
        return

    tok = build_tiny_tokenizer()
    proc = Phi3VProcessor.from_tokenizer(tok, num_crops=4)
    enc = proc(
        "<|user|>\n<|image_1|>\nWhat is the total?<|end|>\n<|assistant|>\nthe total is 12<|end|>\n",
        images=[Image.new("RGB", (672, 672), "white")],
        return_tensors="pt",
    )
    inputs = {k: enc[k] for k in ("input_ids", "pixel_values", "image_sizes")}
    if args.full:
        torch.set_default_dtype(torch.bfloat16)
        config = phi35_vision_config()
        inputs["input_ids"] = inputs["input_ids"].clamp(max=config.vocab_size - 1)
    else:
        config = tiny_config(tok, **PUBLISHED_DEPTH)
    model = Phi3VForCausalLM(config).train()
    full_collection("model built")
    model = apply_strategy(model, args.method, lora=LoraSettings(rank=8, alpha=16))
    full_collection(f"method {args.method} applied")
    if not args.no_compile:
        compile_layers(model)
    labels = inputs["input_ids"].clamp(min=0)
    for step in range(3):
        model(**inputs, labels=labels).loss.backward()
        if step == 0:
            full_collection("after the first (compiling) step")
    full_collection("after 3 steps")
    gc.freeze()
    full_collection("after gc.freeze()")


if __name__ == "__main__":
    main()
