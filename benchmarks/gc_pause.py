"""How long one full garbage collection takes in a training process, and after `gc.freeze()` (CPU, no GPU needed).

Why: a full collection scans every object the process holds. The model's modules and parameters, PEFT's wrappers
and torch.compile's graphs and guards make that a pause of a few hundred milliseconds, which under data parallelism
stalls every rank (see `train/gc_control.py`, `--gc-interval`). The count of objects depends on the model's depth,
not its widths, so the default model has the published depth (32 decoder, 24 CLIP layers) with tiny widths; `--full`
builds the published sizes (bf16, ~9 GB of memory, slower). Usage: python benchmarks/gc_pause.py [--method lora]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from PIL import Image

from phi3v_tune.model.modeling import Phi3VForCausalLM
from phi3v_tune.model.presets import phi35_vision_config
from phi3v_tune.model.tiny import build_tiny_tokenizer, tiny_config
from phi3v_tune.processing.processor import Phi3VProcessor
from phi3v_tune.train.compile import compile_layers
from phi3v_tune.train.config import TrainConfig
from phi3v_tune.train.strategies import apply_strategy

DEEP = dict(
    num_hidden_layers=32,
    vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 24, "num_attention_heads": 4,
                   "image_size": 336, "patch_size": 14, "projection_dim": 32},
)  # fmt: skip


def full_collection(label: str) -> None:
    start = time.perf_counter()
    gc.collect()
    ms = (time.perf_counter() - start) * 1e3
    print(f"{label:<32} {len(gc.get_objects()):>10,} tracked objects   full collection {ms:7.1f} ms", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="lora", choices=("full", "freeze-vision", "lora"), help="what trains")
    ap.add_argument("--full", action="store_true", help="the published sizes instead of tiny widths")
    ap.add_argument("--no-compile", action="store_true", help="leave the layers eager")
    args = ap.parse_args()

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
        config = tiny_config(tok, **DEEP)
    model = Phi3VForCausalLM(config).train()
    full_collection("model built")
    model = apply_strategy(model, TrainConfig(method=args.method, lora_rank=8, cpu=True))
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
