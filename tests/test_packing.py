"""Padding-free packing is exact: a packed row gives the padded batch's loss and gradients (CPU, fp32, tiny model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from phi3v_tune.data.collate import Collator
from phi3v_tune.data.packing import PackingCollator, plan_rows
from phi3v_tune.model import packed_attention
from phi3v_tune.model.modeling import set_rope_per_sample
from phi3v_tune.model.packed_attention import ATTN_NAME, packed_attention_forward
from phi3v_tune.model.tiny import tiny_model as _tiny_model

SWITCH = 64  # a small original_max_position_embeddings: samples above it use the long su-RoPE factors


def rand_image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def make_example(processor, sid: str, prompt: str, answer: str, images: list, learned: int | None) -> dict:
    """`learned`: the last N tokens are labels; None: every text token is (so the first label is not -100)."""
    text = processor.apply_chat_template([{"role": "user", "content": prompt}]) + answer + "<|end|>\n<|endoftext|>"
    out = processor(text=text, images=images or None)
    ids = out["input_ids"][0]
    labels = ids.clone()
    if learned is not None:
        labels[: len(ids) - learned] = -100
    labels[ids < 0] = -100
    example = {"id": sid, "input_ids": ids, "labels": labels}
    if images:
        example["pixel_values"], example["image_sizes"] = out["pixel_values"], out["image_sizes"]
    return example


@pytest.fixture(scope="module")
def examples(tiny_processor) -> list[dict]:
    p = tiny_processor
    return [
        make_example(p, "one-image", "<|image_1|>\nWhat colour?", "red", [rand_image(336, 336, 1)], 4),
        make_example(p, "text", "Just text.", "fine", [], None),  # 2 learned texts, < SWITCH tokens
        make_example(
            p,
            "two-images",
            "<|image_1|>\n<|image_2|>\nWhich?",
            "the first",
            [rand_image(400, 300, 2), rand_image(300, 700, 3)],
            5,
        ),
        make_example(p, "short", "Hi", "up", [], 3),
    ]


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("ids", "num_tokens")}


def logit_inputs(batch: dict) -> dict:
    """Without labels: the model then returns logits (the loss path computes none)."""
    return {k: v for k, v in model_inputs(batch).items() if k != "labels"}


def loss_and_grads(model, batch: dict, num_items: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    extra = {"num_items_in_batch": torch.tensor(num_items)} if num_items is not None else {}
    loss = model(**model_inputs(batch), **extra).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same(a: tuple, b: tuple) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert set(grads_a) == set(grads_b) and len(grads_a) > 20
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def label_count(batch: dict) -> int:
    """What HF Trainer divides by (num_items_in_batch): label tokens after the shift."""
    return int(batch["labels"][..., 1:].ne(-100).sum())


def tiny_model(*args, **kwargs):
    """Training's setting (Phi3VTrainer): a padded batch's samples take the factor sets of their own lengths, which
    is what packed rows compute."""
    m = _tiny_model(*args, **kwargs)
    set_rope_per_sample(m)
    return m


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    m = tiny_model(tiny_tokenizer, seed=1, original_max_position_embeddings=SWITCH).train()
    m.set_attn_implementation(ATTN_NAME)
    return m


# --------------------------------------------------------------------------------------------------------------------
def test_collator_keeps_every_sample_in_order(examples, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    batch = PackingCollator(pad, original_max_position_embeddings=SWITCH)(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["ids"] == [e["id"] for e in examples] and batch["num_tokens"] == sum(lengths)
    assert batch["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in batch
    assert torch.equal(batch["input_ids"][0], torch.cat([e["input_ids"] for e in examples]))
    cu = batch["cu_seq_lens_q"]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, *np.cumsum(lengths).tolist()]
    assert torch.equal(batch["cu_seq_lens_k"], cu) and batch["max_length_q"] == batch["max_length_k"] == max(lengths)
    assert torch.equal(batch["position_ids"][0], torch.cat([torch.arange(n) for n in lengths]))
    for e, start, n in zip(examples, cu[:-1].tolist(), lengths):
        got = batch["labels"][0, start : start + n]
        assert got[0] == -100 and torch.equal(got[1:], e["labels"][1:])  # only each sample's first label is dropped
        assert bool(batch["rope_use_long"][0, start : start + n].all()) == (n > SWITCH)
    assert batch["rope_use_long"].any() and not batch["rope_use_long"].all()
    assert examples[1]["labels"][0] != -100  # the fully-labelled sample really tests the boundary
    assert torch.equal(batch["pixel_values"], torch.cat([e["pixel_values"] for e in examples if "pixel_values" in e]))
    assert label_count(batch) == label_count(Collator(pad)(examples))


def test_token_budget_fills_rows_in_order(examples, tiny_tokenizer):
    assert plan_rows([5, 3, 4, 9, 1], 8) == [[0, 1], [2], [3], [4]]
    assert plan_rows([5, 3, 4], None) == [[0, 1, 2]]
    lengths = [len(e["input_ids"]) for e in examples]
    budget = lengths[0] + lengths[1]
    batch = PackingCollator(tiny_tokenizer.pad_token_id, max_tokens=budget)(examples)
    rows = plan_rows(lengths, budget)
    assert len(rows) == batch["input_ids"].shape[0] > 1
    width = batch["input_ids"].shape[1]
    flat = batch["input_ids"].reshape(-1)
    cu = batch["cu_seq_lens_q"].tolist()
    assert cu[-1] == flat.numel() and len(cu) - 1 == len(examples) + sum(
        1 for r in rows if sum(lengths[i] for i in r) < width
    )
    real = [flat[s:e] for s, e in zip(cu[:-1], cu[1:]) if e - s in lengths]
    assert all(torch.equal(a, e["input_ids"]) for a, e in zip(real, examples))


# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_tokens", [None, 900])
def test_packed_loss_and_gradients_equal_padded(model, examples, tiny_tokenizer, max_tokens):
    pad_id = tiny_tokenizer.pad_token_id
    padded = Collator(pad_id)(examples)
    packed = PackingCollator(pad_id, max_tokens, SWITCH)(examples)
    assert packed["input_ids"].shape[0] == (1 if max_tokens is None else 3)  # [one-image, text], [two-images], [short]
    n = label_count(padded)
    assert label_count(packed) == n
    # mean over label tokens (model alone) and HF Trainer's sum / num_items_in_batch
    assert_same(loss_and_grads(model, padded), loss_and_grads(model, packed))
    assert_same(loss_and_grads(model, padded, n), loss_and_grads(model, packed, n))


def test_long_samples_use_long_factors_per_token(model, examples, tiny_tokenizer):
    """Samples above original_max use the long su-RoPE factors on all their tokens; the others the short ones."""
    pad_id = tiny_tokenizer.pad_token_id
    packed = PackingCollator(pad_id, None, SWITCH)(examples)
    without_flags = {k: v for k, v in packed.items() if k != "rope_use_long"}  # the model derives them
    wrong = {**packed, "rope_use_long": torch.zeros_like(packed["rope_use_long"])}
    ref = loss_and_grads(model, Collator(pad_id)(examples))
    assert_same(ref, loss_and_grads(model, without_flags))
    with torch.no_grad():  # the flags matter: short factors everywhere change the long samples' logits
        right, short = (model(**logit_inputs(b)).logits for b in (packed, wrong))
    long = packed["rope_use_long"][0]
    assert float((right - short)[0, long].abs().max()) > 1e-3 and torch.equal(right[0, ~long], short[0, ~long])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_rows_also_exact_with_dense_masks(tiny_tokenizer, examples, impl):
    """With plain sdpa/eager, transformers' block-diagonal mask (from the restarting positions) gives the same."""
    m = tiny_model(tiny_tokenizer, seed=2, original_max_position_embeddings=SWITCH).train()
    m.set_attn_implementation(impl)
    pad_id = tiny_tokenizer.pad_token_id
    few = examples[1:]
    assert_same(loss_and_grads(m, Collator(pad_id)(few)), loss_and_grads(m, PackingCollator(pad_id, None, SWITCH)(few)))


def test_packed_rows_with_activation_checkpointing(tiny_tokenizer, examples):
    m = tiny_model(tiny_tokenizer, seed=4, original_max_position_embeddings=SWITCH).train()
    m.set_attn_implementation(ATTN_NAME)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pad_id = tiny_tokenizer.pad_token_id
    few = examples[1:]
    assert_same(loss_and_grads(m, Collator(pad_id)(few)), loss_and_grads(m, PackingCollator(pad_id, None, SWITCH)(few)))


def test_generation_with_the_packed_attention_is_sdpa(tiny_tokenizer, tiny_processor):
    """Evaluation generates with the training model: left-padded batches and the KV cache, same tokens as sdpa."""
    texts = [tiny_processor.apply_chat_template([{"role": "user", "content": t}]) for t in ("Hi", "What colour is it?")]
    batch = tiny_processor(text=texts, padding=True, padding_side="left")
    out = {}
    for impl in ("sdpa", ATTN_NAME):
        m = tiny_model(tiny_tokenizer, seed=5)
        m.set_attn_implementation(impl)
        with torch.no_grad():
            gen = m.generate(
                **batch, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
        out[impl] = gen
    assert torch.equal(out["sdpa"].sequences, out[ATTN_NAME].sequences)
    for a, b in zip(out["sdpa"].logits, out[ATTN_NAME].logits):
        assert torch.equal(a, b)


def test_packed_path_builds_no_dense_mask(model, examples, tiny_tokenizer, monkeypatch):
    seen = []
    original = packed_attention.sdpa_mask
    monkeypatch.setattr(packed_attention, "sdpa_mask", lambda *a, **k: seen.append(1) or original(*a, **k))
    masks = []
    real = packed_attention.varlen_attention
    monkeypatch.setattr(packed_attention, "varlen_attention", lambda *a, **k: masks.append(1) or real(*a, **k))
    batch = PackingCollator(tiny_tokenizer.pad_token_id, None, SWITCH)(examples[1:])
    with torch.no_grad():
        model(**model_inputs(batch))
    assert seen == [] and len(masks) == model.config.num_hidden_layers
    with torch.no_grad():
        model(**model_inputs(Collator(tiny_tokenizer.pad_token_id)(examples[1:])))
    assert seen == [1]  # padded batches: transformers' sdpa mask, as with "sdpa"


def test_images_land_in_their_own_sample(model, examples, tiny_processor, tiny_tokenizer):
    """Changing the image of one sample changes the per-token loss of that sample only."""
    changed = list(examples)
    changed[2] = make_example(
        tiny_processor, "two-images", "<|image_1|>\n<|image_2|>\nWhich?", "the first",
        [rand_image(400, 300, 2), rand_image(300, 700, 99)], 5,
    )  # fmt: skip
    assert torch.equal(changed[2]["input_ids"], examples[2]["input_ids"])
    collate = PackingCollator(tiny_tokenizer.pad_token_id, None, SWITCH)

    def per_token(batch: dict) -> torch.Tensor:
        with torch.no_grad():
            logits = model(**logit_inputs(batch)).logits[0]
        labels = batch["input_ids"][0].clamp(min=0)  # every position, image positions as token 0
        return F.cross_entropy(logits[:-1], labels[1:], reduction="none")

    a, b = per_token(collate(examples)), per_token(collate(changed))
    cu = collate(examples)["cu_seq_lens_q"].tolist()
    differs = (a - b).abs() > 1e-6
    inside = torch.zeros_like(differs)
    inside[cu[2] : cu[3]] = True  # predictions made by the tokens of sample 2 (per_token[i]: token i predicts i+1)
    assert differs.any() and not bool((differs & ~inside).any())


# --------------------------------------------------------------------------------------------------------------------
class _Attn(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("groups", [1, 2])
def test_attention_function_without_segments_is_sdpa(groups):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 10, 16, generator=g)
    k, v = (torch.randn(3, 4 // groups, 10, 16, generator=g) for _ in range(2))
    lengths = torch.tensor([10, 7, 3])
    mask = sdpa_mask(
        batch_size=3, q_length=10, kv_length=10, attention_mask=torch.arange(10)[None] < lengths[:, None],
        allow_is_causal_skip=False,
    )  # fmt: skip
    for m in (mask, None):
        ours, _ = packed_attention_forward(_Attn(groups), q, k, v, m, scaling=0.25)
        ref, _ = sdpa_attention_forward(_Attn(groups), q, k, v, m, scaling=0.25)
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("groups", [1, 2])
def test_attention_function_segments_equal_samples_alone(groups):
    g = torch.Generator().manual_seed(1)
    lengths = [5, 1, 9, 3]
    total = sum(lengths)
    q = torch.randn(1, 4, total, 16, generator=g)
    k, v = (torch.randn(1, 4 // groups, total, 16, generator=g) for _ in range(2))
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)
    out, weights = packed_attention_forward(
        _Attn(groups), q, k, v, None, scaling=0.25, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9
    )
    assert out.shape == (1, total, 4, 16) and weights is None
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        kk, vv = (x[:, :, s:e].repeat_interleave(groups, dim=1) for x in (k, v))
        alone = F.scaled_dot_product_attention(q[:, :, s:e], kk, vv, scale=0.25, is_causal=True)
        torch.testing.assert_close(out[:, s:e], alone.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_bad_offsets_are_refused(model, examples, tiny_tokenizer):
    batch = model_inputs(PackingCollator(tiny_tokenizer.pad_token_id, None, SWITCH)(examples[1:]))
    bad = batch["cu_seq_lens_q"].clone()
    bad[-1] -= 1
    with pytest.raises(ValueError, match="ends at"):
        model(**{**batch, "cu_seq_lens_q": bad, "cu_seq_lens_k": bad})
    with pytest.raises(ValueError, match="no attention_mask"):
        model(**batch, attention_mask=torch.ones_like(batch["input_ids"]))


def test_offsets_are_checked_on_the_host_and_never_read_back_from_a_device():
    from phi3v_tune.model.packed_attention import check_packed

    cu = torch.tensor([0, 3, 7, 10], dtype=torch.int32)
    check_packed(cu, cu.clone(), 1, 10)
    for bad, match in (([1, 3, 10], "starting at 0"), ([0, 5, 3, 10], "increasing"), ([0, 3, 9], "ends at 9")):
        with pytest.raises(ValueError, match=match):
            check_packed(torch.tensor(bad, dtype=torch.int32), None, 1, 10)
    with pytest.raises(ValueError, match="must equal"):
        check_packed(cu, torch.tensor([0, 4, 7, 10], dtype=torch.int32), 1, 10)
    with pytest.raises(ValueError, match="1-d tensor"):
        check_packed(cu[None], None, 1, 10)
    # offsets on an accelerator: reading them would wait for the GPU, so only the shape is checked (a meta tensor
    # has no values at all: any read would raise here)
    on_device = torch.empty(4, dtype=torch.int32, device="meta")
    check_packed(on_device, on_device, 1, 10)
    with pytest.raises(ValueError, match="must equal"):
        check_packed(on_device, torch.empty(5, dtype=torch.int32, device="meta"), 1, 10)


# --------------------------------------------------------------------------------------------------------------------
def test_training_uses_packing_only_with_several_samples_per_device(tiny_tokenizer, tiny_processor):
    from phi3v_tune.config import TrainConfig
    from phi3v_tune.train.inputs import collators
    from phi3v_tune.train.runtime import Runtime

    def attention_implementation(cfg: TrainConfig) -> str:
        return Runtime.resolve(cfg).attn_implementation

    def data_collators(cfg: TrainConfig, processor, model):  # what the run builds from its settings
        pad, switch = processor.tokenizer.pad_token_id, model.config.rope_switch_length
        return collators(pad, Runtime.resolve(cfg).packing, cfg.packing_max_tokens, switch)

    model = tiny_model(tiny_tokenizer, seed=0, original_max_position_embeddings=SWITCH)
    train, evaluation = data_collators(
        TrainConfig(batch_size_per_device=4, packing_max_tokens=512), tiny_processor, model
    )
    assert isinstance(train, PackingCollator) and isinstance(evaluation, Collator)
    assert train.max_tokens == 512 and train.original_max == SWITCH
    assert attention_implementation(TrainConfig(batch_size_per_device=4)) == ATTN_NAME
    assert attention_implementation(TrainConfig(batch_size_per_device=4, attn_implementation="eager")) == "eager"
    for cfg in (TrainConfig(batch_size_per_device=1), TrainConfig(batch_size_per_device=4, packing=False)):
        train, evaluation = data_collators(cfg, tiny_processor, model)
        assert isinstance(train, Collator) and attention_implementation(cfg) == "sdpa"


def test_training_run_packed_equals_padded(tmp_path, monkeypatch):
    """The real training path (HF Trainer, num_items_in_batch, gradient accumulation): same losses and weights."""
    from safetensors.torch import load_file

    from phi3v_tune.config import TrainConfig
    from phi3v_tune.data.synthetic import demo_split, write_jsonl
    from phi3v_tune.train.run import run_training

    train, _ = demo_split(3, 0, seed=7, tasks=("colour", "shape", "compare"), as_png=True)
    data = write_jsonl(train, tmp_path / "data")
    calls = []
    real = packed_attention.varlen_attention
    monkeypatch.setattr(packed_attention, "varlen_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    used = []
    for cls in (Collator, PackingCollator):
        monkeypatch.setattr(cls, "__call__", lambda self, ex, _f=cls.__call__: used.append(type(self)) or _f(self, ex))
    runs = {}
    for packing in (False, True):
        used.clear()
        out = tmp_path / f"packing-{packing}"
        cfg = TrainConfig(
            data=str(data), model="tiny", num_crops=1, output_dir=str(out), batch_size=6, batch_size_per_device=3,
            max_steps=2, learning_rate=1e-3, warmup_steps=0, seed=3, save_steps=100, logging_steps=1,
            report_to="none", num_workers=0, progress=False, cpu=True, packing=packing, eval_holdout=2, eval_steps=2,
        )  # fmt: skip
        metrics = run_training(cfg)
        weights = {}
        for f in sorted((out / "final").glob("*.safetensors")):
            weights.update(load_file(f))
        runs[packing] = ((metrics["train"]["train_loss"], metrics["eval_after"]["eval_loss"]), weights)
        assert bool(calls) == packing  # the packed path really ran (and only with --packing)
        assert (PackingCollator in used) == packing and Collator in used  # evaluation batches stay padded
        assert ATTN_NAME not in (out / "final" / "config.json").read_text()  # checkpoints stay loadable elsewhere
    (loss_a, w_a), (loss_b, w_b) = runs[False], runs[True]
    assert abs(loss_a[0] - loss_b[0]) < 1e-5 and abs(loss_a[1] - loss_b[1]) < 1e-5  # training, evaluation (padded)
    assert set(w_a) == set(w_b)
    for k in w_a:
        torch.testing.assert_close(w_b[k], w_a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_training_collator_drops_only_an_all_ones_mask_and_counts_on_the_host(tiny_tokenizer, examples):
    """Unpadded training batches carry no attention_mask (one GPU read less per step); same loss and gradients."""
    pad = tiny_tokenizer.pad_token_id
    model = tiny_model(tiny_tokenizer, seed=4, original_max_position_embeddings=SWITCH).train()
    for chosen in ([examples[0]], [examples[2]], [examples[1]]):
        lean, full = Collator(pad, omit_full_mask=True)(chosen), Collator(pad)(chosen)
        assert "attention_mask" not in lean and full["attention_mask"].all()
        assert lean["num_tokens"] == full["num_tokens"] == int(chosen[0]["input_ids"].shape[0])
        if "pixel_values" in chosen[0]:
            assert lean["image_token_count"] == int((chosen[0]["input_ids"] < 0).sum())
            assert lean["image_sizes"] == chosen[0]["image_sizes"].tolist()  # a list: data loaders leave it
        (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(model, full), loss_and_grads(model, lean)
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-7)
        assert set(grads_a) == set(grads_b) and len(grads_a) > 10
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)
    mixed = Collator(pad, omit_full_mask=True)(examples[:2])  # two lengths: padding, so the mask stays
    assert not mixed["attention_mask"].all()
    assert mixed["num_tokens"] == sum(int(e["input_ids"].shape[0]) for e in examples[:2])
