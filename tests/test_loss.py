"""The memory-lean loss (model/loss.py) equals transformers' full-logits loss, value and every gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.loss.loss_utils import ForCausalLMLoss

from phi3v_tune.model.tiny import tiny_model

TOL = 1e-5


def rand_image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def batch(tiny_processor):
    """Three rows (right padded): two with answer tokens, one with no label at all."""
    chat = tiny_processor.apply_chat_template
    texts = [
        chat([{"role": "user", "content": "<|image_1|>\nWhat colour?"}]) + "red circle<|end|>\n<|endoftext|>",
        chat([{"role": "user", "content": "Just text."}]) + "no<|end|>\n<|endoftext|>",
        chat([{"role": "user", "content": "<|image_1|>\nWhich is larger? Answer first or second."}])
        + "the first one, left<|end|>\n<|endoftext|>",
    ]
    inputs = tiny_processor(text=texts, images=[[rand_image(400, 300, 1)], [], [rand_image(300, 700, 2)]], padding=True)
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    labels[labels < 0] = -100
    for row, answer in ((0, 6), (2, 9)):
        length = int(inputs["attention_mask"][row].sum())
        labels[row, : length - answer] = -100
    labels[1] = -100  # a row without any label
    assert int((labels[:, 1:] != -100).sum()) > 8
    return dict(inputs), labels


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def loss_and_grads(model, inputs, labels, lean: bool, num_items=None, logits_to_keep=0):
    model.zero_grad(set_to_none=True)
    if lean:
        extra = {} if num_items is None else {"num_items_in_batch": num_items}
        out = model(**inputs, labels=labels, logits_to_keep=logits_to_keep, **extra)
        assert out.logits is None
        loss = out.loss
    else:  # the previous path: full logits, transformers' ForCausalLMLoss
        logits = model(**inputs, logits_to_keep=logits_to_keep).logits
        shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
        if logits_to_keep:
            shift = shift[:, -logits_to_keep:]
        loss = ForCausalLMLoss(logits, None, model.config.vocab_size, num_items, shift_labels=shift.contiguous())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainable(model).items() if p.grad is not None}


def assert_same(model, inputs, labels, **kw):
    ref_loss, ref_grads = loss_and_grads(model, inputs, labels, lean=False, **kw)
    loss, grads = loss_and_grads(model, inputs, labels, lean=True, **kw)
    assert torch.isfinite(ref_loss)
    assert abs(float(loss) - float(ref_loss)) <= TOL * max(1.0, abs(float(ref_loss)))
    assert grads.keys() == ref_grads.keys() == trainable(model).keys()
    for name, ref in ref_grads.items():
        err = float((grads[name] - ref).norm())
        assert err <= 1e-4 * float(ref.norm()) + 1e-8, name


@pytest.mark.parametrize("chunk", [2048, 4])
@pytest.mark.parametrize("num_items", [None, 37])
def test_loss_and_every_gradient_match_full_logits(tiny_tokenizer, batch, chunk, num_items):
    model = tiny_model(tiny_tokenizer, seed=5).train()
    model.loss_chunk_size = chunk  # 4 < the 15 labelled positions: several chunks
    inputs, labels = batch
    items = None if num_items is None else torch.tensor(num_items)
    assert_same(model, inputs, labels, num_items=items)


def test_lora_on_lm_head_matches(tiny_tokenizer, batch):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(tiny_tokenizer, seed=6)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "qkv_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, lora).train()
    assert any("lm_head.lora_B" in n for n in trainable(peft_model))
    model.loss_chunk_size = 5
    inputs, labels = batch
    assert_same(peft_model, inputs, labels)
    assert_same(peft_model, inputs, labels, num_items=torch.tensor(20))


def test_logits_to_keep_restricts_the_loss_to_the_kept_positions(tiny_tokenizer, batch):
    model = tiny_model(tiny_tokenizer, seed=7).train()
    inputs, labels = batch
    assert_same(model, inputs, labels, logits_to_keep=12)


def test_no_label_at_all_keeps_transformers_semantics(tiny_tokenizer, batch):
    """Mean over zero labelled tokens is NaN (as cross_entropy); with num_items_in_batch it is 0 and backward works."""
    model = tiny_model(tiny_tokenizer, seed=8).train()
    inputs, labels = batch
    none = torch.full_like(labels, -100)
    assert torch.isnan(model(**inputs, labels=none).loss)
    loss = model(**inputs, labels=none, num_items_in_batch=torch.tensor(4)).loss
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert model.lm_head.weight.grad is not None and float(model.lm_head.weight.grad.abs().sum()) == 0.0


def test_chunk_logits_are_recomputed_in_backward_not_stored(tiny_tokenizer, batch):
    model = tiny_model(tiny_tokenizer, seed=9).train()
    model.loss_chunk_size = 8
    inputs, labels = batch
    shapes: list[tuple[int, ...]] = []
    model.lm_head.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    model(**inputs, labels=labels).loss.backward()
    n_labelled = int((labels[:, 1:] != -100).sum())
    rows = [s[0] for s in shapes]
    assert sum(rows) == 2 * n_labelled  # forward + recompute, only labelled positions
    assert max(rows) <= 8


def test_generation_path_still_returns_logits(tiny_tokenizer, batch):
    model = tiny_model(tiny_tokenizer, seed=10)
    inputs, _ = batch
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
