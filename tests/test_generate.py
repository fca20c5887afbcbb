"""`generate` with the KV cache equals greedy argmax over full forward passes (also across the su-RoPE switch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from phi3v_tune.model.modeling import rope_per_sample
from phi3v_tune.model.tiny import tiny_model


def rand_image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def greedy_without_cache(model, inputs, steps: int) -> torch.Tensor:
    """Reference decoding: the whole sequence is recomputed at every step, no cache."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    new = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                pixel_values=inputs.get("pixel_values"),
                image_sizes=inputs.get("image_sizes"),
                use_cache=False,
            ).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        new.append(nxt)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return torch.cat(new, dim=1)


def sharpen(model, std: float = 0.3):
    """Larger random weights: the tiny model's argmax then depends on every input detail (its default initialisation
    gives nearly flat logits, where a wrong RoPE factor set can still pick the same tokens)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or "GN" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def chat(p, text):
    return p.apply_chat_template([{"role": "user", "content": text}])


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("original_max", [4096, 24])
def test_generate_with_cache_equals_full_forward_greedy(tiny_tokenizer, tiny_processor, original_max, per_sample):
    """Published rule (the cache is dropped once, when the padded length passes the switch) and per sample (dropped
    whenever one more sample's own length passes it: our evaluation's setting)."""
    model = tiny_model(tiny_tokenizer, seed=11, original_max_position_embeddings=original_max)
    texts = [chat(tiny_processor, "The quick brown fox jumps"), chat(tiny_processor, "up")]
    inputs = tiny_processor(text=texts, padding=True, padding_side="left")
    steps = 20
    with rope_per_sample(model, per_sample):
        expected = greedy_without_cache(model, inputs, steps)
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=None, min_new_tokens=steps)
    got = out[:, inputs["input_ids"].shape[1] :]
    if original_max == 24:  # the run crosses the switch point: the cache is dropped and everything recomputed
        lengths = inputs["attention_mask"].sum(-1)
        assert int(lengths.max()) < 24 < int(lengths.min()) + steps  # both samples cross, at different steps
    assert got.tolist() == expected.tolist()


def test_generate_with_images_equals_full_forward_greedy(tiny_tokenizer, tiny_processor):
    model = tiny_model(tiny_tokenizer, seed=12)
    texts = [chat(tiny_processor, "<|image_1|>\nWhat colour?"), chat(tiny_processor, "<|image_1|><|image_2|>\nSame?")]
    images = [[rand_image(400, 300, 1)], [rand_image(336, 336, 2), rand_image(200, 500, 3)]]
    inputs = tiny_processor(text=texts, images=images, padding=True, padding_side="left")
    expected = greedy_without_cache(model, inputs, 8)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None, min_new_tokens=8)
    assert out[:, inputs["input_ids"].shape[1] :].tolist() == expected.tolist()


def test_image_crossing_switch_recomputes_with_images(tiny_tokenizer, tiny_processor):
    """The cache is dropped when the length passes the switch point; the image must be re-embedded then."""
    model = sharpen(tiny_model(tiny_tokenizer, seed=13, original_max_position_embeddings=475))
    inputs = tiny_processor(text=chat(tiny_processor, "<|image_1|>\nHi"), images=[rand_image(672, 336, 4)])
    n = inputs["input_ids"].shape[1]
    assert n < 475 < n + 12
    expected = greedy_without_cache(model, inputs, 12)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=None, min_new_tokens=12)
    assert out[:, n:].tolist() == expected.tolist()


@pytest.mark.parametrize("options", [{"num_beams": 2}, {"do_sample": True, "top_k": 1, "num_return_sequences": 2}])
def test_beams_and_returned_sequences_keep_each_rows_images(tiny_tokenizer, tiny_processor, options):
    """Every copy of a row (beam search, several returned sequences) sees that row's own images, in their order: a
    two-image row of different sizes next to a one-image row gives each copy the first-step logits of its prompt."""
    model = sharpen(tiny_model(tiny_tokenizer, seed=15))
    texts = [chat(tiny_processor, "<|image_1|><|image_2|>\nSame?"), chat(tiny_processor, "<|image_1|>\nColour?")]
    images = [[rand_image(400, 300, 5), rand_image(200, 500, 6)], [rand_image(336, 336, 7)]]
    inputs = tiny_processor(text=texts, images=images, padding=True, padding_side="left")
    out = model.generate(
        **inputs, max_new_tokens=1, eos_token_id=None, return_dict_in_generate=True, output_logits=True, **options
    )
    for row in range(2):
        alone = tiny_processor(text=texts[row], images=images[row])
        with torch.no_grad():
            expected = model(**alone).logits[0, -1]
        for copy in range(2):
            torch.testing.assert_close(out.logits[0][2 * row + copy], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("per_sample", [False, True])
def test_generate_from_inputs_embeds_equals_generate_from_ids(tiny_tokenizer, tiny_processor, per_sample):
    """`generate(inputs_embeds=...)` (images already embedded) gives the tokens that `input_ids` + pixels give, also
    when the length passes the su-RoPE switch and the cache is recomputed from the embeddings plus the new tokens."""
    model = sharpen(tiny_model(tiny_tokenizer, seed=16, original_max_position_embeddings=475))
    inputs = tiny_processor(text=chat(tiny_processor, "<|image_1|>\nHi"), images=[rand_image(672, 336, 8)])
    n = inputs["input_ids"].shape[1]
    assert n < 475 < n + 12
    with rope_per_sample(model, per_sample), torch.no_grad():
        embeds = model.model.embed(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"])
        expected = greedy_without_cache(model, inputs, 12)
        out = model.generate(
            inputs_embeds=embeds,
            attention_mask=inputs["attention_mask"],
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            min_new_tokens=12,
        )
    assert out[:, -12:].tolist() == expected.tolist()


def test_generation_stops_on_end_tokens(tiny_tokenizer, tiny_processor):
    model = tiny_model(tiny_tokenizer, seed=14)
    inputs = tiny_processor(text=chat(tiny_processor, "hello"))
    first = greedy_without_cache(model, inputs, 1)[0, 0].item()
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=[first])
    assert out.shape[1] == inputs["input_ids"].shape[1] + 1


def test_training_and_evaluation_choose_the_factor_set_per_sample(tiny_tokenizer, tiny_processor, tmp_path):
    """The published rule (one set per pass from the padded length) is the model's default; our evaluation generates
    and our Trainer trains with a set per sample, so a sample's result never depends on what it is batched with."""
    from transformers import TrainingArguments

    from phi3v_tune.data import Record, Turn
    from phi3v_tune.evaluate.generate import generate_answers
    from phi3v_tune.train.trainer import Phi3VTrainer

    model = tiny_model(tiny_tokenizer, seed=15, original_max_position_embeddings=40)
    rotary = model.model.rotary_emb
    seen: list[bool] = []
    generate = model.generate

    def spy(*args, **kwargs):
        seen.append(rotary.per_sample)
        return generate(*args, **kwargs)

    model.generate = spy
    short = Record("s", None, [Turn("<|image_1|>\nWhat colour?", "", [rand_image(300, 200, 5)])])
    long = Record("l", None, [Turn("Tell me a long story about a fox and a dog. " * 4, "")])
    alone = generate_answers(model, tiny_processor, [short], batch_size=1, max_new_tokens=4, progress=False)
    both = generate_answers(model, tiny_processor, [short, long], batch_size=2, max_new_tokens=4, progress=False)
    assert seen == [True, True] and rotary.per_sample is False  # switched on for generation, then restored
    assert both[0] == alone[0]
    Phi3VTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))
    assert rotary.per_sample is True
