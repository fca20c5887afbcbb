"""`build_example`: the recipe's ids and labels for single turns; one conversation for several turns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from phi3v_tune import Phi3VProcessor
from phi3v_tune.data import Record, SampleLayout, Turn
from phi3v_tune.data.examples import IGNORE_INDEX, SampleRefused, build_example
from phi3v_tune.processing.image import Phi3VImageProcessor


def img(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def proc(real_tokenizer_dir):
    from phi3v_tune.processing.tokenizer import load_tokenizer

    return Phi3VProcessor(load_tokenizer(real_tokenizer_dir), Phi3VImageProcessor(num_crops=1))


def test_single_turn_equals_the_original_recipe(proc):
    images = [img(64, 48, 1), img(48, 64, 2)]
    rec = Record("a", None, [Turn("What differs?", "The colour.", images)])
    ex = build_example(rec, proc)
    # the recipe: tags prepended, chat template with generation prompt, answer tokenized without bos
    prompt = proc.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<|image_1|><|image_2|>\nWhat differs?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompt_ids = proc(text=prompt, images=images)["input_ids"][0].tolist()
    answer_ids = proc.tokenizer("The colour.<|end|>\n<|endoftext|>", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"].tolist() == prompt_ids + answer_ids
    assert ex["labels"].tolist() == [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    assert answer_ids[-5:] == [32007, 29871, 13, 32000][-4:] or answer_ids[-4:] == [32007, 29871, 13, 32000]
    assert ex["attention_mask"].tolist() == [1] * len(prompt_ids + answer_ids)  # <|endoftext|> (= pad) stays visible
    assert ex["pixel_values"].shape == (2, 2, 3, 336, 336)


def test_docvqa_row_gets_the_recipes_docvqa_prompt(proc, tmp_path):
    """A DocVQA mini-split row (image, query.en, answers) trains and is asked as the recipe's DocVQA script does:
    user content `<|image_1|>\\n{question}\\nAnswer briefly.`, answer = the first gold answer."""
    import datasets

    from phi3v_tune.data import load_records

    page = img(60, 80, 3)
    features = datasets.Features(
        {"image": datasets.Image(), "query": {"en": datasets.Value("string")}, "answers": [datasets.Value("string")]}
    )
    table = datasets.Dataset.from_dict(
        {"image": [page], "query": [{"en": "What is the date?"}], "answers": [["1 May", "May 1"]]}, features=features
    )
    table.save_to_disk(str(tmp_path / "docvqa"))
    records, problems = load_records(tmp_path / "docvqa", split="train")
    assert problems == []
    ex = build_example(records[0], proc)
    prompt = proc.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<|image_1|>\nWhat is the date?\nAnswer briefly."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompt_ids = proc(text=prompt, images=[page])["input_ids"][0].tolist()
    answer_ids = proc.tokenizer("1 May<|end|>\n<|endoftext|>", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"].tolist() == prompt_ids + answer_ids
    assert ex["labels"].tolist() == [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    asked = build_example(records[0], proc, for_generation=True)
    assert asked["input_ids"].tolist() == prompt_ids
    assert records[0].answers == ["1 May", "May 1"]  # every gold answer is scored by ANLS


def test_cauldron_nlvr2_row_in_the_recipe_layout_equals_its_nlvr2_script(proc, tmp_path):
    """the_cauldron `nlvr2` row, `--multi-turn recipe`: turn 0 `<|image_1|><|image_2|>\\n{q}` with the images, later
    turns the bare question (no leading newline), each its own prompt + `{answer}<|end|>\\n<|endoftext|>`."""
    import datasets

    from phi3v_tune.data import load_records

    left, right = img(50, 40, 5), img(40, 50, 6)
    texts = [{"user": "Both have dogs.", "assistant": "True", "source": "nlvr2"}]
    texts.append({"user": "The left one is red.", "assistant": "False", "source": "nlvr2"})
    datasets.Dataset.from_dict({"images": [[left, right]], "texts": [texts]}).save_to_disk(str(tmp_path / "nlvr2"))
    (record,), problems = load_records(tmp_path / "nlvr2", split="train")
    assert problems == []
    ex = build_example(record, proc, SampleLayout(multi_turn="recipe"))
    want_ids: list[int] = []
    want_labels: list[int] = []
    for i, text in enumerate(texts):
        content = "<|image_1|><|image_2|>\n" + text["user"] if i == 0 else text["user"]
        prompt = proc.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = proc(text=prompt, images=[left, right] if i == 0 else None)["input_ids"][0].tolist()
        answer = proc.tokenizer(text["assistant"] + "<|end|>\n<|endoftext|>", add_special_tokens=False)["input_ids"]
        want_ids += prompt_ids + answer
        want_labels += [IGNORE_INDEX] * len(prompt_ids) + answer
    assert ex["input_ids"].tolist() == want_ids and ex["labels"].tolist() == want_labels


def test_three_turn_two_image_conversation_learns_every_answer(proc):
    rec = Record(
        "conv",
        None,
        [
            Turn("Describe the first.", "A red square.", [img(40, 40, 3)]),
            Turn("And now?", "Nothing new.", []),
            Turn("Compare with this one.", "It is bigger.", [img(50, 30, 4)]),
        ],
    )
    ex = build_example(rec, proc)
    spans, current = [], []
    for token, label in zip(ex["input_ids"].tolist(), ex["labels"].tolist()):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans.append(current)
    tok = proc.tokenizer
    assert [tok.decode(s, skip_special_tokens=True).strip() for s in spans] == [
        "A red square.",
        "Nothing new.",
        "It is bigger.",
    ]
    decoded = [tok.decode(s, skip_special_tokens=False).replace(" \n", "\n") for s in spans]
    assert decoded == ["A red square.<|end|>\n", "Nothing new.<|end|>\n", "It is bigger.<|end|>\n<|endoftext|>"]
    assert [s[-3:] for s in spans[:2]] == [[32007, 29871, 13]] * 2 and spans[2][-4:] == [32007, 29871, 13, 32000]
    # the same ids as the published processor on the whole conversation (images numbered across turns)
    whole = proc.tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "<|image_1|>\nDescribe the first."},
            {"role": "assistant", "content": "A red square."},
            {"role": "user", "content": "\nAnd now?"},  # the recipe's "".join(tags) + "\n" + text, with no tag
            {"role": "assistant", "content": "Nothing new."},
            {"role": "user", "content": "<|image_2|>\nCompare with this one."},
            {"role": "assistant", "content": "It is bigger."},
        ],
        tokenize=False,
    )
    ref = proc(text=whole + "<|endoftext|>", images=[img(40, 40, 3), img(50, 30, 4)])["input_ids"][0].tolist()
    assert ex["input_ids"].tolist() == ref
    assert (ex["input_ids"] == -2).sum() == 313


def test_a_turn_without_images_gets_the_recipes_newline(proc):
    """The recipe's reader builds the user content as "".join(tags) + "\\n" + text, so a text-only turn starts with
    "\\n" as well: <|user|>\\n then \\n then the text."""
    ex = build_example(Record("t", None, [Turn("Just text", "ok", [])]), proc)
    prompt = proc.tokenizer.apply_chat_template(
        [{"role": "user", "content": "\nJust text"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.startswith("<|user|>\n\nJust text<|end|>")
    expected = proc(text=prompt)["input_ids"][0].tolist()
    assert ex["input_ids"].tolist()[: len(expected)] == expected
    assert expected[:5] == [1, 32010, 29871, 13, 13]


def test_tags_placed_out_of_order_get_their_own_images(proc):
    """ "<|image_2|> vs <|image_1|>": the model fills image positions in order of appearance, so image 2's pixels come
    first, as the processor stores them; each placeholder block has its own image's token count."""
    wide, square = img(1000, 500, 3), img(300, 300, 4)
    rec = Record("t", None, [Turn("<|image_2|> vs <|image_1|>: same?", "no", [wide, square])])
    ex = build_example(rec, proc)
    prompt = proc.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<|image_2|> vs <|image_1|>: same?"}], tokenize=False, add_generation_prompt=True
    )
    ref = proc(text=prompt, images=[wide, square])
    assert ex["input_ids"].tolist()[: len(ref["input_ids"][0])] == ref["input_ids"][0].tolist()
    assert torch.equal(ex["image_sizes"], ref["image_sizes"]) and torch.equal(ex["pixel_values"], ref["pixel_values"])
    alone = [proc.image_processor([im]) for im in (square, wide)]  # appearance order: image 2, then image 1
    assert ex["image_sizes"].tolist() == [a["image_sizes"][0].tolist() for a in alone]
    ids = ex["input_ids"]
    assert [int((ids == -k).sum()) for k in (2, 1)] == [a["num_img_tokens"][0] for a in alone]


def test_tags_in_user_text_are_used_where_they_stand(proc):
    rec = Record("t", None, [Turn("Left: <|image_1|> right: <|image_2|> same?", "no", [img(30, 30), img(31, 31)])])
    ex = build_example(rec, proc)
    prompt = proc.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Left: <|image_1|> right: <|image_2|> same?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    expected = proc(text=prompt, images=[img(30, 30), img(31, 31)])["input_ids"][0].tolist()
    assert ex["input_ids"].tolist()[: len(expected)] == expected
    bad = Record("b", None, [Turn("<|image_2|> only", "x", [img(30, 30)])])
    with pytest.raises(ValueError, match="numbered across the conversation"):
        build_example(bad, proc)


def test_raw_jsonl_object_with_image_dir(proc, tmp_path):
    (tmp_path / "images").mkdir()
    img(60, 40).save(tmp_path / "images" / "x.png")
    ex = build_example(
        {"id": 7, "conversations": [{"images": ["x.png"], "user": "Q", "assistant": "A"}]}, proc, image_dir=tmp_path
    )
    assert ex["id"] == "7" and ex["pixel_values"].shape[0] == 1


def test_max_length_cuts_text_after_the_last_image_only(proc):
    rec = Record("m", None, [Turn("Q " * 20, "A long answer " * 10, [img(40, 40)])])
    full = build_example(rec, proc)
    n = full["input_ids"].shape[0]
    image_end = int((full["input_ids"] < 0).nonzero().max()) + 1
    cut = build_example(rec, proc, SampleLayout(max_length=n - 5))
    assert cut["truncated"] and cut["input_ids"].tolist() == full["input_ids"].tolist()[: n - 5]
    assert cut["labels"].tolist() == full["labels"].tolist()[: n - 5]
    with pytest.raises(SampleRefused, match="images alone need") as err:
        build_example(rec, proc, SampleLayout(max_length=image_end - 1))
    assert err.value.reason == "images_exceed_max_length" and err.value.record_id == "m"
    with pytest.raises(SampleRefused, match="no answer token"):
        build_example(rec, proc, SampleLayout(max_length=image_end + 3))


def test_header_only_lengths_equal_real_lengths(proc):
    rec = Record("h", None, [Turn("Q", "A", [img(700, 300), img(20, 900)])])
    p16 = Phi3VProcessor(proc.tokenizer, Phi3VImageProcessor(num_crops=16))
    a = build_example(rec, p16)
    b = build_example(rec, p16, load_pixels=False)
    assert a["input_ids"].tolist() == b["input_ids"].tolist() and "pixel_values" not in b


def test_generation_prompt_leaves_the_last_answer_out(proc):
    rec = Record("g", None, [Turn("Q", "A", [img(30, 30)])])
    ex = build_example(rec, proc, for_generation=True)
    assert ex["input_ids"].tolist()[-1] == 32001  # ends with <|assistant|>
    assert (ex["labels"] == IGNORE_INDEX).all()


def test_recipe_multi_turn_layout_is_each_turn_as_its_own_prompt(proc):
    """--multi-turn recipe: what the recipe's reader builds, turn by turn (its own <s>, images numbered from 1, the
    answer with <|end|>\\n<|endoftext|>), concatenated; pixels turn after turn, each in order of appearance."""
    from phi3v_tune.data.dataset import plan_records

    a, b, c = img(40, 40, 3), img(700, 336, 4), img(336, 700, 5)
    turns = [
        Turn("Describe the first.", "A red square.", [a]),
        Turn("And now?", "Nothing new."),
        Turn("<|image_2|> or <|image_1|>: which is wider?", "The second.", [b, c]),
    ]
    rec = Record("r", None, turns)
    ex = build_example(rec, proc, SampleLayout(multi_turn="recipe"))
    ids, labels, pixels, sizes = [], [], [], []
    for user, answer, images in [
        ("<|image_1|>\nDescribe the first.", "A red square.", [a]),
        ("\nAnd now?", "Nothing new.", []),
        ("<|image_2|> or <|image_1|>: which is wider?", "The second.", [b, c]),
    ]:
        prompt = proc.tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        out = proc(text=prompt, images=images or None)
        answer_ids = proc.tokenizer(answer + "<|end|>\n<|endoftext|>", add_special_tokens=False)["input_ids"]
        ids += out["input_ids"][0].tolist() + answer_ids
        labels += [IGNORE_INDEX] * out["input_ids"].shape[1] + answer_ids
        if images:
            pixels.append(out["pixel_values"])
            sizes.append(out["image_sizes"])
    assert ex["input_ids"].tolist() == ids and ex["labels"].tolist() == labels
    assert torch.equal(ex["pixel_values"], torch.cat(pixels)) and torch.equal(ex["image_sizes"], torch.cat(sizes))
    assert ids.count(1) == 3 + 3  # a <s> opening every turn and one after each of the 3 images
    assert [x for x in labels if x != IGNORE_INDEX].count(32000) == 3  # <|endoftext|> after every answer
    # planning from image headers gives the built length; the default layout is still one conversation
    (length,) = plan_records([rec], proc, SampleLayout(multi_turn="recipe"), progress=False).lengths
    assert length == len(ids)
    with pytest.raises(ValueError, match="numbered across the conversation"):  # the default numbers across turns
        build_example(rec, proc)
    with pytest.raises(ValueError, match="multi_turn must be one of conversation, recipe"):
        build_example(rec, proc, SampleLayout(multi_turn="turns"))


@pytest.mark.parametrize("multi_turn", ["conversation", "recipe"])
def test_questions_with_placed_tags_are_scored_one_by_one(proc, multi_turn):
    """Evaluation splits a record into its questions, each with all of the record's images: tags a question places
    stay where they stand (numbered across the record), the other images are tagged in front of it."""
    from phi3v_tune.evaluate.runner import split_questions

    a, b = img(40, 40, 1), img(50, 40, 2)
    second = "and <|image_2|>?" if multi_turn == "conversation" else "and <|image_1|>?"
    rec = Record("r", None, [Turn("<|image_1|> what?", "x", [a]), Turn(second, "y", [b])])
    questions = split_questions([rec], SampleLayout(multi_turn=multi_turn))
    assert [q.turns[0].user for q in questions] == ["<|image_2|>\n<|image_1|> what?", "<|image_1|>\nand <|image_2|>?"]
    for q in questions:
        ex = build_example(q, proc, for_generation=True)
        prompt = proc.tokenizer.apply_chat_template(
            [{"role": "user", "content": q.turns[0].user}], tokenize=False, add_generation_prompt=True
        )
        ref = proc(text=prompt, images=[a, b])
        assert ex["input_ids"].tolist() == ref["input_ids"][0].tolist()
        assert torch.equal(ex["pixel_values"], ref["pixel_values"])


def test_data_layer_public_names(proc):
    """`phi3v_tune.data` gives what a user of the data layer needs: `build_example` (the same function as in
    `data.examples`), the `SampleLayout` it takes, and the multi-turn choices next to it."""
    import phi3v_tune.data as data
    from phi3v_tune.data import MULTI_TURN, SampleLayout
    from phi3v_tune.data import build_example as public_build_example
    from phi3v_tune.data.video import DEFAULT_VIDEO_FRAMES

    assert {"build_example", "SampleLayout", "MULTI_TURN", "SampleRefused", "Collator"} <= set(data.__all__)
    assert all(getattr(data, name) is not None for name in data.__all__)
    assert public_build_example is build_example and MULTI_TURN == ("conversation", "recipe")
    assert SampleLayout() == SampleLayout(None, "conversation", DEFAULT_VIDEO_FRAMES) and DEFAULT_VIDEO_FRAMES == 8
    with pytest.raises(AttributeError, match="frozen|cannot assign"):
        SampleLayout().max_length = 5  # type: ignore[misc]
    with pytest.raises(ValueError, match="frames per video must be >= 1, got 0"):
        SampleLayout(video_frames=0)
    rec = Record("p", None, [Turn("What is it?", "A dot.", [img(40, 30)])])
    ex = public_build_example(rec, proc, SampleLayout(max_length=1000))
    assert ex["id"] == "p" and ex["pixel_values"].shape[0] == 1 and not ex["truncated"]
    assert int((ex["labels"] != IGNORE_INDEX).sum()) == len(
        proc.tokenizer("A dot.<|end|>\n<|endoftext|>", add_special_tokens=False)["input_ids"]
    )
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        data.nothing  # noqa: B018
