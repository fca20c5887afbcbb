"""Preference tuning (DPO / IPO): pair examples, pair batches, the losses against a hand computation, images once per
pair, packed = padded, and the reference model (adapters disabled, precomputed). Tiny models, fp32, CPU."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

from phi3v_tune.data.collate import Collator
from phi3v_tune.data.examples import SampleRefused, build_example
from phi3v_tune.data.layout import SampleLayout
from phi3v_tune.data.preference import (
    PackedPairCollator,
    PairCollator,
    PreferenceRecord,
    build_pair_example,
    with_last_answer,
)
from phi3v_tune.data.schema import Record, Turn
from phi3v_tune.model.loss import shifted_labels
from phi3v_tune.model.modeling import set_rope_per_sample
from phi3v_tune.model.packed_attention import ATTN_NAME
from phi3v_tune.model.preference import (
    model_inputs,
    precompute_reference,
    preference_loss,
    preference_step,
    reference_logps,
    sequence_logps,
    split_pairs,
)
from phi3v_tune.model.tiny import tiny_model as _tiny_model

SWITCH = 400  # a small original_max_position_embeddings: the longer sequences use the long su-RoPE factors
BETA = 0.5


def rand_image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def tiny_model(tokenizer, seed: int):
    """Training's setting: per-sample su-RoPE in padded batches (what packed rows compute), packed attention."""
    m = _tiny_model(tokenizer, seed=seed, original_max_position_embeddings=SWITCH)
    set_rope_per_sample(m)
    m.set_attn_implementation(ATTN_NAME)
    return m


@pytest.fixture(scope="module")
def processor(tiny_tokenizer):
    """One sub-crop per image at most: short sequences, fast tests."""
    from phi3v_tune import Phi3VProcessor

    return Phi3VProcessor.from_tokenizer(tiny_tokenizer, num_crops=1)


@pytest.fixture(scope="module")
def pairs() -> list[PreferenceRecord]:
    """Different lengths and image counts: one image; two earlier-turn-context + two images; text only."""
    return [
        PreferenceRecord(
            Record("one-image", None, [Turn("What colour is the shape?", "", [rand_image(336, 336, 1)])]),
            "red",
            "a big blue square",
        ),
        PreferenceRecord(
            Record(
                "two-images",
                None,
                [
                    Turn("Hi", "up"),
                    Turn("Which image shows the bigger shape?", "", [rand_image(200, 150, 2), rand_image(150, 350, 3)]),
                ],
            ),
            "the first",
            "second",
        ),
        PreferenceRecord(Record("text", None, [Turn("Is it left or right?", "")]), "left", "right or up"),
    ]


@pytest.fixture(scope="module")
def examples(pairs, processor) -> list[dict]:
    return [build_pair_example(p, processor) for p in pairs]


@pytest.fixture(scope="module")
def policy(tiny_tokenizer):
    return tiny_model(tiny_tokenizer, seed=1).train()


@pytest.fixture(scope="module")
def reference(tiny_tokenizer):
    return tiny_model(tiny_tokenizer, seed=2).eval()


def sequences_alone(example: dict) -> list[dict]:
    """Chosen and rejected of a pair as independent SFT-style samples, each with its own copy of the images."""
    out = []
    for name in ("chosen", "rejected"):
        s = {"id": example["id"], "input_ids": example[f"{name}_input_ids"], "labels": example[f"{name}_labels"]}
        if "pixel_values" in example:
            s["pixel_values"] = example["pixel_values"].clone()
            s["image_sizes"] = example["image_sizes"].clone()
        out.append(s)
    return out


def logps_alone(model, sample: dict) -> tuple[float, int]:
    """The hand computation: the sequence alone through the model, full-vocabulary logits, log_softmax, gather over the
    answer positions (labels shifted by one)."""
    with torch.no_grad():
        out = model(
            input_ids=sample["input_ids"][None],
            pixel_values=sample.get("pixel_values"),
            image_sizes=sample.get("image_sizes"),
        )
    logps = torch.log_softmax(out.logits[0, :-1].double(), dim=-1)
    targets = sample["labels"][1:]
    answer = targets != -100
    picked = logps[answer].gather(1, targets[answer][:, None])
    return float(picked.sum()), int(answer.sum())


def hand_loss(policy_lp, ref_lp, tokens, loss_type: str, smoothing: float, sft_weight: float) -> float:
    """Mean over pairs of the published per-pair losses (floats in, float out); see model/preference.py."""
    total = 0.0
    for (pc, pr), (rc, rr), (nc, nr) in zip(policy_lp, ref_lp, tokens):
        if loss_type == "sigmoid":
            h = BETA * ((pc - rc) - (pr - rr))
            loss = -(1 - smoothing) * math.log(1 / (1 + math.exp(-h))) - smoothing * math.log(1 / (1 + math.exp(h)))
        else:
            loss = ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * BETA)) ** 2
        total += loss + sft_weight * (-pc / nc)
    return total / len(policy_lp)


def grads_of(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_grads(a: dict, b: dict, at_least: int = 20, floor: float = 1e-10) -> None:
    """`floor`: absolute tolerance below which differences are fp32 noise (key-projection biases, for one, have a zero
    gradient in exact arithmetic: softmax ignores a constant added to every key score of a query)."""
    assert set(a) == set(b) and len(a) >= at_least
    for name in a:  # fp32 sums in another order: elementwise within 1e-5 of the tensor's largest gradient
        scale = float(a[name].abs().max())
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5 * scale + floor, msg=name)


# --------------------------------------------------------------------------------------------------------------------
def test_pair_example_is_the_sft_layout_with_one_prompt(pairs, examples, processor):
    for pair, e in zip(pairs, examples):
        n = e["prompt_length"]
        prompt = build_example(pair.prompt, processor, for_generation=True)
        for name in ("chosen", "rejected"):
            ids, labels = e[f"{name}_input_ids"], e[f"{name}_labels"]
            sft = build_example(with_last_answer(pair.prompt, getattr(pair, name)), processor)
            assert torch.equal(ids, sft["input_ids"]) and torch.equal(ids[:n], prompt["input_ids"])
            # only the last answer is learned: the earlier turn's answer ("up") is context
            assert (labels[:n] == -100).all() and torch.equal(labels[n:], ids[n:])
            assert torch.equal(labels[n:], sft["labels"][n:])
            decoded = processor.tokenizer.decode(ids[n:])
            assert decoded.startswith(getattr(pair, name)) and decoded.replace(" ", "").endswith(
                "<|end|>\n<|endoftext|>"
            )
        if pair.prompt.images:
            assert torch.equal(e["pixel_values"], prompt["pixel_values"])  # the images once, as SFT builds them
            assert e["num_images"] == e["pixel_values"].shape[0] == len(pair.prompt.images)
        else:
            assert "pixel_values" not in e
    two = examples[1]
    assert (
        build_example(with_last_answer(pairs[1].prompt, "x"), processor)["labels"][: two["prompt_length"]] != -100
    ).any()


def test_truncation_keeps_the_prompt_or_refuses(pairs, examples, processor):
    e = examples[0]
    n = e["prompt_length"]
    cut = build_pair_example(pairs[0], processor, SampleLayout(max_length=n + 2))
    assert cut["truncated"] and len(cut["rejected_input_ids"]) == n + 2
    assert torch.equal(cut["rejected_input_ids"], e["rejected_input_ids"][: n + 2])
    assert torch.equal(cut["chosen_input_ids"], e["chosen_input_ids"][: n + 2])
    assert not examples[0]["truncated"]
    with pytest.raises(
        SampleRefused, match=rf"id=one-image: no answer token is left after truncating to max_length={n}"
    ):
        build_pair_example(pairs[0], processor, SampleLayout(max_length=n))
    # a multi-turn pair whose last answer is cut away entirely (the earlier answer still has labels) is refused too
    n = examples[1]["prompt_length"]
    with pytest.raises(
        SampleRefused, match=rf"^id=two-images: no token of the chosen answer is left .* max_length={n - 1} "
    ):
        build_pair_example(pairs[1], processor, SampleLayout(max_length=n - 1))


def test_video_frames_are_decoded_once_per_pair(tmp_path, processor, monkeypatch):
    from test_convert import make_video

    import phi3v_tune.data.examples as examples_module

    make_video(tmp_path / "clip.mp4", 12)
    calls = []
    original = examples_module.load_video_frames
    monkeypatch.setattr(examples_module, "load_video_frames", lambda *a, **k: calls.append(a) or original(*a, **k))
    record = Record(
        "video", None, [Turn("In which direction does the dot move?", "", video=str(tmp_path / "clip.mp4"))]
    )
    e = build_pair_example(PreferenceRecord(record, "up", "down"), processor, SampleLayout(video_frames=3))
    assert len(calls) == 1 and e["num_images"] == e["pixel_values"].shape[0] == 3
    sft = build_example(with_last_answer(record, "down"), processor, SampleLayout(video_frames=3))
    assert torch.equal(e["rejected_input_ids"], sft["input_ids"]) and torch.equal(
        e["pixel_values"], sft["pixel_values"]
    )


def test_pair_batches_carry_images_once_and_the_pair_order(examples, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    lengths = [len(e[f"{a}_input_ids"]) for e in examples for a in ("chosen", "rejected")]
    padded = PairCollator(pad)(examples)
    packed = PackedPairCollator(pad, None, SWITCH, share_prompt=False)(examples)
    for batch in (padded, packed):
        assert batch["ids"] == ["one-image", "two-images", "text"] and batch["num_tokens"] == sum(lengths)
        assert torch.equal(batch["pixel_values"], torch.cat([examples[0]["pixel_values"], examples[1]["pixel_values"]]))
        assert batch["image_sizes"] == examples[0]["image_sizes"].tolist() + examples[1]["image_sizes"].tolist()
        assert batch["image_index"] == [0, 0, 1, 2, 1, 2]  # chosen and rejected of a pair name the same images
        assert batch["image_token_count"] == int((batch["input_ids"] < 0).sum())
        assert [end - start for start, end in batch["sequence_bounds"]] == lengths
        flat_ids, flat_labels = batch["input_ids"].reshape(-1), batch["labels"].reshape(-1)
        seqs = [(e[f"{a}_input_ids"], e[f"{a}_labels"]) for e in examples for a in ("chosen", "rejected")]
        for (start, end), (ids, labels) in zip(batch["sequence_bounds"], seqs):
            assert torch.equal(flat_ids[start:end], ids) and torch.equal(flat_labels[start + 1 : end], labels[1:])
    assert padded["input_ids"].shape == (6, max(lengths)) and packed["input_ids"].shape == (1, sum(lengths))
    assert "reference_logps" not in padded
    with_ref = [
        {**e, "reference_chosen_logps": -1.0 - i, "reference_rejected_logps": -2.0 - i} for i, e in enumerate(examples)
    ]
    assert PairCollator(pad)(with_ref)["reference_logps"].tolist() == [-1.0, -2.0, -2.0, -3.0, -3.0, -4.0]
    with pytest.raises(ValueError, match="without precomputed reference log-probabilities: text"):
        PackedPairCollator(pad)([*with_ref[:2], examples[2]])


@pytest.fixture(scope="module")
def alone(policy, reference, examples) -> tuple[list, list]:
    """(log-prob, answer tokens) of every sequence run alone, in pair order: (policy's, reference's)."""
    return tuple([logps_alone(m, s) for e in examples for s in sequences_alone(e)] for m in (policy, reference))


def test_sequence_logps_equal_each_sequence_alone(policy, examples, alone, tiny_tokenizer):
    expected = alone[0]
    for collator in (
        PairCollator(tiny_tokenizer.pad_token_id),
        PackedPairCollator(tiny_tokenizer.pad_token_id, 700, SWITCH),
    ):
        with torch.no_grad():
            logps, tokens = sequence_logps(policy, collator(examples))
        assert logps.dtype == torch.float32 and tokens.tolist() == [n for _, n in expected]
        torch.testing.assert_close(
            logps.double(), torch.tensor([lp for lp, _ in expected], dtype=torch.float64), rtol=1e-5, atol=1e-4
        )


def test_token_logps_are_the_sft_loss_per_token(policy, examples, tiny_tokenizer):
    """The same chunked path as the SFT loss: minus the mean of the token log-probs is the model's loss."""
    batch = PairCollator(tiny_tokenizer.pad_token_id)(examples)
    inputs = model_inputs(batch)
    with torch.no_grad():
        token_logps = policy(**inputs, return_token_logps=True).token_logps
        loss = policy(**inputs).loss
    labelled = shifted_labels(batch["labels"]) != -100
    assert token_logps.shape == batch["labels"].shape and (token_logps[~labelled] == 0).all()
    assert (token_logps[labelled] < 0).all()
    torch.testing.assert_close(-token_logps.sum() / labelled.sum(), loss, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"image_index \[0, 3\] names images outside 0..2"):
        policy(**{**inputs, "image_index": [0, 3]})


@pytest.mark.parametrize(
    "loss_type, smoothing, sft_weight",
    [("sigmoid", 0.0, 0.0), ("sigmoid", 0.2, 0.0), ("sigmoid", 0.1, 0.7), ("ipo", 0.0, 0.0), ("ipo", 0.0, 0.3)],
)
def test_loss_equals_the_hand_computation(
    policy, reference, examples, alone, tiny_tokenizer, loss_type, smoothing, sft_weight
):
    alone_policy, alone_ref = alone
    pol = [(alone_policy[2 * i][0], alone_policy[2 * i + 1][0]) for i in range(len(examples))]
    ref = [(alone_ref[2 * i][0], alone_ref[2 * i + 1][0]) for i in range(len(examples))]
    tokens = [(alone_policy[2 * i][1], alone_policy[2 * i + 1][1]) for i in range(len(examples))]
    expected = hand_loss(pol, ref, tokens, loss_type, smoothing, sft_weight)
    batch = PairCollator(tiny_tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        step = preference_step(
            policy,
            batch,
            beta=BETA,
            loss_type=loss_type,
            label_smoothing=smoothing,
            sft_weight=sft_weight,
            reference=reference,
        )
    assert step.loss.dtype == torch.float32 and step.losses.shape == (3,)
    assert math.isclose(float(step.loss), expected, rel_tol=1e-5, abs_tol=1e-6)
    for i, ((pc, pr), (rc, rr), (nc, nr)) in enumerate(zip(pol, ref, tokens)):
        norm = (nc, nr) if loss_type == "ipo" else (1, 1)
        assert math.isclose(float(step.chosen_rewards[i]), BETA * (pc - rc) / norm[0], rel_tol=1e-4, abs_tol=1e-5)
        assert math.isclose(float(step.rejected_rewards[i]), BETA * (pr - rr) / norm[1], rel_tol=1e-4, abs_tol=1e-5)
    metrics = step.metrics()
    assert torch.equal(metrics["rewards/margins"], step.chosen_rewards - step.rejected_rewards)
    assert metrics["rewards/accuracies"].tolist() == [
        1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(step.chosen_rewards, step.rejected_rewards)
    ]
    if sft_weight:  # the step's loss over the pairs of an accumulated step: sum / num_pairs
        with torch.no_grad():
            summed = preference_step(
                policy,
                batch,
                beta=BETA,
                loss_type=loss_type,
                label_smoothing=smoothing,
                sft_weight=sft_weight,
                reference=reference,
                num_pairs=6,
            )
        assert math.isclose(float(summed.loss), expected * 3 / 6, rel_tol=1e-5, abs_tol=1e-6)


def test_loss_arguments_are_checked():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="pass chosen_tokens and rejected_tokens"):
        preference_loss(x, x, x, x, 0.1, "ipo")
    with pytest.raises(ValueError, match="label_smoothing applies to the sigmoid"):
        preference_loss(x, x, x, x, 0.1, "ipo", 0.1, chosen_tokens=x + 1, rejected_tokens=x + 1)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        preference_loss(x, x, x, x, 0.1, "sigmoid", 0.5)
    with pytest.raises(ValueError, match="beta must be > 0"):
        preference_loss(x, x, x, x, 0.0)
    with pytest.raises(ValueError, match="loss_type must be one of sigmoid, ipo"):
        preference_loss(x, x, x, x, 0.1, "hinge")
    with pytest.raises(ValueError, match="3 sequences are not pairs"):
        split_pairs(torch.zeros(3))
    # at h = 0 the DPO loss is log 2 whatever the smoothing; IPO's is (1 / (2 beta))^2
    losses, _, _ = preference_loss(x, x, x, x, 0.1, "sigmoid", 0.3)
    torch.testing.assert_close(losses, torch.full((2,), math.log(2)))
    losses, _, _ = preference_loss(x, x, x, x, 0.1, "ipo", chosen_tokens=x + 3, rejected_tokens=x + 5)
    torch.testing.assert_close(losses, torch.full((2,), 25.0))


# --------------------------------------------------------------------------------------------------------------------
def count_crops(model):
    """(crops through the CLIP tower per call, hook handle): a forward hook on the tower's embeddings."""
    seen: list[int] = []
    embeddings = model.model.vision_embed_tokens.img_processor.vision_model.embeddings
    return seen, embeddings.register_forward_hook(lambda module, args, out: seen.append(int(out.shape[0])))


def separate_step(model, examples, ref_chosen, ref_rejected, pad: int, sft_weight: float) -> torch.Tensor:
    """The straightforward build: every sequence its own forward with its own copy of the images."""
    logps, tokens = [], []
    for e in examples:
        for sample in sequences_alone(e):
            batch = Collator(pad)([sample])
            lp, n = sequence_logps(model, {**batch, "sequence_bounds": [(0, len(sample["input_ids"]))]})
            logps.append(lp)
            tokens.append(n)
    chosen, rejected = split_pairs(torch.cat(logps))
    n_chosen, n_rejected = split_pairs(torch.cat(tokens))
    losses, _, _ = preference_loss(
        chosen, rejected, ref_chosen, ref_rejected, BETA, chosen_tokens=n_chosen, rejected_tokens=n_rejected
    )
    return (losses - sft_weight * chosen / n_chosen).mean()


def test_images_once_per_pair_give_the_gradients_of_separate_sequences(tiny_tokenizer, reference, examples):
    model = tiny_model(tiny_tokenizer, seed=3).train()
    pad = tiny_tokenizer.pad_token_id
    crops, hook = count_crops(model)
    batch = PairCollator(pad)(examples)
    with torch.no_grad():
        ref_chosen, ref_rejected = split_pairs(reference_logps(model, batch, reference))
    step = preference_step(model, batch, beta=BETA, sft_weight=0.4, reference=reference)
    shared = grads_of(model, step.loss)
    crops_per_image = [1 + (h // 336) * (w // 336) for e in examples[:2] for h, w in e["image_sizes"].tolist()]
    assert crops == [sum(crops_per_image)]  # one vision pass for the batch, every pair's images once
    crops.clear()
    loss = separate_step(model, examples, ref_chosen, ref_rejected, pad, sft_weight=0.4)
    assert sum(crops) == 2 * sum(crops_per_image)  # the straightforward build runs every image twice
    torch.testing.assert_close(loss, step.loss, rtol=1e-5, atol=1e-6)
    separate = grads_of(model, loss)
    vision = [n for n in shared if "vision_embed_tokens.img_processor" in n]
    assert vision and all(float(shared[n].abs().max()) > 0 for n in vision[:3])  # the images' gradient is tested
    assert_same_grads(separate, shared)
    hook.remove()


@pytest.mark.parametrize(
    "loss_type, max_tokens, share_prompt", [("sigmoid", None, True), ("ipo", 700, True), ("ipo", 700, False)]
)
def test_packed_pairs_equal_padded_pairs(tiny_tokenizer, reference, examples, loss_type, max_tokens, share_prompt):
    model = tiny_model(tiny_tokenizer, seed=4).train()
    pad = tiny_tokenizer.pad_token_id
    padded = PairCollator(pad)(examples)
    packed = PackedPairCollator(pad, max_tokens, SWITCH, share_prompt=share_prompt)(examples)
    width = packed["input_ids"].shape[1]
    row_of = [start // width for start, _ in packed["sequence_bounds"]]
    if max_tokens is None:
        assert packed["input_ids"].shape[0] == 1
    elif share_prompt:  # rows [c0 r0] [c1 r1 c2 r2]: a pair's prompt + both answers are one unit, never split
        assert row_of == [0, 0, 1, 1, 1, 1]
    else:  # rows [c0 r0] [c1] [r1 c2] [r2]: the two-image pair's answers, and the text pair's, in different rows
        assert row_of == [0, 0, 1, 2, 2, 3]
    assert ("branch_positions" in packed) == share_prompt
    assert packed["rope_use_long"].any() and not packed["rope_use_long"].all()
    steps, grads = [], []
    for batch in (padded, packed):
        step = preference_step(model, batch, beta=BETA, loss_type=loss_type, sft_weight=0.5, reference=reference)
        steps.append(step)
        grads.append(grads_of(model, step.loss))
    torch.testing.assert_close(steps[1].loss, steps[0].loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(steps[1].policy_chosen, steps[0].policy_chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(steps[1].reference_rejected, steps[0].reference_rejected, rtol=1e-5, atol=1e-5)
    assert_same_grads(grads[0], grads[1])


def test_packed_pairs_share_the_prompt_unless_the_answers_straddle_the_rope_switch(tiny_tokenizer, examples):
    """Shared prompt: [prompt + chosen][last prompt token + rejected], the branch's positions continuing the prompt's,
    the images once; a pair whose sequences take different su-RoPE factor sets is packed as two full sequences.
    Either way every sequence's log-probability and the gradients are those of the padded batch."""
    pad = tiny_tokenizer.pad_token_id
    switch = 337  # pair 0's chosen sequence (335 tokens) takes the short factors, its rejected one (340) the long
    lengths = [(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in examples]
    assert lengths[0][0] <= switch < lengths[0][1] and all(min(n) > switch or max(n) <= switch for n in lengths[1:])
    packed = PackedPairCollator(pad, None, switch)(examples)
    prompts = [e["prompt_length"] for e in examples]
    c, r = lengths[0]
    units = [c + r] + [c2 + r2 - n + 1 for (c2, r2), n in zip(lengths[1:], prompts[1:])]
    assert packed["input_ids"].shape == (1, sum(units)) and packed["num_tokens"] == sum(units)
    assert packed["image_index"] == [0, 0, 1, 2]  # pair 0's image twice (two sequences), pair 1's two images once
    assert packed["image_token_count"] == int((packed["input_ids"] < 0).sum())
    flat_ids, positions = packed["input_ids"].reshape(-1), packed["position_ids"].reshape(-1)
    bounds = packed["sequence_bounds"]
    for i, e in enumerate(examples[1:], start=1):  # the shared pairs: the branch re-reads the last prompt token
        n = e["prompt_length"]
        (c0, c1), (r0, r1) = bounds[2 * i], bounds[2 * i + 1]
        assert c1 == r0 and torch.equal(flat_ids[c0:c1], e["chosen_input_ids"])
        assert torch.equal(flat_ids[r0:r1], e["rejected_input_ids"][n - 1 :])
        assert positions[r0:r1].tolist() == list(range(n - 1, len(e["rejected_input_ids"])))
    assert packed["branch_positions"].tolist() == [p for (_, _), (r0, r1) in zip(bounds[2::2], bounds[3::2])
                                                   for p in range(r0, r1)]  # fmt: skip
    model = _tiny_model(tiny_tokenizer, seed=6, original_max_position_embeddings=switch)
    set_rope_per_sample(model)
    model.set_attn_implementation(ATTN_NAME)
    model.train()
    results = []
    for batch in (PairCollator(pad)(examples), packed):
        logps, tokens = sequence_logps(model, batch)
        results.append((logps.detach(), tokens, grads_of(model, logps.sum())))
    (lp_pad, n_pad, g_pad), (lp_pack, n_pack, g_pack) = results
    assert n_pack.tolist() == n_pad.tolist()
    torch.testing.assert_close(lp_pack, lp_pad, rtol=1e-5, atol=1e-4)
    assert_same_grads(g_pad, g_pack, floor=1e-8)
    unshared = PackedPairCollator(pad, None, switch, share_prompt=False)(examples)
    assert unshared["input_ids"].shape == (1, sum(map(sum, lengths))) and "branch_positions" not in unshared


# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_pair(tiny_tokenizer):
    """(base model, PEFT LoRA model on a copy of it with non-zero adapter weights)."""
    from peft import LoraConfig, get_peft_model

    base = tiny_model(tiny_tokenizer, seed=5).train()
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], init_lora_weights=False
    )
    lora = get_peft_model(copy.deepcopy(base), config)
    return base, lora


def test_reference_is_the_base_with_adapters_disabled(lora_pair, examples, tiny_tokenizer):
    base, lora = lora_pair
    for batch in (
        PairCollator(tiny_tokenizer.pad_token_id)(examples),
        PackedPairCollator(tiny_tokenizer.pad_token_id)(examples),
    ):
        ref = reference_logps(lora, batch)
        with torch.no_grad():
            expected, _ = sequence_logps(base, batch)
            with_adapters, _ = sequence_logps(lora, batch)
        torch.testing.assert_close(ref, expected, rtol=1e-6, atol=1e-5)
        assert float((with_adapters - expected).abs().min()) > 1e-3  # the adapters change every sequence's log-prob
        assert not ref.requires_grad
    after, _ = sequence_logps(lora, batch)  # adapters are on again after the block
    torch.testing.assert_close(after.detach(), with_adapters)
    with pytest.raises(ValueError, match="has no PEFT adapters: pass a reference model"):
        reference_logps(base, batch)


def test_precomputed_reference_equals_on_the_fly(lora_pair, examples, tiny_tokenizer):
    _, lora = lora_pair
    pad = tiny_tokenizer.pad_token_id
    # computed in other batches (one pair each, padded) than the training batch (all pairs, packed)
    table = precompute_reference(lora, [PairCollator(pad)([e]) for e in examples])
    assert sorted(table) == sorted(e["id"] for e in examples)
    with pytest.raises(ValueError, match="pair id 'text' occurs twice"):
        precompute_reference(lora, [PairCollator(pad)(examples[2:]), PairCollator(pad)(examples[2:])])
    stored = [
        {**e, "reference_chosen_logps": table[e["id"]][0], "reference_rejected_logps": table[e["id"]][1]}
        for e in examples
    ]
    results = []
    for batch in (PackedPairCollator(pad)(examples), PackedPairCollator(pad)(stored)):
        step = preference_step(lora, batch, beta=BETA, loss_type="sigmoid", label_smoothing=0.1)
        results.append((step, grads_of(lora, step.loss)))
    (fly, fly_grads), (pre, pre_grads) = results
    torch.testing.assert_close(pre.reference_chosen, fly.reference_chosen, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(pre.reference_rejected, fly.reference_rejected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(pre.loss, fly.loss, rtol=1e-6, atol=1e-7)
    assert_same_grads(fly_grads, pre_grads, at_least=16)
    assert all("lora_" in n for n in fly_grads)  # only the adapters train
