"""Tests for the Phi-3.5-vision image processor against REFERENCE.md section 2.

The expected values are recomputed here with different primitives (brute-force scale search, ImageOps.expand padding,
numpy tiling) so that a mistake in the implementation is not simply mirrored by the test.
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from phi3v_tune.processing.image import (
    CLIP_MEAN,
    CLIP_STD,
    Phi3VImageProcessor,
    hd_size,
    hd_transform,
    load_image,
    num_image_tokens,
)

FIXTURE_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "phi-3.5-vision-instruct"
MEAN = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
STD = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
WHITE = ((torch.ones(3, 1, 1) - MEAN) / STD).view(3)  # normalised value of a 255 pixel


# ------------------------------------------------------------------------------------------------ independent reference


def ref_geometry(width: int, height: int, n: int) -> tuple[bool, int, int, int, int]:
    """(transposed, new_w, new_h, padded_h, top) in landscape orientation, written from the spec text."""
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = max(s for s in range(1, n + 1) if s * math.ceil(s / ratio) <= n)
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    target = -(-new_h // 336) * 336
    return transposed, new_w, new_h, target, int((target - new_h) / 2)


def ref_padded(img: Image.Image, n: int) -> Image.Image:
    transposed, new_w, new_h, target, top = ref_geometry(*img.size, n)
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    img = img.resize((new_w, new_h), Image.BILINEAR)
    img = ImageOps.expand(img, border=(0, top, 0, target - new_h - top), fill=(255, 255, 255))
    if transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    return img


def ref_normalized(img: Image.Image, n: int) -> torch.Tensor:
    arr = np.asarray(ref_padded(img, n)).astype(np.float32) / np.float32(255)
    x = torch.tensor(arr).permute(2, 0, 1).contiguous()
    return (x - MEAN) / STD


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------ tokens and geometry


@pytest.mark.parametrize(
    ("h", "w", "tokens"), [(336, 336, 313), (672, 672, 757), (1344, 1344, 2509), (1008, 1680, 2353)]
)
def test_num_image_tokens(h, w, tokens):
    assert num_image_tokens(h, w) == tokens


def test_num_image_tokens_formula_every_grid():
    for h in range(1, 17):
        for w in range(1, 17):
            expected = (h * w + 1) * 144 + 1 + (h + 1) * 12
            assert num_image_tokens(h * 336, w * 336) == expected
    with pytest.raises(ValueError):
        num_image_tokens(300, 336)


@pytest.mark.parametrize(("n", "side", "tokens"), [(1, 336, 313), (4, 672, 757), (16, 1344, 2509)])
def test_square_grids_end_to_end(n, side, tokens):
    out = Phi3VImageProcessor(num_crops=n)([noise(50, 50)])
    assert out["image_sizes"].tolist() == [[side, side]]
    assert out["num_img_tokens"] == [tokens]
    assert out["pixel_values"].shape == (1, n + 1, 3, 336, 336)


def test_reference_example_1000x500():
    transposed, new_w, new_h, target, top = ref_geometry(1000, 500, 16)
    assert (transposed, new_w, new_h, target, top) == (False, 1680, 840, 1008, 84)
    assert hd_size(1000, 500, 16) == (1008, 1680)
    proc = Phi3VImageProcessor()
    out = proc([noise(1000, 500)])
    assert out["pixel_values"].shape == (1, 17, 3, 336, 336)
    assert out["pixel_values"].dtype == torch.float32
    assert out["image_sizes"].dtype == torch.long
    assert out["image_sizes"].tolist() == [[1008, 1680]]
    assert out["num_img_tokens"] == [2353]
    assert proc.num_tokens_for_size(1000, 500) == 2353


def test_portrait_is_transposed():
    assert hd_size(500, 1000, 16) == (1680, 1008)
    img = noise(500, 1000, seed=3)
    out = Phi3VImageProcessor()([img])
    assert out["image_sizes"].tolist() == [[1680, 1008]]
    assert out["num_img_tokens"] == [(15 + 1) * 144 + 1 + 6 * 12]  # h=5, w=3 -> 2377
    # pixels: the transposed pipeline, not a plain resize with swapped sizes
    x = ref_normalized(img, 16)
    tiles = x.reshape(3, 5, 336, 3, 336).permute(1, 3, 0, 2, 4).reshape(15, 3, 336, 336)
    assert torch.equal(out["pixel_values"][0, 1:16], tiles)


def test_hd_size_matches_reference_geometry_on_a_grid():
    sizes = [1, 2, 3, 7, 10, 100, 223, 335, 336, 337, 500, 671, 672, 673, 999, 1000, 1344, 2000, 4032, 10000]
    for n in range(1, 17):
        for w in sizes:
            for h in sizes:
                transposed, new_w, _, target, _ = ref_geometry(w, h, n)
                expected = (new_w, target) if transposed else (target, new_w)
                if ref_geometry(w, h, n)[2] == 0:  # reference would crash; we keep one row -> one tile high
                    expected = (new_w, 336) if transposed else (336, new_w)
                got = hd_size(w, h, n)
                assert got == expected, (w, h, n)
                assert got[0] % 336 == 0 and got[1] % 336 == 0
                assert (got[0] // 336) * (got[1] // 336) <= n


def test_hd_size_matches_real_transform_random_sizes():
    rng = random.Random(1234)
    base = noise(64, 64)
    for n in range(1, 17):
        for _ in range(4):
            w, h = rng.randint(1, 1500), rng.randint(1, 1500)
            padded = hd_transform(base.resize((w, h)), n)
            assert (padded.height, padded.width) == hd_size(w, h, n), (w, h, n)


@pytest.mark.parametrize(("w", "h", "n"), [(640, 480, 16), (480, 640, 4), (123, 457, 7), (1000, 37, 16), (300, 300, 2)])
def test_end_to_end_matches_reference(w, h, n):
    img = noise(w, h, seed=w + h)
    out = Phi3VImageProcessor(num_crops=n)([img])
    x = ref_normalized(img, n)
    H, W = x.shape[1:]
    assert out["image_sizes"].tolist() == [[H, W]] and hd_size(w, h, n) == (H, W)
    pv = out["pixel_values"][0]
    glob = torch.nn.functional.interpolate(x[None], size=(336, 336), mode="bicubic", align_corners=False)[0]
    assert torch.equal(pv[0], glob)
    k = 0
    for r in range(H // 336):
        for c in range(W // 336):
            k += 1
            assert torch.equal(pv[k], x[:, r * 336 : (r + 1) * 336, c * 336 : (c + 1) * 336]), (r, c)
    assert k == (H // 336) * (W // 336)
    assert torch.count_nonzero(pv[k + 1 :]) == 0


def test_white_padding_and_top_offset():
    # find a landscape size whose vertical padding is odd, so int((target - h) / 2) must floor
    w, h = next((1000, h) for h in range(300, 700) if (ref_geometry(1000, h, 16)[3] - ref_geometry(1000, h, 16)[2]) % 2)
    _, new_w, new_h, target, top = ref_geometry(w, h, 16)
    assert top == (target - new_h) // 2 and (target - new_h) % 2 == 1
    color = (10, 200, 30)
    padded = hd_transform(Image.new("RGB", (w, h), color), 16)
    arr = np.asarray(padded)
    assert arr.shape == (target, new_w, 3)
    assert (arr[:top] == 255).all() and (arr[top + new_h :] == 255).all()
    assert (arr[top : top + new_h] == color).all()
    # same thing after normalisation, assembled back from the tiles
    out = Phi3VImageProcessor()([Image.new("RGB", (w, h), color)])
    rows, cols = target // 336, new_w // 336
    tiles = out["pixel_values"][0, 1 : 1 + rows * cols].reshape(rows, cols, 3, 336, 336)
    full = tiles.permute(2, 0, 3, 1, 4).reshape(3, target, new_w)
    white = WHITE.view(3, 1, 1).expand(3, 1, new_w)
    assert torch.equal(full[:, :top], white.expand(3, top, new_w))
    assert torch.equal(full[:, top + new_h :], white.expand(3, target - top - new_h, new_w))
    inner = (torch.tensor(color, dtype=torch.float32).view(3, 1, 1) / 255 - MEAN) / STD
    assert torch.equal(full[:, top], inner.view(3, 1).expand(3, new_w))


def test_num_crops_one_quirk():
    proc = Phi3VImageProcessor(num_crops=1)
    imgs = [noise(1000, 500), noise(40, 900, seed=1), noise(336, 336, seed=2)]
    out = proc(imgs)
    assert out["pixel_values"].shape == (3, 2, 3, 336, 336)
    assert out["image_sizes"].tolist() == [[336, 336]] * 3
    assert out["num_img_tokens"] == [313] * 3
    for i, img in enumerate(imgs):
        x = ref_normalized(img, 1)
        assert torch.equal(out["pixel_values"][i, 1], x)
        glob = torch.nn.functional.interpolate(x[None], size=(336, 336), mode="bicubic", align_corners=False)[0]
        assert torch.equal(out["pixel_values"][i, 0], glob)
    # the 336x336 image is already the target size: the tile is the image itself
    assert torch.equal(
        out["pixel_values"][2, 1], ((torch.tensor(np.asarray(imgs[2])).permute(2, 0, 1) / 255) - MEAN) / STD
    )


def test_batch_and_single_and_empty():
    proc = Phi3VImageProcessor(num_crops=4)
    single = proc(noise(100, 80))
    assert single["pixel_values"].shape == (1, 5, 3, 336, 336)
    batch = proc.preprocess([noise(100, 80), noise(80, 300, seed=5)])
    assert torch.equal(batch["pixel_values"][0], single["pixel_values"][0])
    assert batch["image_sizes"].tolist() == [list(hd_size(100, 80, 4)), list(hd_size(80, 300, 4))]
    empty = proc([])
    assert empty["pixel_values"].shape == (0, 5, 3, 336, 336)
    assert empty["image_sizes"].shape == (0, 2) and empty["image_sizes"].dtype == torch.long
    assert empty["num_img_tokens"] == []


@pytest.mark.parametrize("bad", [0, 2.5, -1, True, "4", None])
def test_num_crops_validation(bad):
    with pytest.raises(ValueError, match="num_crops"):
        Phi3VImageProcessor(num_crops=bad)
    with pytest.raises(ValueError, match="num_crops"):
        hd_size(100, 100, bad)


@pytest.mark.parametrize(
    "n, size", [(17, [1008, 1680]), (20, [1008, 2016]), (25, [1008, 2016]), (32, [1344, 2688]), (36, [1344, 2688])]
)
def test_more_than_16_crops_are_accepted_as_the_published_processor_does(n, size):
    """The recipe refuses num_crops > 16 (so does `train`), but the published processor computes them; so do we."""
    proc = Phi3VImageProcessor(num_crops=n)
    out = proc([noise(1000, 500)])
    assert out["image_sizes"].tolist() == [size] and list(hd_size(1000, 500, n)) == size
    assert out["pixel_values"].shape == (1, n + 1, 3, 336, 336)
    h, w = size[0] // 336, size[1] // 336
    assert out["num_img_tokens"] == [(h * w + 1) * 144 + 1 + (h + 1) * 12]
    assert proc.calc_num_image_tokens_from_image_size(1000, 500) == out["num_img_tokens"][0]


def test_other_validation():
    with pytest.raises(ValueError):
        Phi3VImageProcessor(image_mean=[0.5, 0.5])
    with pytest.raises(ValueError):
        Phi3VImageProcessor(image_std=[0.5, 0.0, 0.5])
    with pytest.raises(ValueError):
        Phi3VImageProcessor(num_img_tokens=256)
    with pytest.raises(ValueError):
        hd_size(0, 10)
    with pytest.raises(ValueError, match="return_tensors must be 'pt' or 'np'"):
        Phi3VImageProcessor()([noise(10, 10)], return_tensors="tf")
    as_np = Phi3VImageProcessor(num_crops=2)([noise(10, 10)], return_tensors="np")
    as_pt = Phi3VImageProcessor(num_crops=2)([noise(10, 10)])
    assert isinstance(as_np["pixel_values"], np.ndarray) and np.array_equal(
        as_np["pixel_values"], as_pt["pixel_values"]
    )


# ------------------------------------------------------------------------------------------------ config round trip


def test_save_and_from_pretrained_round_trip(tmp_path):
    proc = Phi3VImageProcessor(num_crops=4, image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.5, 1.0])
    path = proc.save_pretrained(tmp_path / "ckpt")
    data = json.loads(path.read_text())
    assert path.name == "preprocessor_config.json"
    assert data == {
        "num_crops": 4,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.25, 0.5, 1.0],
        "num_img_tokens": 144,
        "image_processor_type": "Phi3VImageProcessor",
        "processor_class": "Phi3VProcessor",
        "auto_map": {
            "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
            "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor",
        },
    }
    again = Phi3VImageProcessor.from_pretrained(tmp_path / "ckpt")
    assert again.to_dict() == proc.to_dict()
    assert Phi3VImageProcessor.from_pretrained(tmp_path / "ckpt", num_crops=9).num_crops == 9
    # missing file -> defaults
    default = Phi3VImageProcessor.from_pretrained(tmp_path / "nothing-here")
    assert default.num_crops == 16 and default.image_mean == list(CLIP_MEAN) and default.image_std == list(CLIP_STD)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        Phi3VImageProcessor.from_pretrained(tmp_path / "broken")


def test_from_pretrained_published_fixture():
    if not (FIXTURE_DIR / "preprocessor_config.json").is_file():
        pytest.skip(f"fixture folder missing: {FIXTURE_DIR}")
    proc = Phi3VImageProcessor.from_pretrained(FIXTURE_DIR)
    assert proc.num_crops == 16 and proc.num_img_tokens == 144
    assert proc.image_mean == list(CLIP_MEAN) and proc.image_std == list(CLIP_STD)
    assert Phi3VImageProcessor.from_pretrained(FIXTURE_DIR, num_crops=4).num_crops == 4


# ------------------------------------------------------------------------------------------------ loading


def test_load_inputs_path_bytes_pil(tmp_path):
    img = noise(30, 20)
    path = tmp_path / "a.png"
    img.save(path)
    for src in (img, path, str(path), path.read_bytes()):
        out = load_image(src)
        assert out.mode == "RGB" and out.size == (30, 20)
        assert np.array_equal(np.asarray(out), np.asarray(img))
    with pytest.raises(TypeError):
        load_image(12345)


def test_rgba_transparent_becomes_white():
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    img.putpixel((0, 0), (10, 20, 30, 255))
    img.putpixel((1, 0), (0, 0, 0, 128))
    out = np.asarray(load_image(img))
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[5, 5]) == (255, 255, 255)
    assert abs(int(out[0, 1, 0]) - 127) <= 1
    la = np.asarray(load_image(Image.new("LA", (4, 4), (0, 0))))
    assert (la == 255).all()


def test_palette_with_transparency_becomes_white(tmp_path):
    img = Image.new("P", (6, 6), 1)
    img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    img.putpixel((0, 0), 0)
    path = tmp_path / "t.gif"
    img.save(path, transparency=0)
    out = np.asarray(load_image(path))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[3, 3]) == (200, 10, 10)


def _sixteen_bit_png(tmp_path) -> Path:
    arr = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    return path


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1", "I", "F", "I;16", "YCbCr", "RGBX"])
def test_modes_convert_to_rgb(mode, tmp_path):
    if mode == "I;16":
        img = Image.open(_sixteen_bit_png(tmp_path))
        assert img.mode.startswith("I;16")
    elif mode == "I":
        img = Image.fromarray(np.full((8, 8), 40000, dtype=np.int32), mode="I")
    elif mode == "F":
        img = Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), mode="F")
    else:
        img = noise(8, 8).convert(mode)
    out = load_image(img)
    assert out.mode == "RGB" and out.size == img.size
    result = Phi3VImageProcessor(num_crops=2)([img])
    assert result["pixel_values"].shape == (1, 3, 3, 336, 336)


def test_high_bit_depth_is_scaled_not_clipped(tmp_path):
    out = np.asarray(load_image(_sixteen_bit_png(tmp_path)))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert len(np.unique(out[..., 0])) > 200  # a gradient, not a white page
    assert np.asarray(load_image(Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32), mode="F")))[0, 0, 0] == 128


def test_exif_orientation_ignored_by_default_as_the_published_processor(tmp_path):
    """The published processor does not read the EXIF tag: neither do we unless asked (the model must see at training
    what inference with the published processor shows it)."""
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    assert load_image(path).size == (40, 20)
    with Image.open(path) as opened:
        assert Phi3VImageProcessor(num_crops=4)([opened])["image_sizes"].tolist() == [list(hd_size(40, 20, 4))]
    rotating = Phi3VImageProcessor(num_crops=4, apply_exif_orientation=True)
    assert rotating([path])["image_sizes"].tolist() == [list(hd_size(20, 40, 4))]
    rotating.save_pretrained(tmp_path / "saved")  # the choice travels with the model
    assert Phi3VImageProcessor.from_pretrained(tmp_path / "saved").apply_exif_orientation is True
    assert "apply_exif_orientation" not in Phi3VImageProcessor().to_dict()


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    out = load_image(path, apply_exif_orientation=True)
    assert out.size == (20, 40)  # width x height swapped
    px = np.asarray(out).astype(int)
    assert px[5, 10, 0] > 200 and px[5, 10, 2] < 60  # the left (red) half is now on top
    assert px[35, 10, 2] > 200 and px[35, 10, 0] < 60
    assert Phi3VImageProcessor(apply_exif_orientation=True)([path])["image_sizes"].tolist() == [list(hd_size(20, 40))]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_header_size_is_the_size_load_image_returns(tmp_path, orientation):
    """Planning reads sizes from headers (`header_size`); with or without EXIF rotation they are the sizes
    `load_image` decodes, for every orientation value (5-8 swap width and height, 1-4 do not)."""
    from phi3v_tune.processing.geometry import SIDE_SWAPPING_ORIENTATIONS
    from phi3v_tune.processing.image import header_size

    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.jpg"
    noise(40, 20).save(path, exif=exif)
    for rotate in (False, True):
        assert header_size(path, rotate) == load_image(path, apply_exif_orientation=rotate).size
        assert header_size(path.read_bytes(), rotate) == header_size(path, rotate)
        with Image.open(path) as opened:
            assert header_size(opened, rotate) == header_size(path, rotate)
    assert header_size(path, True) == ((20, 40) if orientation in SIDE_SWAPPING_ORIENTATIONS else (40, 20))
    with pytest.raises(ValueError, match="file not found"):
        header_size(tmp_path / "none.jpg")


def test_geometry_is_one_set_of_numbers():
    """The crop size, crop counts and token formula that the pixel path, the model and the flags share."""
    from phi3v_tune.model import vision
    from phi3v_tune.processing import geometry

    assert geometry.CROP_SIZE == vision.CROP_SIZE == 336
    assert list(geometry.TRAIN_NUM_CROPS) == list(range(1, 17)) and geometry.MAX_NUM_CROPS == 16
    assert geometry.num_crops_used(336, 336) == 2 and geometry.num_crops_used(1008, 1680) == 16
    sizes = [[336, 336], [1008, 1680], [672, 336]]
    assert vision.Phi3VImageEmbedding.crops_per_image(sizes) == [geometry.num_crops_used(h, w) for h, w in sizes]
    out = Phi3VImageProcessor(num_crops=16)([noise(1000, 500), noise(30, 900)])
    for (h, w), tokens, crops in zip(out["image_sizes"].tolist(), out["num_img_tokens"], out["pixel_values"]):
        assert tokens == geometry.num_image_tokens(h, w)
        used = int((crops.flatten(1).abs().sum(1) > 0).sum())
        assert used == geometry.num_crops_used(h, w)  # every other slot is zero padding
    assert geometry.image_tag(3) == "<|image_3|>" and geometry.IMAGE_TAG.findall("<|image_3|>x<|image_12|>") == [
        "3",
        "12",
    ]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_fails_with_name(fmt, tmp_path):
    buf = io.BytesIO()
    noise(200, 200).save(buf, fmt)
    path = tmp_path / f"cut_image.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match=f"cut_image.{fmt.lower()}"):
        load_image(path)
    with pytest.raises(ValueError, match="cut_image"):
        Phi3VImageProcessor()([path])


def test_not_an_image_and_empty(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, not an image")
    with pytest.raises(ValueError, match="notes.txt"):
        load_image(path)
    with pytest.raises(ValueError, match="my_source"):
        load_image(b"\x89PNG garbage", source="my_source")
    with pytest.raises(ValueError):
        load_image(b"")
    with pytest.raises(ValueError, match="not a regular file"):
        load_image(tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ValueError, match="nope.jpg"):
        Phi3VImageProcessor().load_image(str(tmp_path / "nope.jpg"), source="row 7")


def test_zero_size_image():
    with pytest.raises(ValueError, match="zero size"):
        load_image(Image.new("RGB", (0, 10)))
    with pytest.raises(ValueError, match="zero size"):
        Phi3VImageProcessor()([Image.new("RGB", (10, 0))])


def test_animated_gif_first_frame_of_a_file_current_frame_of_an_image(tmp_path):
    """A file gives its first frame; an opened image the frame the caller chose (the published processor's rule)."""
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 3
    assert tuple(np.asarray(load_image(path))[4, 4]) == (255, 0, 0)
    with Image.open(path) as opened:
        opened.seek(2)
        assert tuple(np.asarray(load_image(opened))[4, 4]) == (0, 0, 255)
        assert opened.tell() == 2


def test_decompression_bomb_guard(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    noise(40, 30).save(path)
    proc = Phi3VImageProcessor()
    proc.max_image_pixels = 1000
    with pytest.raises(ValueError, match="max_image_pixels"):
        proc.load_image(path)
    with pytest.raises(ValueError, match="max_image_pixels"):
        proc([noise(40, 30)])
    assert Phi3VImageProcessor(max_image_pixels=1200).load_image(path).size == (40, 30)
    # Pillow's own guard (error above 2x its limit, warning above it) also surfaces as ValueError
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(path, max_image_pixels=None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1200 px: Pillow warns only
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(path, max_image_pixels=1000)
    assert load_image(path, max_image_pixels=None).size == (40, 30)  # caller accepted the size: no error


def test_modes_convert_as_transformers_convert_to_rgb():
    """An "A" band or a transparency key is composited onto white; premultiplied RGBa is converted as Pillow does."""
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (200, 100, 50, 128))
    rgba.putpixel((1, 0), (10, 20, 30, 0))
    premultiplied = rgba.convert("RGBa")
    assert np.asarray(load_image(premultiplied)).tolist() == np.asarray(premultiplied.convert("RGB")).tolist()
    assert np.asarray(load_image(rgba))[0, 1].tolist() == [255, 255, 255]  # fully transparent -> white
    keyed = Image.new("RGB", (2, 1), (1, 2, 3))
    keyed.putpixel((1, 0), (9, 9, 9))
    keyed.info["transparency"] = (1, 2, 3)
    assert np.asarray(load_image(keyed)).tolist() == [[[255, 255, 255], [9, 9, 9]]]


def test_numpy_arrays_are_images():
    arr = np.random.RandomState(0).randint(0, 256, (30, 50, 3), dtype=np.uint8)
    proc = Phi3VImageProcessor(num_crops=4)
    assert torch.equal(proc(arr)["pixel_values"], proc([Image.fromarray(arr)])["pixel_values"])
    assert proc.calc_num_image_tokens([arr, Image.fromarray(arr[:, :20])]) == [
        proc.num_tokens_for_size(50, 30),
        proc.num_tokens_for_size(20, 30),
    ]
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((2, 2, 7), dtype=np.uint8))


def test_published_config_keys_pass_misspelt_arguments_do_not():
    assert (
        Phi3VImageProcessor(processor_class="Phi3VProcessor", image_processor_type="Phi3VImageProcessor").num_crops
        == 16
    )
    with pytest.raises(TypeError, match="num_crop"):
        Phi3VImageProcessor(num_crop=4)
