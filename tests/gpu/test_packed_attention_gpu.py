"""GPU (skipped without CUDA): torch's fused varlen attention agrees with causal SDPA over each segment in bf16."""

from __future__ import annotations

import pytest
import torch

from phi3v_tune.model import packed_attention
from phi3v_tune.model.packed_attention import segment_attention, varlen_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(lengths: list[int], heads: int = 8, dim: int = 64, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, dim, device="cuda", generator=g) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return q, k, v, cu


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("lengths", [[777, 35, 1251, 15], [1, 2048, 3, 511]])
def test_varlen_attn_matches_per_segment_sdpa_in_bf16(lengths):
    if packed_attention.VARLEN_ATTN is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn")
    q, k, v, cu = _inputs(lengths)
    scale = q.shape[-1] ** -0.5
    ref = segment_attention(q, k, v, cu.tolist(), scale)  # fp32 reference
    leaves = [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v)]
    fused = varlen_attention(*leaves, cu, max(lengths), scale)
    grad_out = torch.randn_like(fused)
    fused.backward(grad_out)
    fused_grads = [x.grad for x in leaves]
    leaves2 = [x.detach().clone().requires_grad_() for x in leaves]
    per_segment = segment_attention(*leaves2, cu.tolist(), scale)
    per_segment.backward(grad_out)
    assert fused.dtype == torch.bfloat16 and fused.shape == q.shape
    # the fused kernel is as close to fp32 as bf16 SDPA per segment is, and both agree with each other
    assert _error(fused, ref) < 1e-2 and _error(fused, ref) <= 2 * _error(per_segment, ref) + 1e-3
    assert _error(fused, per_segment) < 1e-2
    for a, b in zip(fused_grads, [x.grad for x in leaves2]):
        assert _error(a, b) < 2e-2


def test_fp32_on_gpu_is_exact_per_segment():
    q, k, v, cu = _inputs([100, 20, 300])
    assert torch.equal(varlen_attention(q, k, v, cu, 300, 0.125), segment_attention(q, k, v, cu.tolist(), 0.125))


def test_packed_model_loss_matches_padded_in_bf16(tiny_tokenizer, tiny_processor):
    import numpy as np
    from PIL import Image

    from phi3v_tune.data.collate import Collator
    from phi3v_tune.data.packing import PackingCollator
    from phi3v_tune.model.modeling import set_rope_per_sample
    from phi3v_tune.model.packed_attention import ATTN_NAME
    from phi3v_tune.model.tiny import tiny_model

    def example(prompt: str, images: list) -> dict:
        text = tiny_processor.apply_chat_template([{"role": "user", "content": prompt}]) + "red<|end|>\n"
        out = tiny_processor(text=text, images=images or None)
        ids = out["input_ids"][0]
        labels = ids.clone()
        labels[: len(ids) - 3] = -100
        e = {"input_ids": ids, "labels": labels}
        if images:
            e["pixel_values"], e["image_sizes"] = out["pixel_values"], out["image_sizes"]
        return e

    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (400, 700, 3), dtype=np.uint8))
    examples = [example("<|image_1|>\nWhat colour?", [image]), example("Text only.", []), example("Hi", [])]
    model = tiny_model(tiny_tokenizer, seed=3, original_max_position_embeddings=64).to("cuda", torch.bfloat16)
    set_rope_per_sample(model)  # training's setting: the padded rows' samples take their own factor sets, as packed
    model.set_attn_implementation(ATTN_NAME)
    pad = tiny_tokenizer.pad_token_id

    def loss(batch: dict) -> float:
        batch = {
            k: v.to("cuda") if torch.is_tensor(v) else v for k, v in batch.items() if k not in ("ids", "num_tokens")
        }
        with torch.no_grad():
            return float(model(**batch).loss)

    padded, packed = loss(Collator(pad)(examples)), loss(PackingCollator(pad, None, 64)(examples))
    assert abs(packed - padded) / abs(padded) < 2e-2
