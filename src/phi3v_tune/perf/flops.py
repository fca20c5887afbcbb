"""Model FLOPs of one training sample, per strategy: the numerator of model FLOPs utilisation (MFU).

Counted like `torch.utils.flop_counter` counts (a test checks this on a tiny model): matmuls, convolutions and
attention (QK^T and AV over the full, not causally halved, score matrix; backward = 2x forward). Elementwise work is
not counted. Backward work is counted only where autograd has to do it, so the count differs per strategy:

* a weight that trains costs forward + input gradient (if its input needs one) + weight gradient;
* a frozen weight costs forward + input gradient only where something below it trains;
* nothing is counted twice for activation checkpointing (recomputation is not model work).

What is counted is the work the maths needs: CLIP on real crops and its layers up to the feature layer, and the
output projection (`lm_head`) only at positions that carry a label. A build that does more (CLIP on padding crops,
the unused 24th layer, logits for every position) does the same model FLOPs in more time: lower MFU.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.configuration import Phi3VConfig

# which parts train, per strategy: (clip, projector, lm, lora)
_TRAINS = {
    "full": (True, True, True, False),
    "freeze-vision": (False, True, True, False),
    "lora": (False, False, False, True),
    "qlora": (False, False, False, True),
}


@dataclass(frozen=True)
class SampleShape:
    """What one sample costs: LM length, real CLIP crops, image tokens fed to the projector, label positions."""

    tokens: int
    crops: int
    image_tokens: int
    label_tokens: int


def _linear(tokens: int, n_in: int, n_out: int) -> int:
    return 2 * tokens * n_in * n_out


def _train(fwd: int, weight_trains: bool, input_needs_grad: bool) -> int:
    """forward + weight gradient + input gradient, each the cost of the forward matmul."""
    return fwd * (1 + int(weight_trains) + int(input_needs_grad))


def clip_flops(cfg: Phi3VConfig, crops: int, trains: bool) -> int:
    """CLIP on `crops` real crops, layers up to the feature layer; backward only when it trains."""
    v = cfg.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    seq = patches + 1
    layers = cfg.num_vision_layers_used
    conv = _linear(patches, 3 * v.patch_size**2, v.hidden_size)
    linears = _linear(seq, v.hidden_size, 4 * v.hidden_size) + 2 * _linear(seq, v.hidden_size, v.intermediate_size)
    attention = 4 * seq * seq * v.hidden_size
    if not trains:
        return crops * (conv + layers * (linears + attention))
    # pixels need no gradient: the patch convolution has only its weight gradient; every layer's input has one
    return crops * (2 * conv + layers * (3 * linears + 3 * attention))


def projector_flops(cfg: Phi3VConfig, image_tokens: int, trains: bool) -> int:
    """The 2-layer MLP. When it trains, so do the separators concatenated into its input: that input needs a
    gradient too (even with CLIP frozen)."""
    first = _linear(image_tokens, 4 * cfg.vision_config.hidden_size, cfg.hidden_size)
    second = _linear(image_tokens, cfg.hidden_size, cfg.hidden_size)
    if not trains:
        return first + second
    return _train(first, True, True) + _train(second, True, True)


def lm_flops(cfg: Phi3VConfig, tokens: list[int], label_tokens: int, trains: bool, lora_rank: int | None) -> int:
    """Decoder layers + lm_head. `tokens` = per-sample lengths (attention is per sample: packed or padded rows
    cost the same model FLOPs). `lora_rank` set: frozen base with LoRA on qkv/o/gate_up/down and lm_head."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q_dim, kv_dim = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    n = sum(tokens)
    # (in, out, input needs a gradient in layer 0): with LoRA only layer 0's qkv reads the frozen embeddings alone;
    # gate_up already reads the residual plus an attention output that depends on adapters
    mats = [(d, q_dim + 2 * kv_dim, False), (q_dim, d, True), (d, 2 * f, True), (f, d, True)]
    attention_fwd = sum(4 * t * t * q_dim for t in tokens)
    total = 0
    for layer in range(cfg.num_hidden_layers):
        for n_in, n_out, grad_in_layer0 in mats:
            fwd = _linear(n, n_in, n_out)
            if lora_rank is None:
                total += _train(fwd, trains, True)  # full: the embeddings train, so every input has a gradient
            else:
                needs = layer > 0 or grad_in_layer0
                total += _train(fwd, False, needs)
                total += _train(_linear(n, n_in, lora_rank), True, needs)
                total += _train(_linear(n, lora_rank, n_out), True, True)
        total += attention_fwd * (3 if (trains or lora_rank is not None) else 1)
    head = _linear(label_tokens, d, cfg.vocab_size)
    if lora_rank is None:
        total += _train(head, trains, True)
    else:
        total += _train(head, False, True)
        total += _train(_linear(label_tokens, d, lora_rank), True, True)
        total += _train(_linear(label_tokens, lora_rank, cfg.vocab_size), True, True)
    return total


def training_flops(cfg: Phi3VConfig, samples: list[SampleShape], method: str, lora_rank: int = 64) -> int:
    """Model FLOPs of one optimizer step over `samples` (forward + backward) for `method`."""
    if method not in _TRAINS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(_TRAINS)}")
    clip_trains, proj_trains, lm_trains, lora = _TRAINS[method]
    total = sum(clip_flops(cfg, s.crops, clip_trains) for s in samples)
    total += sum(projector_flops(cfg, s.image_tokens, proj_trains) for s in samples)
    total += lm_flops(
        cfg, [s.tokens for s in samples], sum(s.label_tokens for s in samples), lm_trains, lora_rank if lora else None
    )
    return total
