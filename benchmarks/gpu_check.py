"""GPU check: full-size random-weight Phi-3.5-vision, bf16 + sdpa, forward + backward on a 4x4-crop image prompt.

Usage: python benchmarks/gpu_check.py [--steps 5] [--attn sdpa] [--checkpointing]
Prints seconds per forward+backward and peak GPU memory (no optimizer step: that belongs to bench_train.py).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

from phi3v_tune import Phi3VForCausalLM, Phi3VProcessor
from phi3v_tune.model.presets import phi35_vision_config
from phi3v_tune.model.tiny import build_tiny_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--checkpointing", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    cfg = phi35_vision_config()
    cfg._attn_implementation = args.attn
    t0 = time.time()
    torch.set_default_dtype(torch.bfloat16)
    with dev:
        model = Phi3VForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.set_attn_implementation(args.attn)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    build_s = time.time() - t0
    # the tokenizer only shapes the text; image tokens dominate (2509 for a 4x4 grid)
    proc = Phi3VProcessor.from_tokenizer(build_tiny_tokenizer(), num_crops=16)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (1344, 1344, 3), dtype=np.uint8))
    text = proc.apply_chat_template([{"role": "user", "content": "<|image_1|>\nWhat is the total amount?"}])
    inputs = proc(text=text + "The total is 42.<|end|>\n<|endoftext|>", images=[image]).to(dev)
    labels = inputs["input_ids"].clone()
    labels[:, :-12] = -100
    n_tokens = inputs["input_ids"].shape[1]
    times = []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(**inputs, labels=labels)
        out.loss.backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
    steady = sorted(times[1:])[len(times[1:]) // 2]
    result = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "attn": args.attn,
        "checkpointing": args.checkpointing,
        "tokens": n_tokens,
        "image_tokens": int((inputs["input_ids"] < 0).sum()),
        "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "build_s": round(build_s, 1),
        "first_step_s": round(times[0], 3),
        "median_fwd_bwd_s": round(steady, 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "loss": round(float(out.loss), 4),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
