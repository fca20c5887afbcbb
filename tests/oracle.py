"""Independent float32 reference ("oracle") of the Phi-3.5-vision forward pass.

Written directly from the math in ``REFERENCE.md`` (sections 1-4) with plain ``torch`` tensors and
``torch.nn.functional`` ops only: no model classes, no shared code with the package under test. It favours clarity
over speed (explicit loops over samples, images, crops and layers), and is meant only to check the real model on tiny
random configurations.

Semantics of a batch: each sample is computed on its own, on the tokens where ``attention_mask == 1`` (positions
``0..n-1`` for that sample, wherever the padding is), and its logits are written back at those positions; padded
positions get logits 0.  So a batch is, by definition, the same as running every sample alone with batch size 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LM = "model."
VE = "model.vision_embed_tokens."
CLIP = VE + "img_processor.vision_model."

# CLIP ViT-L/14 at 336 px, used when the config carries no ``vision_config``.
DEFAULT_VISION_CONFIG = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu",
}


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers on the config
# ----------------------------------------------------------------------------------------------------------------------


def vision_config_of(config: dict) -> dict:
    """The CLIP sizes: ``config['vision_config']`` merged over the ViT-L/14-336 defaults."""
    vc = dict(DEFAULT_VISION_CONFIG)
    vc.update(config.get("vision_config") or {})
    return vc


def merged_grid_side(config: dict) -> int:
    """Side of the per-crop token grid after the 2x2 merge (12 for 336 px / 14 px patches)."""
    vc = vision_config_of(config)
    patches_per_side = vc["image_size"] // vc["patch_size"]
    assert patches_per_side % 2 == 0, "the 2x2 merge needs an even number of patches per side"
    return patches_per_side // 2


def num_image_tokens(h: int, w: int, config: dict | None = None) -> int:
    """Tokens of one image whose padded size is (h*crop) x (w*crop) pixels.

    ``(h*w + 1) * g*g + 1 + (h + 1) * g`` with ``g`` = merged grid side (12 for the published model), i.e.
    ``(h*w + 1)*144 + 1 + (h + 1)*12``.
    """
    g = merged_grid_side(config or {})
    # sub-crop grid with one sub_GN per row, + glb_GN, + global view with one sub_GN per row
    return (h * g) * (w * g + 1) + 1 + g * (g + 1)


def rope_scaling_factor(max_position_embeddings: int, original_max_position_embeddings: int) -> float:
    """Multiplier applied to cos/sin by su/longrope: sqrt(1 + ln(max/orig) / ln(orig)), or 1 if max/orig <= 1."""
    scale = max_position_embeddings / original_max_position_embeddings
    if scale <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(scale) / math.log(original_max_position_embeddings))


# ----------------------------------------------------------------------------------------------------------------------
# Vision tower (CLIP) and the HD transform
# ----------------------------------------------------------------------------------------------------------------------


def _layer_norm(x, sd, prefix, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _linear(x, sd, prefix, bias=True):
    return F.linear(x, sd[prefix + ".weight"], sd[prefix + ".bias"] if bias else None)


def clip_features(sd: dict, config: dict, crops: torch.Tensor) -> torch.Tensor:
    """CLIP features of ``crops`` (n, 3, S, S) -> (n, patches, C), CLS dropped, taken at ``img_processor.layer_idx``."""
    vc = vision_config_of(config)
    C = vc["hidden_size"]
    heads = vc["num_attention_heads"]
    head_dim = C // heads
    eps = vc["layer_norm_eps"]
    num_layers = vc["num_hidden_layers"]
    assert vc.get("hidden_act", "quick_gelu") == "quick_gelu"

    # Embeddings: conv patches (no bias), prepend class embedding, add position embeddings, pre-LN.
    patches = F.conv2d(crops, sd[CLIP + "embeddings.patch_embedding.weight"], stride=vc["patch_size"])  # (n, C, g, g)
    n = patches.shape[0]
    patches = patches.flatten(2).transpose(1, 2)  # (n, g*g, C), row-major over the patch grid
    cls = sd[CLIP + "embeddings.class_embedding"].reshape(1, 1, C).expand(n, 1, C)
    x = torch.cat([cls, patches], dim=1)
    x = x + sd[CLIP + "embeddings.position_embedding.weight"][None, : x.shape[1]]
    assert sd[CLIP + "embeddings.position_embedding.weight"].shape[0] == x.shape[1]
    x = _layer_norm(x, sd, CLIP + "pre_layrnorm", eps)  # this is hidden_states[0]

    # hidden_states has num_layers + 1 entries; entry i is the output after running i encoder layers.
    layer_idx = config.get("img_processor", {}).get("layer_idx", -2)
    layers_to_run = layer_idx if layer_idx >= 0 else num_layers + 1 + layer_idx
    assert 0 <= layers_to_run <= num_layers

    for j in range(layers_to_run):
        p = CLIP + f"encoder.layers.{j}."
        # self-attention block (pre-LN), no mask
        h = _layer_norm(x, sd, p + "layer_norm1", eps)
        q = _linear(h, sd, p + "self_attn.q_proj")
        k = _linear(h, sd, p + "self_attn.k_proj")
        v = _linear(h, sd, p + "self_attn.v_proj")
        T = h.shape[1]
        q = q.view(n, T, heads, head_dim).transpose(1, 2)
        k = k.view(n, T, heads, head_dim).transpose(1, 2)
        v = v.view(n, T, heads, head_dim).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) * head_dim**-0.5
        attn = torch.softmax(scores, dim=-1) @ v  # (n, heads, T, head_dim)
        attn = attn.transpose(1, 2).reshape(n, T, C)
        x = x + _linear(attn, sd, p + "self_attn.out_proj")
        # MLP block (pre-LN) with quick_gelu
        h = _layer_norm(x, sd, p + "layer_norm2", eps)
        h = _linear(h, sd, p + "mlp.fc1")
        h = h * torch.sigmoid(1.702 * h)
        x = x + _linear(h, sd, p + "mlp.fc2")

    return x[:, 1:]  # drop CLS


def merge_2x2(features: torch.Tensor, side: int) -> torch.Tensor:
    """One crop's (side*side, C) features -> (side/2, side/2, 4C); cell (i, j) = concat of (2i,2j), (2i,2j+1),
    (2i+1,2j), (2i+1,2j+1), i.e. channel order (dy, dx) = 00, 01, 10, 11."""
    C = features.shape[-1]
    grid = features.reshape(side, side, C)
    half = side // 2
    out = torch.empty(half, half, 4 * C, dtype=features.dtype)
    for i in range(half):
        for j in range(half):
            out[i, j] = torch.cat(
                [grid[2 * i, 2 * j], grid[2 * i, 2 * j + 1], grid[2 * i + 1, 2 * j], grid[2 * i + 1, 2 * j + 1]]
            )
    return out


def hd_merge(merged: list[torch.Tensor], h: int, w: int, sub_gn: torch.Tensor, glb_gn: torch.Tensor) -> torch.Tensor:
    """Lay out one image's merged crops (``merged[0]`` = global view, ``merged[1..h*w]`` = sub-crops row-major, each
    (g, g, 4C)) as the "sub_glb" token sequence -> (num_image_tokens, 4C)."""
    g = merged[0].shape[0]
    C4 = merged[0].shape[-1]
    sub_gn = sub_gn.reshape(C4)
    glb_gn = glb_gn.reshape(C4)
    tokens = []
    # Sub-crops tiled row-major into an (h*g) x (w*g) grid, sub_GN at the end of every grid row.
    for row in range(h * g):
        crop_row, i = divmod(row, g)
        for col in range(w * g):
            crop_col, j = divmod(col, g)
            tokens.append(merged[1 + crop_row * w + crop_col][i, j])
        tokens.append(sub_gn)
    # One glb_GN.
    tokens.append(glb_gn)
    # Global view: g rows of g tokens, each followed by sub_GN.
    for i in range(g):
        for j in range(g):
            tokens.append(merged[0][i, j])
        tokens.append(sub_gn)
    return torch.stack(tokens)


def image_tokens(sd: dict, config: dict, crops: torch.Tensor, image_size: torch.Tensor) -> torch.Tensor:
    """All projected tokens of one image: crops (N+1, 3, S, S), image_size [H, W] -> (num_image_tokens, hidden)."""
    vc = vision_config_of(config)
    S = vc["image_size"]
    side = S // vc["patch_size"]
    H, W = int(image_size[0]), int(image_size[1])
    assert H % S == 0 and W % S == 0, f"image size {H}x{W} is not a multiple of {S}"
    h, w = H // S, W // S
    assert crops.shape[0] >= 1 + h * w, "not enough crops for the image size"

    feats = clip_features(sd, config, crops[: 1 + h * w])  # only the global view and the real sub-crops
    merged = [merge_2x2(feats[c], side) for c in range(1 + h * w)]  # each (g, g, 4C)
    x = hd_merge(merged, h, w, sd[VE + "sub_GN"], sd[VE + "glb_GN"])
    assert x.shape[0] == num_image_tokens(h, w, config)

    # Projection: Linear -> exact GELU -> Linear.
    x = _linear(x, sd, VE + "img_projection.0")
    x = F.gelu(x)
    x = _linear(x, sd, VE + "img_projection.2")
    return x


def find_image_runs(ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs of one negative id in a 1-D id tensor: list of (image_number k, start, length)."""
    runs = []
    t = 0
    n = ids.shape[0]
    while t < n:
        v = int(ids[t])
        if v < 0:
            start = t
            while t < n and int(ids[t]) == v:
                t += 1
            runs.append((-v, start, t - start))
        else:
            t += 1
    return runs


# ----------------------------------------------------------------------------------------------------------------------
# Phi-3 decoder
# ----------------------------------------------------------------------------------------------------------------------


def _rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope_cos_sin(config: dict, n: int, total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """su/longrope cos and sin for positions 0..n-1 -> each (n, head_dim); the factor set is chosen from the total
    key length `total` (default n: the sequence alone)."""
    total = n if total is None else total
    d = config["hidden_size"] // config["num_attention_heads"]
    theta = float(config.get("rope_theta", 10000.0))
    orig = config.get("original_max_position_embeddings")
    rs = config.get("rope_scaling")
    if rs is not None:
        assert rs.get("type", rs.get("rope_type")) in ("su", "longrope"), rs
        factors = rs["long_factor"] if total > orig else rs["short_factor"]
        factors = torch.tensor(factors, dtype=torch.float32)
        assert factors.shape[0] == d // 2
        scaling = rope_scaling_factor(config["max_position_embeddings"], orig)
    else:
        factors = torch.ones(d // 2)
        scaling = 1.0
    exponent = torch.arange(0, d, 2, dtype=torch.float32) / d  # 2i/d
    inv_freq = 1.0 / (factors * theta**exponent)
    pos = torch.arange(n, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]  # (n, d/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (n, d)
    return emb.cos() * scaling, emb.sin() * scaling


def decoder_logits(sd: dict, config: dict, x: torch.Tensor, rope_total: int | None = None) -> torch.Tensor:
    """One sample's input embeddings (n, hidden) -> logits (n, vocab); `rope_total`: see `rope_cos_sin`."""
    n, D = x.shape
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    d = D // heads
    eps = config["rms_norm_eps"]
    cos, sin = rope_cos_sin(config, n, rope_total)
    causal = torch.ones(n, n, dtype=torch.bool).tril()

    for i in range(config["num_hidden_layers"]):
        p = LM + f"layers.{i}."
        h = _rms_norm(x, sd[p + "input_layernorm.weight"], eps)
        qkv = F.linear(h, sd[p + "self_attn.qkv_proj.weight"])
        q = qkv[:, : heads * d]
        k = qkv[:, heads * d : (heads + kv_heads) * d]
        v = qkv[:, (heads + kv_heads) * d :]
        assert v.shape[1] == kv_heads * d
        q = q.view(n, heads, d).transpose(0, 1)  # (heads, n, d)
        k = k.view(n, kv_heads, d).transpose(0, 1)
        v = v.view(n, kv_heads, d).transpose(0, 1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # grouped-query attention: query head hh uses kv head hh // (heads / kv_heads)
        group = heads // kv_heads
        k = k.repeat_interleave(group, dim=0)
        v = v.repeat_interleave(group, dim=0)
        scores = (q @ k.transpose(-1, -2)) * d**-0.5
        scores = scores.masked_fill(~causal, float("-inf"))
        attn = torch.softmax(scores, dim=-1) @ v  # (heads, n, d)
        attn = attn.transpose(0, 1).reshape(n, heads * d)
        x = x + F.linear(attn, sd[p + "self_attn.o_proj.weight"])

        h = _rms_norm(x, sd[p + "post_attention_layernorm.weight"], eps)
        gate_up = F.linear(h, sd[p + "mlp.gate_up_proj.weight"])
        inter = gate_up.shape[1] // 2
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        x = x + F.linear(up * F.silu(gate), sd[p + "mlp.down_proj.weight"])

    x = _rms_norm(x, sd[LM + "norm.weight"], eps)
    return F.linear(x, sd["lm_head.weight"])


# ----------------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_logits(
    state_dict: dict[str, torch.Tensor],
    config: dict,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    image_sizes: torch.Tensor | None,
    per_sample_rope: bool = True,
) -> torch.Tensor:
    """Float32 logits (B, L, vocab) of the Phi-3.5-vision forward pass; padded positions get 0.

    `per_sample_rope=False`: the su-RoPE factor set of every sample is chosen from the padded length L (the published
    model's rule for a padded batch: one set per forward pass from its key length); True: from each sample's own
    length (the batch computes what each sample computes alone)."""
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in state_dict.items() if torch.is_floating_point(v)}
    input_ids = input_ids.detach().cpu().long()
    B, L = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, L, dtype=torch.long)
    attention_mask = attention_mask.detach().cpu()
    if pixel_values is not None:
        pixel_values = pixel_values.detach().cpu().float()
        image_sizes = image_sizes.detach().cpu().long()
    vocab = sd["lm_head.weight"].shape[0]
    out = torch.zeros(B, L, vocab, dtype=torch.float32)

    next_image = 0  # index into pixel_values: images are ordered as they appear across the batch
    for b in range(B):
        keep = (attention_mask[b] != 0).nonzero().flatten()
        if keep.numel() == 0:
            continue
        ids = input_ids[b, keep]
        x = sd[LM + "embed_tokens.weight"][ids.clamp(min=0)]  # image rows are overwritten below

        for number, (k, start, length) in enumerate(find_image_runs(ids), start=1):
            assert k == number, f"sample {b}: image run {number} has id {-k}, expected {-number}"
            assert pixel_values is not None and next_image < pixel_values.shape[0], "not enough images"
            tokens = image_tokens(sd, config, pixel_values[next_image], image_sizes[next_image])
            assert tokens.shape[0] == length, (
                f"sample {b}: image {k} has {length} positions but its size {image_sizes[next_image].tolist()} "
                f"gives {tokens.shape[0]} tokens"
            )
            x[start : start + length] = tokens
            next_image += 1

        out[b, keep] = decoder_logits(sd, config, x, None if per_sample_rope else L)

    n_images = 0 if pixel_values is None else pixel_values.shape[0]
    assert next_image == n_images, f"{n_images} images given, {next_image} used"
    return out


def reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Shifted cross entropy: logits[:, :-1] predict labels[:, 1:]; mean over labels != -100."""
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    target = labels[:, 1:].reshape(-1).to(pred.device)
    valid = target != -100
    return F.cross_entropy(pred[valid], target[valid], reduction="sum") / valid.sum()


# ----------------------------------------------------------------------------------------------------------------------
# Random weights for tests
# ----------------------------------------------------------------------------------------------------------------------


def random_state_dict(config: dict, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Every published key for ``config``, float32: weights/biases ~ N(0, std), norm weights ~ 1 + N(0, std)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen) * std

    def ones(*shape):
        return 1.0 + torch.randn(*shape, generator=gen) * std

    D = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    d = D // heads
    inter = config["intermediate_size"]
    vocab = config["vocab_size"]
    sd = {LM + "embed_tokens.weight": rnd(vocab, D)}
    for i in range(config["num_hidden_layers"]):
        p = LM + f"layers.{i}."
        sd[p + "input_layernorm.weight"] = ones(D)
        sd[p + "self_attn.qkv_proj.weight"] = rnd((heads + 2 * kv_heads) * d, D)
        sd[p + "self_attn.o_proj.weight"] = rnd(D, heads * d)
        sd[p + "post_attention_layernorm.weight"] = ones(D)
        sd[p + "mlp.gate_up_proj.weight"] = rnd(2 * inter, D)
        sd[p + "mlp.down_proj.weight"] = rnd(D, inter)
    sd[LM + "norm.weight"] = ones(D)
    sd["lm_head.weight"] = rnd(vocab, D)

    vc = vision_config_of(config)
    C = vc["hidden_size"]
    CI = vc["intermediate_size"]
    ps = vc["patch_size"]
    positions = (vc["image_size"] // ps) ** 2 + 1
    sd[CLIP + "embeddings.class_embedding"] = rnd(C)
    sd[CLIP + "embeddings.patch_embedding.weight"] = rnd(C, 3, ps, ps)
    sd[CLIP + "embeddings.position_embedding.weight"] = rnd(positions, C)
    sd[CLIP + "pre_layrnorm.weight"] = ones(C)
    sd[CLIP + "pre_layrnorm.bias"] = rnd(C)
    for j in range(vc["num_hidden_layers"]):
        p = CLIP + f"encoder.layers.{j}."
        for ln in ("layer_norm1", "layer_norm2"):
            sd[p + ln + ".weight"] = ones(C)
            sd[p + ln + ".bias"] = rnd(C)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{proj}.weight"] = rnd(C, C)
            sd[p + f"self_attn.{proj}.bias"] = rnd(C)
        sd[p + "mlp.fc1.weight"] = rnd(CI, C)
        sd[p + "mlp.fc1.bias"] = rnd(CI)
        sd[p + "mlp.fc2.weight"] = rnd(C, CI)
        sd[p + "mlp.fc2.bias"] = rnd(C)
    sd[CLIP + "post_layernorm.weight"] = ones(C)
    sd[CLIP + "post_layernorm.bias"] = rnd(C)
    sd[VE + "img_projection.0.weight"] = rnd(D, 4 * C)
    sd[VE + "img_projection.0.bias"] = rnd(D)
    sd[VE + "img_projection.2.weight"] = rnd(D, D)
    sd[VE + "img_projection.2.bias"] = rnd(D)
    sd[VE + "glb_GN"] = rnd(1, 1, 4 * C)
    sd[VE + "sub_GN"] = rnd(1, 1, 1, 4 * C)
    return sd
