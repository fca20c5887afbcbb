"""Prompt -> ids exactly as the published processor, with the real Phi-3 vision tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from phi3v_tune import Phi3VProcessor
from phi3v_tune.processing.image import Phi3VImageProcessor


def img(w: int, h: int) -> Image.Image:
    return Image.fromarray(np.full((h, w, 3), 120, dtype=np.uint8))


@pytest.fixture(scope="module")
def real(real_tokenizer_dir, published_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    for f in real_tokenizer_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "preprocessor_config.json").write_bytes((published_dir / "preprocessor_config.json").read_bytes())
    return Phi3VProcessor.from_pretrained(folder)


def test_reference_example_ids(real):
    prompt = real.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<|image_1|>\nQ"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|user|>\n<|image_1|>\nQ<|end|>\n<|assistant|>\n"
    image = img(336, 336)
    out = real(text=prompt, images=[image])
    ids = out["input_ids"][0].tolist()
    n = 2509  # a square image at num_crops 16 -> 4x4 grid
    assert ids[:4] == [1, 32010, 29871, 13]
    assert ids[4 : 4 + n] == [-1] * n
    assert ids[4 + n :] == [1, 29871, 13, 29984, 32007, 29871, 13, 32001]
    assert out["attention_mask"].tolist() == [[1] * len(ids)]
    assert out["pixel_values"].shape == (1, 17, 3, 336, 336)
    assert out["image_sizes"].tolist() == [[1344, 1344]]


def test_answer_ids_and_special_ids(real):
    tok = real.tokenizer
    assert tok("Paris<|end|>\n<|endoftext|>", add_special_tokens=False)["input_ids"] == [3681, 32007, 29871, 13, 32000]
    ids = {
        t: tok.convert_tokens_to_ids(t)
        for t in ["<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>", "<|image|>"]
    }
    assert ids == {
        "<s>": 1,
        "</s>": 2,
        "<|endoftext|>": 32000,
        "<|assistant|>": 32001,
        "<|system|>": 32006,
        "<|end|>": 32007,
        "<|user|>": 32010,
        "<|image|>": 32044,
    }
    assert tok.pad_token_id == tok.eos_token_id == 32000
    assert real.stop_token_ids == [32007, 32000]


def test_token_count_for_1000x500_image(real):
    out = real(text="<|image_1|>", images=[img(1000, 500)])
    assert out["image_sizes"].tolist() == [[1008, 1680]]
    assert int((out["input_ids"] == -1).sum()) == 2353


def test_bos_follows_every_image_and_adjacent_tags(real):
    p = Phi3VProcessor(real.tokenizer, Phi3VImageProcessor(num_crops=1))
    out = p(text="<|image_1|><|image_2|>\nHi", images=[img(50, 80), img(80, 50)])
    ids = out["input_ids"][0].tolist()
    # chunk "" -> [bos]; image 1 (313); chunk "" -> [bos]; image 2 (313); chunk "\nHi" -> [bos, ...]
    assert ids[0] == 1 and ids[1:314] == [-1] * 313 and ids[314] == 1 and ids[315:628] == [-2] * 313
    assert ids[628] == 1
    assert out["pixel_values"].shape == (2, 2, 3, 336, 336)  # num_crops=1 quirk: 2 crops per image


@pytest.mark.parametrize("side", ["left", "right"])
def test_batching_with_padding(real, side):
    texts = ["<|user|>\n<|image_1|>\nA<|end|>\n<|assistant|>\n", "<|user|>\nJust text, longer<|end|>\n<|assistant|>\n"]
    p = Phi3VProcessor(real.tokenizer, Phi3VImageProcessor(num_crops=1))
    batch = p(text=texts, images=[img(100, 100)], padding=True, padding_side=side)
    singles = [p(text=texts[0], images=[img(100, 100)]), p(text=texts[1])]
    width = batch["input_ids"].shape[1]
    for b, single in enumerate(singles):
        n = single["input_ids"].shape[1]
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        assert batch["input_ids"][b, sl].tolist() == single["input_ids"][0].tolist()
        assert int(batch["attention_mask"][b].sum()) == n
        pad = torch.ones(width, dtype=torch.bool)
        pad[sl] = False
        assert (batch["input_ids"][b, pad] == 32000).all()
    assert batch["pixel_values"].shape[0] == 1


def test_batch_images_as_lists_per_prompt(real):
    p = Phi3VProcessor(real.tokenizer, Phi3VImageProcessor(num_crops=1))
    out = p(
        text=["<|image_1|>a", "b", "<|image_1|><|image_2|>c"],
        images=[[img(40, 40)], [], [img(40, 40), img(9, 9)]],
        padding=True,
    )
    assert out["pixel_values"].shape[0] == 3
    assert [int((out["input_ids"][i] < 0).sum()) for i in range(3)] == [313, 0, 626]


@pytest.mark.parametrize(
    "text,n_images,message",
    [
        ("<|image_2|>", 1, "numbered 1..n"),
        ("<|image_1|><|image_3|>", 2, "numbered 1..n"),
        ("<|image_1|><|image_1|>", 1, "more than once"),
        ("<|image_1|>", 2, "1 image tag(s) but 2 image(s)"),
        ("no tags", 1, "0 image tag(s) but 1 image(s)"),
    ],
)
def test_clear_errors_for_tag_problems(real, text, n_images, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        real(text=text, images=[img(20, 20)] * n_images)
    with pytest.raises(AssertionError):  # what the published processor's assertions raise, for code that catches it
        real(text=text, images=[img(20, 20)] * n_images)


def test_bad_images_and_num_crops_raise_value_errors(real, tmp_path):
    with pytest.raises(ValueError):
        Phi3VProcessor.from_pretrained(tmp_path, num_crops=0)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        real(text="<|image_1|>", images=[str(bad)])
    with pytest.raises(ValueError, match="not found"):
        real(text="<|image_1|>", images=[str(tmp_path / "missing.jpg")])


def test_non_rgb_modes_are_converted(real):
    rgba = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    for image in [rgba, Image.new("L", (40, 30), 7), Image.new("P", (40, 30)), Image.new("CMYK", (40, 30))]:
        out = real(text="<|image_1|>", images=[image])
        assert out["pixel_values"].shape[1:] == (17, 3, 336, 336)


def test_save_and_reload_keeps_everything(real, real_tokenizer_dir, tmp_path):
    p = Phi3VProcessor(real.tokenizer, Phi3VImageProcessor(num_crops=4))
    p.save_pretrained(tmp_path)
    # the tokenizer files as published (LlamaTokenizer class, chat template inside), not transformers 5's rewrite
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (real_tokenizer_dir / name).read_bytes(), name
    again = Phi3VProcessor.from_pretrained(tmp_path)
    assert again.num_crops == 4
    assert again.tokenizer("<|user|>\n")["input_ids"] == [1, 32010, 29871, 13]
    assert Phi3VProcessor.from_pretrained(tmp_path, num_crops=16).num_crops == 16


def test_max_image_pixels_is_a_loading_keyword_never_saved(tiny_tokenizer, tmp_path):
    """`max_image_pixels` is given when the processor is built (what `train` does with --max-image-pixels), refuses
    larger images, and never lands in preprocessor_config.json (the published format has no such key)."""
    import json

    Phi3VProcessor.from_tokenizer(tiny_tokenizer, num_crops=4, max_image_pixels=1000).save_pretrained(tmp_path)
    assert "max_image_pixels" not in json.loads((tmp_path / "preprocessor_config.json").read_text())
    strict = Phi3VProcessor.from_pretrained(tmp_path, max_image_pixels=1000)
    assert strict.num_crops == 4 and strict.image_processor.max_image_pixels == 1000
    with pytest.raises(ValueError, match="max_image_pixels=1000"):
        strict(text="<|image_1|>", images=[img(40, 30)])
    assert strict(text="<|image_1|>", images=[img(40, 25)])["pixel_values"].shape[0] == 1
    default = Phi3VProcessor.from_pretrained(tmp_path)
    assert default.image_processor.max_image_pixels == 178_956_970
    assert Phi3VProcessor.from_pretrained(tmp_path, max_image_pixels=None).image_processor.max_image_pixels is None
    assert Phi3VImageProcessor.from_pretrained(tmp_path, max_image_pixels=5).max_image_pixels == 5


def test_saved_preprocessor_config_has_the_published_keys(real, tmp_path, published_dir):
    """Every key of the published preprocessor_config.json, auto_map included (the publisher's remote code finds
    its classes through it), with the published values at the published num_crops."""
    import json

    real.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    published = json.loads((published_dir / "preprocessor_config.json").read_text())
    assert saved == published


def test_truncation_and_return_tensors(real):
    """Text-only prompts are cut to max_length as the tokenizer cuts them; prompts with images are not (a warning
    says so, as the published processor leaves them whole); return_tensors="np" gives numpy arrays."""
    import numpy as np

    text = "<|user|>\nA long question about nothing at all<|end|>\n<|assistant|>\n"
    full = real(text=text)["input_ids"][0].tolist()
    cut = real(text=text, truncation=True, max_length=5)
    assert cut["input_ids"][0].tolist() == full[:5] == real.tokenizer(text, truncation=True, max_length=5)["input_ids"]
    assert cut["attention_mask"].tolist() == [[1] * 5]
    with pytest.warns(UserWarning, match="not applied to prompts with images"):
        kept = real(text="<|image_1|>" + text, images=[Image.new("RGB", (40, 30))], truncation=True, max_length=5)
    assert kept["input_ids"].shape[1] > 5
    as_np = real(text="<|image_1|>" + text, images=[Image.new("RGB", (40, 30))], return_tensors="np")
    assert all(isinstance(v, np.ndarray) for v in as_np.values())
    assert as_np["input_ids"].tolist() == kept["input_ids"].tolist()
    with pytest.raises(ValueError, match="return_tensors"):
        real(text=text, return_tensors="tf")
