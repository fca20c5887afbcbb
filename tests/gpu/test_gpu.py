"""GPU tests (skipped without CUDA): bf16 + sdpa on the GPU agrees with fp32 on the CPU; QLoRA builds and trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bf16_sdpa_on_gpu_matches_fp32_cpu(tiny_tokenizer, tiny_processor):
    from phi3v_tune.model.tiny import tiny_model

    model = tiny_model(tiny_tokenizer, seed=3)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (400, 700, 3), dtype=np.uint8))
    text = tiny_processor.apply_chat_template([{"role": "user", "content": "<|image_1|>\nWhat is shown?"}])
    inputs = tiny_processor(text=text, images=[image])
    with torch.no_grad():
        ref = model(**inputs).logits
        gpu = model.to("cuda", torch.bfloat16)
        got = gpu(**{k: v.to("cuda") for k, v in inputs.items()}).logits.float().cpu()
    assert float((got - ref).norm() / ref.norm()) < 3e-2


def test_qlora_strategy_quantizes_the_language_model(tiny_tokenizer, tmp_path):
    pytest.importorskip("bitsandbytes")
    from phi3v_tune.model.tiny import save_tiny_checkpoint
    from phi3v_tune.train.config import TrainConfig
    from phi3v_tune.train.run import load_model
    from phi3v_tune.train.strategies import apply_strategy, count_parameters

    folder = save_tiny_checkpoint(tmp_path / "tiny", num_crops=1)
    cfg = TrainConfig(method="qlora", bf16=True, lora_rank=4)
    model = apply_strategy(load_model(cfg, str(folder)), cfg)
    names = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in names
    counts = count_parameters(model)
    assert 0 < counts.trainable < counts.total
