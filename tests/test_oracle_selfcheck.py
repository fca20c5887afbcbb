"""Self-checks of the test oracle (tests/oracle.py) on tiny random configurations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from oracle import (
    VE,
    find_image_runs,
    hd_merge,
    merge_2x2,
    num_image_tokens,
    random_state_dict,
    reference_logits,
    reference_loss,
    rope_cos_sin,
    rope_scaling_factor,
)

TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 96,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "su",
        "short_factor": [1.0 + 0.1 * i for i in range(8)],
        "long_factor": [2.0 + 3.0 * i for i in range(8)],
    },
    "original_max_position_embeddings": 4096,
    "max_position_embeddings": 131072,
    "vocab_size": 128,
    "img_processor": {"image_dim_out": 32, "num_img_tokens": 144},
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "image_size": 336,
        "patch_size": 14,
        "layer_norm_eps": 1e-5,
        "hidden_act": "quick_gelu",
    },
}


@pytest.fixture(scope="module")
def sd():
    return random_state_dict(TINY, seed=0, std=0.1)


def _image_sample(prefix: list[int], h: int, w: int, suffix: list[int], k: int = 1) -> list[int]:
    return prefix + [-k] * num_image_tokens(h, w, TINY) + suffix


def _pixels(n_images: int, n_crops: int = 5, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_images, n_crops, 3, 336, 336, generator=g)


def test_rope_scaling_constant():
    assert round(rope_scaling_factor(131072, 4096), 4) == 1.1902
    assert rope_scaling_factor(4096, 4096) == 1.0
    cos, sin = rope_cos_sin(TINY, 3)
    # position 0: cos = scaling, sin = 0
    assert torch.allclose(cos[0], torch.full((16,), rope_scaling_factor(131072, 4096)))
    assert torch.equal(sin[0], torch.zeros(16))


def test_rope_frequencies():
    cos, sin = rope_cos_sin(TINY, 5)
    s = rope_scaling_factor(131072, 4096)
    factors = TINY["rope_scaling"]["short_factor"]
    for i in range(8):
        inv = 1.0 / (factors[i] * 10000.0 ** (2 * i / 16))
        for col in (i, i + 8):
            assert math.isclose(float(cos[4, col]), math.cos(4 * inv) * s, rel_tol=1e-5)
            assert math.isclose(float(sin[4, col]), math.sin(4 * inv) * s, rel_tol=1e-5, abs_tol=1e-6)


def test_token_count_formula():
    assert num_image_tokens(1, 1) == 313
    assert num_image_tokens(2, 2) == 757
    assert num_image_tokens(4, 4) == 2509
    assert num_image_tokens(3, 5) == 2353
    for h in range(1, 5):
        for w in range(1, 5):
            assert num_image_tokens(h, w) == (h * w + 1) * 144 + 1 + (h + 1) * 12


def test_merge_2x2_channel_order():
    side, C = 4, 2
    feats = torch.arange(side * side * C, dtype=torch.float32).reshape(side * side, C)
    grid = feats.reshape(side, side, C)
    out = merge_2x2(feats, side)
    assert out.shape == (2, 2, 4 * C)
    assert torch.equal(out[1, 0], torch.cat([grid[2, 0], grid[2, 1], grid[3, 0], grid[3, 1]]))


def test_hd_merge_layout():
    # Each token carries (crop, i, j) in its channels so the layout can be read back.
    g, h, w = 3, 2, 3
    merged = [
        torch.tensor([[[float(c), float(i), float(j), 0.0] for j in range(g)] for i in range(g)])
        for c in range(1 + h * w)
    ]
    sub_gn = torch.tensor([-1.0, -1.0, -1.0, -1.0]).reshape(1, 1, 1, 4)
    glb_gn = torch.tensor([-2.0, -2.0, -2.0, -2.0]).reshape(1, 1, 4)
    out = hd_merge(merged, h, w, sub_gn, glb_gn)
    assert out.shape == ((h * g) * (w * g + 1) + 1 + g * (g + 1), 4)

    # Same layout built another way: stack the sub-crops as (h, w, g, g, C) -> (h, g, w, g, C) -> grid rows.
    subs = torch.stack(merged[1:]).reshape(h, w, g, g, 4).permute(0, 2, 1, 3, 4).reshape(h * g, w * g, 4)
    sub_rows = torch.cat([subs, sub_gn.reshape(1, 1, 4).expand(h * g, 1, 4)], dim=1).reshape(-1, 4)
    glb_rows = torch.cat([merged[0], sub_gn.reshape(1, 1, 4).expand(g, 1, 4)], dim=1).reshape(-1, 4)
    expected = torch.cat([sub_rows, glb_gn.reshape(1, 4), glb_rows])
    assert torch.equal(out, expected)
    # Spot checks: the second token of grid row g+1 is crop 1 + 1*w + 0 at (1, 1); glb_GN sits right after the grid.
    assert out[(g + 1) * (w * g + 1) + 1].tolist() == [1.0 + w, 1.0, 1.0, 0.0]
    assert out[(h * g) * (w * g + 1)].tolist() == [-2.0] * 4


def test_find_image_runs():
    ids = torch.tensor([1, -1, -1, -1, 1, 5, -2, -2, 7])
    assert find_image_runs(ids) == [(1, 1, 3), (2, 6, 2)]


def test_run_length_mismatch_raises(sd):
    ids = torch.tensor([_image_sample([1, 5], 1, 1, [1, 6])])
    ids_short = torch.cat([ids[:, :3], ids[:, 4:]], dim=1)  # one image token fewer
    with pytest.raises(AssertionError):
        reference_logits(sd, TINY, ids_short, None, _pixels(1), torch.tensor([[336, 336]]))
    # wrong image size for the run length
    with pytest.raises(AssertionError):
        reference_logits(sd, TINY, ids, None, _pixels(1), torch.tensor([[672, 336]]))


def test_image_changes_image_positions_and_later_text(sd):
    ids = torch.tensor([_image_sample([1, 5], 1, 2, [1, 6, 7])])
    sizes = torch.tensor([[336, 672]])
    a = reference_logits(sd, TINY, ids, None, _pixels(1, seed=1), sizes)
    b = reference_logits(sd, TINY, ids, None, _pixels(1, seed=2), sizes)
    assert torch.isfinite(a).all()
    assert torch.equal(a[0, :2], b[0, :2])  # text before the image is unaffected
    assert not torch.allclose(a[0, -1], b[0, -1])
    # padded crops (beyond 1 + h*w) carry no information
    px = _pixels(1, seed=1)
    px[0, 3:] = 123.0
    c = reference_logits(sd, TINY, ids, None, px, sizes)
    assert torch.equal(a, c)


def test_left_padded_batch_equals_single_samples(sd):
    s0 = _image_sample([1, 5], 1, 1, [1, 6, 7, 8]) + _image_sample([1], 1, 1, [1, 9], k=2)
    s1 = [1, 10, 11, 12] + _image_sample([], 2, 1, [1, 13])
    s2 = [1, 3, 4]
    samples = [s0, s1, s2]
    L = max(len(s) for s in samples)
    ids = torch.full((3, L), 0, dtype=torch.long)
    mask = torch.zeros(3, L, dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, L - len(s) :] = torch.tensor(s)
        mask[b, L - len(s) :] = 1
    px = _pixels(3, seed=3)
    sizes = torch.tensor([[336, 336], [336, 336], [672, 336]])
    batch = reference_logits(sd, TINY, ids, mask, px, sizes)

    img = 0
    for b, s in enumerate(samples):
        n_img = len(find_image_runs(torch.tensor(s)))
        alone = reference_logits(
            sd,
            TINY,
            torch.tensor([s]),
            None,
            px[img : img + n_img] if n_img else None,
            sizes[img : img + n_img] if n_img else None,
        )
        img += n_img
        assert torch.allclose(batch[b, L - len(s) :], alone[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(batch[b, : L - len(s)], torch.zeros(L - len(s), TINY["vocab_size"]))

    # right padding gives the same per-sample logits
    ids_r = torch.zeros_like(ids)
    mask_r = torch.zeros_like(mask)
    for b, s in enumerate(samples):
        ids_r[b, : len(s)] = torch.tensor(s)
        mask_r[b, : len(s)] = 1
    batch_r = reference_logits(sd, TINY, ids_r, mask_r, px, sizes)
    for b, s in enumerate(samples):
        assert torch.allclose(batch_r[b, : len(s)], batch[b, L - len(s) :], atol=1e-5, rtol=1e-5)


def test_causality_below_original_max(sd):
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, TINY["vocab_size"], (1, 40), generator=gen)
    full = reference_logits(sd, TINY, ids, None, None, None)
    prefix = reference_logits(sd, TINY, ids[:, :25], None, None, None)
    assert torch.allclose(full[:, :25], prefix, atol=1e-5, rtol=1e-5)


def test_long_factor_switch():
    cfg = copy.deepcopy(TINY)
    cfg["original_max_position_embeddings"] = 16
    cfg["max_position_embeddings"] = 256
    sd = random_state_dict(cfg, seed=5, std=0.1)
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(0, cfg["vocab_size"], (1, 20), generator=gen)
    l16 = reference_logits(sd, cfg, ids[:, :16], None, None, None)  # 16 <= 16: short factors
    l15 = reference_logits(sd, cfg, ids[:, :15], None, None, None)
    l17 = reference_logits(sd, cfg, ids[:, :17], None, None, None)  # 17 > 16: long factors everywhere
    assert torch.allclose(l16[:, :15], l15, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(l17[:, :16], l16, atol=1e-4, rtol=1e-4)
    # Position 0 only attends to itself, and a rotation cancels in q.k at equal positions: it never changes.
    assert torch.allclose(l17[:, 0], l16[:, 0], atol=1e-5, rtol=1e-5)
    # With long factors throughout, 17 and 20 tokens agree on the prefix again.
    l20 = reference_logits(sd, cfg, ids, None, None, None)
    assert torch.allclose(l20[:, :17], l17, atol=1e-5, rtol=1e-5)


def test_reference_loss():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 1, 2, -100, 3], [-100, -100, 4, 5, 6]])
    got = reference_loss(logits, labels)
    terms = []
    for b in range(2):
        for t in range(4):
            y = int(labels[b, t + 1])
            if y != -100:
                terms.append(-torch.log_softmax(logits[b, t], -1)[y])
    assert torch.allclose(got, torch.stack(terms).mean())


def test_random_state_dict_has_published_key_patterns():
    import json
    import re
    from pathlib import Path

    index = Path(__file__).resolve().parents[2] / "shared/fixtures/phi-3.5-vision-instruct/model.safetensors.index.json"
    if not index.exists():
        pytest.skip("fixture not available")
    published = {re.sub(r"\.\d+\.", ".N.", k) for k in json.loads(index.read_text())["weight_map"]}
    ours = {re.sub(r"\.\d+\.", ".N.", k) for k in random_state_dict(TINY, seed=0)}
    assert ours == published
    sd = random_state_dict(TINY, seed=0)
    assert sd[VE + "glb_GN"].shape == (1, 1, 128)
    assert sd[VE + "sub_GN"].shape == (1, 1, 1, 128)


# ----------------------------------------------------------------------------------------------------------------------
# Cross-checks against transformers' own Phi3 / CLIP implementations (only to validate the oracle's math here).
# ----------------------------------------------------------------------------------------------------------------------


def test_text_path_matches_transformers_phi3_longrope():
    transformers = pytest.importorskip("transformers")
    cfg = copy.deepcopy(TINY)
    cfg["original_max_position_embeddings"] = 16
    cfg["max_position_embeddings"] = 256
    sd = random_state_dict(cfg, seed=7, std=0.1)
    hf_cfg = transformers.Phi3Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=96,
        vocab_size=128,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        original_max_position_embeddings=16,
        rope_scaling={"type": "longrope", **{k: cfg["rope_scaling"][k] for k in ("short_factor", "long_factor")}},
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = transformers.Phi3ForCausalLM(hf_cfg).eval()
    text_sd = {k: v for k, v in sd.items() if not k.startswith(VE)}
    missing, unexpected = model.load_state_dict(text_sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    gen = torch.Generator().manual_seed(8)
    for n in (12, 16, 24):
        ids = torch.randint(0, 128, (1, n), generator=gen)
        with torch.no_grad():
            want = model(input_ids=ids).logits
        got = reference_logits(sd, cfg, ids, None, None, None)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), n


def test_clip_features_match_transformers_clip():
    transformers = pytest.importorskip("transformers")
    from oracle import CLIP, clip_features

    vc = TINY["vision_config"]
    sd = random_state_dict(TINY, seed=9, std=0.1)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**{k: vc[k] for k in vc}, num_channels=3)).eval()
    # the state-dict prefix of CLIPVisionModel differs between transformers versions
    prefix = "" if "embeddings.class_embedding" in model.state_dict() else "vision_model."
    clip_sd = {prefix + k[len(CLIP) :]: v for k, v in sd.items() if k.startswith(CLIP)}
    missing, unexpected = model.load_state_dict(clip_sd, strict=False)
    assert not unexpected, unexpected
    assert all("position_ids" in m for m in missing), missing
    px = _pixels(1, n_crops=2, seed=10)[0]
    with torch.no_grad():
        want = model(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
    got = clip_features(sd, TINY, px)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
