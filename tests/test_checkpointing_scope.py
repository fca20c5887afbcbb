"""--checkpointing-scope: selective activation checkpointing recomputes only the chosen layers in backward (CLIP
encoder layers for 'vision', decoder layers for 'language') and leaves loss and gradients unchanged."""

from __future__ import annotations

import pytest
import torch
from answer_batch import answer_batch
from config_helpers import strategy

from phi3v_tune.config import TrainConfig
from phi3v_tune.model.tiny import tiny_model
from phi3v_tune.train.strategies import checkpoint_only


@pytest.fixture(scope="module")
def batch(tiny_processor):
    return answer_batch(tiny_processor, "red circle", image_seed=1, image_hw=(300, 400))


def step(model, inputs, labels) -> tuple[float, dict[str, torch.Tensor], dict[str, int]]:
    """One forward + backward; how often the MLP of the first CLIP layer and of the first decoder layer ran forward
    (counted in `forward` itself: torch's checkpoint recompute does not fire module hooks)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = {"vision": base.model.vision_embed_tokens.img_processor.vision_model.encoder.layers[0].mlp,
              "language": base.model.layers[0].mlp}  # fmt: skip
    calls = dict.fromkeys(layers, 0)

    def counting(key, forward):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return forward(*args, **kwargs)

        return wrapper

    for key, module in layers.items():
        module.forward = counting(key, module.forward)
    try:
        model.train()
        model.zero_grad(set_to_none=True)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
    finally:
        for module in layers.values():
            del module.forward  # back to the class's forward
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, calls


def trained_clip_layers(base) -> int:
    """CLIP encoder layers with a trainable weight: those checkpointing can recompute (the unused last layer, and
    every layer of a frozen tower, never are)."""
    layers = base.model.vision_embed_tokens.img_processor.vision_model.encoder.layers
    return sum(any(p.requires_grad for p in layer.parameters()) for layer in layers)


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("scope", ["vision", "language"])
def test_only_the_chosen_layers_recompute_and_gradients_are_unchanged(tiny_tokenizer, batch, method, scope):
    cfg = TrainConfig(method=method, lora_rank=4, lora_vision=True, gradient_checkpointing=True,
                      checkpointing_scope=scope)  # fmt: skip
    plain = strategy(tiny_model(tiny_tokenizer, seed=3), cfg)
    loss0, grads0, calls0 = step(plain, *batch)
    assert calls0 == {"vision": 1, "language": 1}
    selective = strategy(tiny_model(tiny_tokenizer, seed=3), cfg)
    recomputing = checkpoint_only(selective, scope)
    base = selective.get_base_model() if hasattr(selective, "get_base_model") else selective
    expected = trained_clip_layers(base) if scope == "vision" else len(base.model.layers)
    assert recomputing == expected
    loss1, grads1, calls1 = step(selective, *batch)
    other = "language" if scope == "vision" else "vision"
    assert calls1 == {scope: 2, other: 1}  # forward again in backward for the chosen layers only
    assert loss1 == pytest.approx(loss0, abs=1e-6)
    assert grads1.keys() == grads0.keys() and grads0
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_the_trainer_switch_is_never_used_and_scope_all_leaves_frozen_clip_unwrapped(tiny_tokenizer, monkeypatch):
    """Every --gradient-checkpointing setting goes through checkpoint_only: the Trainer's own switch would also wrap
    the 23 frozen CLIP layers of lora / qlora / freeze-vision, which have nothing to recompute."""
    from phi3v_tune.train.model_setup import Checkpointing, prepare_model
    from phi3v_tune.train.run import lora_settings, training_arguments
    from phi3v_tune.train.runtime import Runtime

    def cfg(**kw):
        return TrainConfig(data="x.jsonl", model="tiny", cpu=True, report_to="none", output_dir="/tmp/x", **kw)

    def on(a) -> bool:
        return bool(getattr(a, "activation_checkpointing", None) or getattr(a, "gradient_checkpointing", None))

    def arguments(c: TrainConfig):
        return training_arguments(c, Runtime.resolve(c, world_size=1))

    for kw in ({}, {"checkpointing_scope": "vision"}, {"checkpointing_layers": 1}):
        assert not on(arguments(cfg(gradient_checkpointing=True, **kw).validate()))
    assert not on(arguments(cfg().validate()))

    built = tiny_model(tiny_tokenizer, seed=3)
    lora = cfg(method="lora", lora_rank=4, gradient_checkpointing=True, compile=False).validate()
    model = prepare_model(
        built,
        Runtime.resolve(lora),
        lora.method,
        lora=lora_settings(lora),
        checkpointing=Checkpointing(lora.gradient_checkpointing, lora.checkpointing_scope, lora.checkpointing_layers),
    )
    base = model.get_base_model()
    clip = base.model.vision_embed_tokens.img_processor.vision_model.encoder.layers
    assert not any(layer.gradient_checkpointing for layer in clip)
    assert all(layer.gradient_checkpointing for layer in base.model.layers)


def test_checkpointing_layers_recomputes_only_the_first_decoder_layers(tiny_tokenizer, batch):
    """--checkpointing-layers 1: decoder layer 0 (and the CLIP layers, scope all) recompute, layer 1 keeps its
    activations; loss and gradients stay those of the run without checkpointing."""
    cfg = TrainConfig(method="full", gradient_checkpointing=True, checkpointing_layers=1)
    plain = strategy(tiny_model(tiny_tokenizer, seed=3), cfg)
    loss0, grads0, _ = step(plain, *batch)
    model = strategy(tiny_model(tiny_tokenizer, seed=3), cfg)
    decoder = model.model.layers
    assert len(decoder) >= 2
    assert checkpoint_only(model, "all", 1) == trained_clip_layers(model) + 1
    assert [layer.gradient_checkpointing for layer in decoder] == [True] + [False] * (len(decoder) - 1)
    calls = dict.fromkeys(range(len(decoder)), 0)

    def counting(i, forward):
        def wrapper(*args, **kwargs):
            calls[i] += 1
            return forward(*args, **kwargs)

        return wrapper

    for i, layer in enumerate(decoder):
        layer.mlp.forward = counting(i, layer.mlp.forward)
    loss1, grads1, _ = step(model, *batch)
    assert calls == {0: 2, **{i: 1 for i in range(1, len(decoder))}}
    assert loss1 == pytest.approx(loss0, abs=1e-6)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert checkpoint_only(model, "language", 0) == 0


def test_checkpointing_layers_needs_checkpointing():
    def cfg(**kw):
        return TrainConfig(data="x.jsonl", model="tiny", cpu=True, report_to="none", output_dir="/tmp/x", **kw)

    with pytest.raises(ValueError, match="needs --gradient-checkpointing"):
        cfg(checkpointing_layers=8).validate()
    with pytest.raises(ValueError, match="scope all or language"):
        cfg(gradient_checkpointing=True, checkpointing_scope="vision", checkpointing_layers=8).validate()
    with pytest.raises(ValueError, match=">= 0"):
        cfg(gradient_checkpointing=True, checkpointing_layers=-1).validate()


@pytest.mark.parametrize(
    "method, lora_vision, clip_trains",
    [("lora", False, False), ("freeze-vision", False, False), ("lora", True, True), ("full", False, True)],
)
def test_checkpointing_records_clip_for_autograd_only_where_clip_weights_train(
    tiny_tokenizer, batch, method, lora_vision, clip_trains
):
    """Turning checkpointing on makes transformers call `enable_input_require_grads`, which hooked the CLIP patch
    embedding too: lora / freeze-vision then ran CLIP's backward (and recompute) every step for no gradient anyone
    reads. Only the token embeddings are hooked now; the gradients are those of transformers' own hooks."""
    from transformers import PreTrainedModel

    cfg = TrainConfig(method=method, lora_rank=4, lora_vision=lora_vision, gradient_checkpointing=True)
    results = []
    for hooks in ("ours", "transformers"):
        model = strategy(tiny_model(tiny_tokenizer, seed=3), cfg)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if hooks == "transformers":
            base.enable_input_require_grads = PreTrainedModel.enable_input_require_grads.__get__(base)
        checkpoint_only(model, "all", 1)  # transformers' checkpointing switch, which installs the hooks
        clip_out: list[bool] = []
        clip_layer = base.model.vision_embed_tokens.img_processor.vision_model.encoder.layers[-2]
        handle = clip_layer.register_forward_hook(lambda m, i, o, seen=clip_out: seen.append(o[0].requires_grad))
        loss, grads, _ = step(model, *batch)
        handle.remove()
        results.append((loss, grads, clip_out[0]))
    (loss, grads, clip_recorded), (loss_t, grads_t, clip_recorded_t) = results
    assert clip_recorded == clip_trains
    assert clip_recorded_t  # transformers' hooks: recorded whether CLIP trains or not
    assert any("vision_embed_tokens" in n for n in grads) == (clip_trains or method == "freeze-vision")
    assert loss == loss_t and grads.keys() == grads_t.keys()
    for name, g in grads_t.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=0, msg=name)


def test_frozen_clip_layers_are_not_wrapped_for_checkpointing(tiny_tokenizer):
    """lora / freeze-vision: CLIP is never recorded for autograd, so scope all checkpoints the decoder layers only
    (the count says so, and no checkpoint wrapper runs per CLIP layer)."""
    for method in ("lora", "freeze-vision"):
        model = strategy(tiny_model(tiny_tokenizer, seed=3), TrainConfig(method=method, lora_rank=4))
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        assert trained_clip_layers(base) == 0
        assert checkpoint_only(model, "all", 1) == 1
        clip = base.model.vision_embed_tokens.img_processor.vision_model.encoder.layers
        assert not any(layer.gradient_checkpointing for layer in clip)
    full = strategy(tiny_model(tiny_tokenizer, seed=3), TrainConfig(method="full"))
    used = len(full.model.vision_embed_tokens.img_processor.vision_model.encoder.layers) - 1  # the last is unused
    assert trained_clip_layers(full) == used and checkpoint_only(full, "vision") == used
