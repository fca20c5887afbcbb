"""Count aten calls of one training step, ours vs the plain build, on a tiny model with the published depth (CPU).

Why: at batch 1 a GPU training step is bound by how fast the host issues operations, so the number of operations
per step matters as much as the FLOPs. Usage: python benchmarks/op_count.py
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from phi3v_tune.model.modeling import Phi3VForCausalLM
from phi3v_tune.model.tiny import PUBLISHED_DEPTH, build_tiny_tokenizer, tiny_config
from phi3v_tune.perf.baseline import build_plain, plain_step
from phi3v_tune.processing.processor import Phi3VProcessor
from phi3v_tune.train.optim import AdamWSR
from phi3v_tune.train.strategies import LoraSettings, apply_strategy


def aten_calls(fn: Callable[[], None]) -> int:
    fn()  # warm-up (optimizer state creation)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def main() -> None:
    tok = build_tiny_tokenizer()
    proc = Phi3VProcessor.from_tokenizer(tok, num_crops=16)
    cfg = tiny_config(tok, **PUBLISHED_DEPTH)
    enc = proc(
        "<|user|>\n<|image_1|>\nWhat is the total?<|end|>\n<|assistant|>\nthe total is 12<|end|>\n",
        images=[Image.new("RGB", (1000, 1300), "white")],
        return_tensors="pt",
    )
    labels = enc["input_ids"].clone()
    labels[:, :-8] = -100
    tokens, image_tokens = enc["input_ids"].shape[1], int((enc["input_ids"] < 0).sum())
    for method in ("full", "lora"):
        torch.manual_seed(0)
        model = Phi3VForCausalLM(cfg).to(torch.bfloat16).train()
        model = apply_strategy(model, method, lora=LoraSettings(rank=8, alpha=16), bf16_adapters=True)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = AdamWSR(params, lr=1e-5)

        def forward_backward(model=model) -> None:
            out = model(**{k: enc[k] for k in ("input_ids", "pixel_values", "image_sizes")}, labels=labels)
            out.loss.backward()

        fb = aten_calls(forward_backward)
        step = aten_calls(opt.step)
        plain = build_plain(cfg, method, False, lora_rank=8, device="cpu")
        base = aten_calls(lambda plain=plain: plain_step(plain, 17, tokens, image_tokens, 8, device="cpu"))
        print(
            f"{method}: ours forward+backward {fb}, optimizer {step} ({len(params)} tensors); plain whole step {base}"
        )


if __name__ == "__main__":
    main()
