"""The native model computes the published math: logits against an independent float32 oracle (tests/oracle.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle import reference_logits, reference_loss
from PIL import Image

from phi3v_tune.model.modeling import rope_per_sample
from phi3v_tune.model.tiny import tiny_model

TOL = 1e-4


def rand_image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def chat(processor, text: str) -> str:
    return processor.apply_chat_template([{"role": "user", "content": text}])


def rel_err(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.bool()
    return float((a[m] - b[m]).norm() / b[m].norm())


def check_against_oracle(model, inputs, per_sample: bool = False) -> torch.Tensor:
    """`per_sample`: under `rope_per_sample` (our training and evaluation); else the published one-set-per-pass rule."""
    with torch.no_grad(), rope_per_sample(model, per_sample):
        logits = model(**inputs).logits
    ref = reference_logits(
        model.state_dict(),
        model.config.to_dict(),
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs.get("pixel_values"),
        inputs.get("image_sizes"),
        per_sample_rope=per_sample,
    )
    assert rel_err(logits, ref, inputs["attention_mask"]) < TOL
    return logits


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return tiny_model(tiny_tokenizer, seed=1)


def test_single_image_matches_oracle(model, tiny_processor):
    inputs = tiny_processor(text=chat(tiny_processor, "<|image_1|>\nWhat is shown?"), images=[rand_image(500, 300, 0)])
    assert inputs["pixel_values"].shape == (1, 5, 3, 336, 336)
    check_against_oracle(model, inputs)


def test_several_images_per_prompt_match_oracle(model, tiny_processor):
    text = chat(tiny_processor, "<|image_1|><|image_2|>\nCompare the two images.")
    inputs = tiny_processor(text=text, images=[rand_image(200, 640, 1), rand_image(700, 350, 2)])
    assert (inputs["input_ids"] == -1).sum() > 0 and (inputs["input_ids"] == -2).sum() > 0
    check_against_oracle(model, inputs)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_of_prompts_matches_each_prompt_alone(model, tiny_processor, side):
    texts = [
        chat(tiny_processor, "<|image_1|>\nWhat colour?"),
        chat(tiny_processor, "No image here, just text."),
        chat(tiny_processor, "<|image_1|>\n<|image_2|>\nWhich one is larger?"),
    ]
    images = [[rand_image(336, 336, 3)], [], [rand_image(400, 900, 4), rand_image(1000, 500, 5)]]
    batch = tiny_processor(text=texts, images=images, padding=True, padding_side=side)
    logits = check_against_oracle(model, batch)
    for b, (t, imgs) in enumerate(zip(texts, images)):
        alone = tiny_processor(text=t, images=imgs or None)
        with torch.no_grad():
            single = model(**alone).logits[0]
        got = logits[b][batch["attention_mask"][b].bool()]
        assert float((got - single).norm() / single.norm()) < TOL


def test_text_only_matches_oracle(model, tiny_processor):
    inputs = tiny_processor(text=chat(tiny_processor, "Describe the picture in one word."))
    assert "pixel_values" not in inputs
    check_against_oracle(model, inputs)


def test_su_rope_one_set_per_pass_or_per_sample(tiny_tokenizer, tiny_processor):
    """Published rule: one factor set per forward pass from the padded length (the short row of a batch padded past
    `original_max_position_embeddings` takes the long set); under `rope_per_sample` each sample uses its own."""
    small = tiny_model(tiny_tokenizer, seed=2, original_max_position_embeddings=24)
    short = tiny_processor(text=chat(tiny_processor, "up"))  # well under 24 tokens
    long = tiny_processor(text=chat(tiny_processor, "The quick brown fox jumps over the lazy dog. " * 3))
    assert short["input_ids"].shape[1] <= 24 < long["input_ids"].shape[1]
    batch = tiny_processor(
        text=[chat(tiny_processor, "up"), chat(tiny_processor, "The quick brown fox jumps over the lazy dog. " * 3)],
        padding=True,
        padding_side="left",
    )
    for inputs in (short, long, batch):
        check_against_oracle(small, inputs)
        check_against_oracle(small, inputs, per_sample=True)
    published = check_against_oracle(small, batch)
    own = check_against_oracle(small, batch, per_sample=True)
    row = batch["attention_mask"][0].bool()  # the short row: long factors by the published rule, short on its own
    assert not torch.allclose(published[0][row], own[0][row], atol=1e-4)
    with torch.no_grad():
        alone = small(**short).logits[0]
    torch.testing.assert_close(own[0][row], alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(published[1], own[1], rtol=1e-4, atol=1e-5)  # the long row: long either way
    # a prefix's logits depend on the total length once it exceeds the switch point (published behaviour)
    n = short["input_ids"].shape[1]
    with torch.no_grad():
        prefix = small(**tiny_processor(text=chat(tiny_processor, "The quick brown fox"))).logits
        whole = small(**long).logits
    m = prefix.shape[1]
    assert not torch.allclose(prefix[0, 1:], whole[0, 1:m], atol=1e-5)
    assert n <= 24


def test_image_batch_crossing_switch_matches_oracle(tiny_tokenizer, tiny_processor):
    """One sample with an image crosses a small switch length, the other stays below it."""
    model = tiny_model(tiny_tokenizer, seed=3, original_max_position_embeddings=600)
    texts = [chat(tiny_processor, "<|image_1|>\nWhat is it?"), chat(tiny_processor, "<|image_1|>\nWhat?")]
    images = [[rand_image(300, 300, 6)], [rand_image(672, 336, 7)]]  # 2x2 crops (757 tokens) vs 2x1 (457)
    batch = tiny_processor(text=texts, images=images, padding=True, padding_side="right")
    lengths = batch["attention_mask"].sum(-1).tolist()
    assert lengths[0] > 600 > lengths[1]
    check_against_oracle(model, batch)
    check_against_oracle(model, batch, per_sample=True)


def test_loss_is_shifted_cross_entropy_ignoring_minus_100(model, tiny_processor):
    inputs = tiny_processor(
        text=chat(tiny_processor, "<|image_1|>\nWhat?") + "red<|end|>\n<|endoftext|>", images=[rand_image(320, 240, 8)]
    )
    labels = inputs["input_ids"].clone()
    labels[labels < 0] = -100
    labels[:, : labels.shape[1] - 5] = -100
    model.eval()
    with torch.no_grad():
        out = model(**inputs, labels=labels)
        logits = model(**inputs).logits
        lean = model(**inputs, labels=labels, return_logits=False)  # what training asks for (model/loss.py)
    # as the published model: with labels, float32 logits come back too (in eval mode; training never reads them)
    assert out.logits.dtype == torch.float32 and torch.equal(out.logits, logits)
    assert lean.logits is None and float(lean.loss) == float(out.loss)
    model.train()
    with torch.no_grad():
        assert model(**inputs, labels=labels).logits is None
    model.eval()
    ref = reference_loss(logits.float(), labels)
    manual = torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100)
    assert abs(float(out.loss) - float(ref)) < 1e-5
    assert abs(float(out.loss) - float(manual)) < 1e-5


def test_zero_padding_crops_never_reach_clip(model, tiny_processor, monkeypatch):
    tower = model.model.vision_embed_tokens
    seen = []
    original = tower.clip_features
    monkeypatch.setattr(tower, "clip_features", lambda crops: seen.append(crops.shape[0]) or original(crops))
    inputs = tiny_processor(text=chat(tiny_processor, "<|image_1|>\nHi"), images=[rand_image(672, 336, 9)])
    assert inputs["pixel_values"].shape[1] == 5  # num_crops 4 -> 5 slots
    with torch.no_grad():
        model(**inputs)
    assert seen == [3]  # global view + a 2x1 grid of crops; the 2 padding slots are skipped


def test_unused_clip_layers_never_run_and_never_train(model, tiny_processor):
    vm = model.model.vision_embed_tokens.img_processor.vision_model
    calls = []
    hooks = [
        vm.post_layernorm.register_forward_hook(lambda *a: calls.append("post")),
        vm.encoder.layers[-1].register_forward_hook(lambda *a: calls.append("last")),
    ]
    try:
        inputs = tiny_processor(text=chat(tiny_processor, "<|image_1|>\nHi"), images=[rand_image(336, 336, 10)])
        model(**inputs).logits.sum().backward()
    finally:
        for h in hooks:
            h.remove()
    assert calls == []
    unused = {id(p) for p in model.unused_parameters()}
    assert len(unused) == len(list(vm.post_layernorm.parameters())) + len(list(vm.encoder.layers[-1].parameters()))
    for p in model.parameters():
        if id(p) in unused:
            assert not p.requires_grad and p.grad is None
        elif p.requires_grad:
            assert p.grad is not None  # every trainable weight gets a gradient: DDP needs no unused-parameter search
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attention_implementations_agree(tiny_tokenizer, tiny_processor, impl):
    model = tiny_model(tiny_tokenizer, seed=4)
    model.set_attn_implementation(impl)
    assert model.config._attn_implementation == impl
    assert model.model.vision_embed_tokens.img_processor.vision_model.config._attn_implementation == impl
    inputs = tiny_processor(text=chat(tiny_processor, "<|image_1|>\nHi"), images=[rand_image(400, 300, 11)])
    check_against_oracle(model, inputs)


@pytest.mark.parametrize("switch", [24, 4096])
def test_rows_without_mask_match_the_oracle_on_both_sides_of_the_switch(tiny_tokenizer, tiny_processor, switch):
    """Unpadded training batches carry no attention_mask: the factor set is then chosen on the host, same numbers."""
    small = tiny_model(tiny_tokenizer, seed=2, original_max_position_embeddings=switch)
    inputs = tiny_processor(text=chat(tiny_processor, "The quick brown fox jumps over the lazy dog. " * 3))
    assert (inputs["input_ids"].shape[1] > switch) == (switch == 24)  # long factors at 24, short at 4096
    with torch.no_grad():
        logits = small(input_ids=inputs["input_ids"]).logits
    ref = reference_logits(
        small.state_dict(), small.config.to_dict(), inputs["input_ids"], inputs["attention_mask"], None, None
    )
    assert rel_err(logits, ref, inputs["attention_mask"]) < TOL


def test_host_side_image_token_count_gives_the_same_loss_and_is_checked(model, tiny_processor):
    inputs = tiny_processor(
        text=chat(tiny_processor, "<|image_1|>\nWhat is it?"), images=[rand_image(500, 300, 8)], return_tensors="pt"
    )
    labels = inputs["input_ids"].clamp(min=0)
    count = int((inputs["input_ids"] < 0).sum())
    with torch.no_grad():
        plain = model(**inputs, labels=labels)
        hinted = model(**inputs, labels=labels, image_token_count=count)
        assert plain.loss.item() == hinted.loss.item()
        listed = model(**{**inputs, "image_sizes": inputs["image_sizes"].tolist()}, labels=labels)  # as in training
        assert plain.loss.item() == listed.loss.item()
        with pytest.raises(ValueError, match=f"input_ids hold {count + 1} image positions"):
            model(**inputs, labels=labels, image_token_count=count + 1)


def test_loss_path_builds_no_kv_cache(model, tiny_processor):
    """Training and evaluation losses never need a cache; building one per step only costs time."""
    inputs = tiny_processor(text=chat(tiny_processor, "up"), return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"])
        assert out.past_key_values is None
        assert model(**inputs).past_key_values is not None  # generation-style calls still get one


def test_rope_frequencies_survive_a_whole_model_cast(tiny_tokenizer):
    """`model.bfloat16()` (DeepSpeed's engine casts the whole module) must not round the su-RoPE frequencies: cos/sin
    stay those of the fp32 model, rounded once to the activation dtype."""
    fp32 = tiny_model(tiny_tokenizer, seed=2, original_max_position_embeddings=24)
    rotary32 = fp32.model.rotary_emb
    rotary16 = tiny_model(tiny_tokenizer, seed=2, original_max_position_embeddings=24).bfloat16().model.rotary_emb
    assert rotary16.short_inv_freq.dtype == rotary16.long_inv_freq.dtype == torch.float32
    assert torch.equal(rotary16.short_inv_freq, rotary32.short_inv_freq)
    assert torch.equal(rotary16.long_inv_freq, rotary32.long_inv_freq)
    x = torch.zeros(1, dtype=torch.bfloat16)
    positions = torch.arange(4000)[None]
    for use_long in (False, True):
        rotary32.use_long = rotary16.use_long = use_long
        for a, b in zip(rotary16(x, positions), rotary32(x, positions)):
            assert torch.equal(a, b)
    rotary32.use_long = rotary16.use_long = None


def test_base_model_per_sample_on_a_padded_batch(tiny_tokenizer, tiny_processor):
    """`model.model(...)` on a padded batch under `rope_per_sample`: each row's hidden states as computed alone."""
    small = tiny_model(tiny_tokenizer, seed=2, original_max_position_embeddings=24).eval()
    texts = [chat(tiny_processor, "up"), chat(tiny_processor, "The quick brown fox jumps over the lazy dog. " * 3)]
    batch = tiny_processor(text=texts, padding=True, padding_side="right")
    with torch.no_grad(), rope_per_sample(small):
        hidden = small.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        alone = small.model(input_ids=tiny_processor(text=texts[0])["input_ids"]).last_hidden_state
    n = alone.shape[1]
    assert n < 24 < batch["input_ids"].shape[1]
    torch.testing.assert_close(hidden[0, :n], alone[0], rtol=1e-4, atol=1e-5)


def test_language_model_called_alone_picks_the_factor_set_by_length(tiny_tokenizer, tiny_processor):
    """`model.model(...)` (feature extraction) uses the factor set the full model uses: long past the switch."""
    small = tiny_model(tiny_tokenizer, seed=2, original_max_position_embeddings=24).eval()
    for text in ("up", "The quick brown fox jumps over the lazy dog. " * 3):
        ids = tiny_processor(text=chat(tiny_processor, text))["input_ids"]
        with torch.no_grad():
            hidden = small.model(input_ids=ids).last_hidden_state
            torch.testing.assert_close(small.lm_head(hidden), small(input_ids=ids).logits, rtol=0, atol=1e-6)
    assert ids.shape[1] > 24


def test_published_call_conventions(model, tiny_processor):
    """What code written against the published model does: positional (input_ids, attention_mask), the base model
    called with pixel_values, and a strict load of a state dict carrying the `vision_embed_tokens.wte` alias."""
    texts = [chat(tiny_processor, "<|image_1|>\nWhat colour?"), chat(tiny_processor, "Just text, a little longer.")]
    batch = tiny_processor(text=texts, images=[[rand_image(400, 300, 9)], []], padding=True, padding_side="left")
    ids, mask, px, sizes = batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_sizes"]
    model.eval()
    with torch.no_grad():
        by_name = model(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=sizes).logits
        by_position = model(ids, mask, None, None, None, px, sizes).logits
        hidden = model.model(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=sizes).last_hidden_state
        # the published base model's order: ..., pixel_values, image_sizes, use_cache, output_attentions, ...
        hidden_by_position = model.model(ids, mask, None, None, None, px, sizes, False).last_hidden_state
        flags = model(ids, mask, None, None, None, px, sizes, None, False, False, True, True)
    assert by_name.dtype == torch.float32 and torch.equal(by_name, by_position)
    assert torch.equal(hidden_by_position, hidden) and torch.equal(flags.logits, by_name)
    assert len(flags.hidden_states) == model.config.num_hidden_layers + 1
    real = mask.bool()
    torch.testing.assert_close(model.lm_head(hidden).float()[real], by_name[real], rtol=0, atol=1e-6)
    state = dict(model.state_dict())
    state["model.vision_embed_tokens.wte.weight"] = state["model.embed_tokens.weight"]
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
