"""GPU (skipped without CUDA): preference pairs packed with a shared prompt (the rejected answer as a branch that
attends to the prompt through masked SDPA) give the log-probabilities and gradients of the two full sequences in bf16,
eager and with the decoder layers compiled as training compiles them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("compiled", [False, True])
def test_shared_prompt_pairs_match_full_sequences_in_bf16(tiny_tokenizer, tiny_processor, compiled):
    from phi3v_tune.data.preference import PackedPairCollator, PreferenceRecord, build_pair_example
    from phi3v_tune.data.schema import Record, Turn
    from phi3v_tune.model.modeling import set_rope_per_sample
    from phi3v_tune.model.packed_attention import ATTN_NAME
    from phi3v_tune.model.preference import sequence_logps
    from phi3v_tune.model.tiny import tiny_model
    from phi3v_tune.train.compile import compile_layers

    def image(seed: int) -> Image.Image:
        return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (400, 700, 3), dtype=np.uint8))

    pairs = [
        PreferenceRecord(Record("a", None, [Turn("What colour is it?", "", [image(1)])]), "red", "a blue square"),
        PreferenceRecord(Record("b", None, [Turn("Left or right?", "")]), "left, on the edge", "right"),
        PreferenceRecord(Record("c", None, [Turn("Which?", "", [image(2), image(3)])]), "the first", "second one"),
    ]
    examples = [build_pair_example(p, tiny_processor) for p in pairs]
    model = tiny_model(tiny_tokenizer, seed=3, original_max_position_embeddings=4096).to("cuda", torch.bfloat16)
    set_rope_per_sample(model)
    model.set_attn_implementation(ATTN_NAME)
    model.train()
    if compiled:
        assert compile_layers(model) > 0
    pad = tiny_tokenizer.pad_token_id
    results = []
    for share in (False, True):
        batch = PackedPairCollator(pad, None, 4096, share_prompt=share)(examples)
        assert ("branch_positions" in batch) == share
        batch = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
        model.zero_grad(set_to_none=True)
        logps, tokens = sequence_logps(model, batch)
        logps.sum().backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logps.detach().float(), tokens, grads))
    (lp_full, n_full, g_full), (lp_shared, n_shared, g_shared) = results
    assert n_shared.tolist() == n_full.tolist()
    assert _error(lp_shared, lp_full) < 2e-2, (lp_shared, lp_full)
    assert set(g_shared) == set(g_full)
    big = [n for n in g_full if float(g_full[n].norm()) > 1e-3]
    assert len(big) > 20
    for name in big:
        assert _error(g_shared[name], g_full[name]) < 5e-2, name
