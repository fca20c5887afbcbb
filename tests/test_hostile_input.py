"""Hostile input: every line of a jsonl ends as a correct sample or a located error, never as a stray exception.

A hypothesis strategy draws files of 1-4 lines; each line belongs to one named case class (broken JSON, wrong types,
absurd image sizes, truncated / 16-bit / palette / CMYK / EXIF-rotated / animated images, decompression bombs, paths
escaping the image folder, symlinks, unreadable files, ...) with random parameters. The test writes the jsonl and
its images into a fresh temporary folder and runs the training pipeline's data path: ``read_jsonl`` ->
``validate_records`` -> ``plan_records`` (lengths from image headers) -> ``build_example`` (pixels; tiny processor
with num_crops=4 so that aspect ratios show in ``image_sizes``) for the records without problems.
One parametrized test runs each class on its own; another mixes classes in one file; a third feeds raw bytes.

The invariant checked on every file:

* nothing escapes but ``ValueError`` / ``DataError`` (and those name the file);
* every non-blank line yields a record or at least one ``Problem`` whose origin is ``file:line``; content
  problems also name the sample id and the field;
* a record without problems builds into a consistent example (ids, labels, image tokens, ``image_sizes``, planned
  length == built length), or is refused with a ``ValueError`` / ``SampleRefused`` naming the file;
* class-specific expectations (EXIF applied, bombs refused, ``../`` refused, token counts of absurd sizes, ...).

Counts of the generated cases per class are collected in ``CASES`` and checked / printed by the last test
(``pytest -s tests/test_hostile_input.py`` shows them). ``PHI3V_HOSTILE_SCALE=10`` runs ten times more examples and
``PHI3V_HOSTILE_RANDOM=1`` draws new random cases instead of the fixed derandomized sequence.
"""

from __future__ import annotations

import io
import json
import os
import random
import stat
import struct
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from phi3v_tune.data.dataset import plan_records
from phi3v_tune.data.examples import SampleRefused, build_example
from phi3v_tune.data.layout import SampleLayout
from phi3v_tune.data.schema import DataError, Problem
from phi3v_tune.data.sources import read_jsonl
from phi3v_tune.data.validate import validate_records
from phi3v_tune.processing.image import DEFAULT_MAX_IMAGE_PIXELS, num_image_tokens

NUM_CROPS = 4  # > 1 so that the aspect ratio shows in image_sizes (num_crops=1 makes every image 336x336)
SCALE = float(os.environ.get("PHI3V_HOSTILE_SCALE", "1"))
PER_CLASS = max(1, int(40 * SCALE))  # files per case class (1-2 lines each)
EXAMPLES = max(1, int(150 * SCALE))  # files mixing classes (1-4 lines each)
SETTINGS = {
    "deadline": None,
    "database": None,
    "derandomize": os.environ.get("PHI3V_HOSTILE_RANDOM", "") != "1",
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
}
#: A smaller configured limit, so that bombs of a few tens of megapixels are refused by our own check (not Pillow's).
SMALL_LIMIT = 50_000_000

CLASSES = [
    "valid_image",
    "broken_json",
    "random_bytes_line",
    "wrong_types",
    "absurd_size",
    "truncated_image",
    "png_16bit",
    "png_palette_alpha",
    "cmyk_jpeg",
    "exif_rotated",
    "animated_gif",
    "decompression_bomb",
    "path_escape",
    "symlink",
    "unreadable_file",
    "garbage_image",
    "missing_or_special",
    "garbage_video",
    "multi_image_turns",
]

#: (class, outcome) -> number of generated lines. Outcomes: sample; problem (reader / validator); refused_by_plan
#: (ValueError while planning from headers, e.g. an undecodable video); refused_max_length (SampleRefused: does not
#: fit max_length); refused_at_build (planned, then refused when decoded); blank (an empty line, skipped).
CASES: Counter = Counter()
RAW_LINES: Counter = Counter()
#: SampleRefused reasons of a too small max_length (a valid sample that does not fit is refused, and reported).
MAX_LENGTH_REASONS = ("images_exceed_max_length", "no_answer_after_truncation")
#: Samples planned from their image headers but refused when decoded (the validator should have caught them).
LATE_REFUSALS: list[str] = []
# Images between Pillow's warning threshold and the configured limit are opened on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@lru_cache(maxsize=4)
def processor(max_image_pixels: int):
    from phi3v_tune import Phi3VProcessor
    from phi3v_tune.model.tiny import build_tiny_tokenizer

    # what train/run.py does with cfg.max_image_pixels
    proc = Phi3VProcessor.from_tokenizer(build_tiny_tokenizer(), num_crops=NUM_CROPS, max_image_pixels=max_image_pixels)
    # --apply-exif-orientation: header-only planning must then rotate too (the default, off, is the published
    # processor's behaviour, tested in test_image_processor.py)
    proc.image_processor.apply_exif_orientation = True
    return proc


# ---------------------------------------------------------------------------------------------- image writers


def noise_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rnd = random.Random(seed)
    n = size[0] * size[1] * len(Image.new(mode, (1, 1)).getbands())
    return Image.frombytes(mode, size, rnd.randbytes(n))


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int) -> bytes:
    """A few hundred bytes whose header claims width x height 8-bit grey pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + _png_chunk(b"IEND", b"")
    )


def jpeg_bomb(width: int, height: int) -> bytes:
    """A tiny JPEG whose SOF0 header is patched to claim width x height."""
    data = bytearray(encode(Image.new("L", (8, 8), 128), "JPEG"))
    i = data.index(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# ------------------------------------------------------------------------------------------------ strategies

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
texts = st.text(max_size=24)
answers = st.text(min_size=1, max_size=24).filter(str.strip)


# Bad values built directly (no filters, so that no draw is thrown away).
_numbers = st.booleans() | st.integers() | st.floats(allow_nan=False)
_lists = st.lists(json_scalars, max_size=3)
_dicts = st.dictionaries(st.text(max_size=5), json_scalars, max_size=3)
not_str_or_null = _numbers | _lists | _dicts
not_str = st.none() | not_str_or_null
not_list_or_null = _numbers | st.text(max_size=8) | _dicts

# mutation -> (expected problem field, strategy of the bad value or None for "key removed")
WRONG_TYPES: dict[str, tuple[str, Any]] = {
    "id": ("id", st.none() | st.booleans() | st.floats(allow_nan=False) | _lists | _dicts | st.sampled_from(["", " "])),
    "id_missing": ("id", None),
    "conversations": ("conversations", st.none() | not_list_or_null | st.just([])),
    "conversations_missing": ("conversations", None),
    "turn": ("conversations[0]", st.none() | _numbers | st.text(max_size=8) | _lists),
    "user": ("conversations[0].user", not_str),
    "user_missing": ("conversations[0].user", None),
    "assistant": ("conversations[0].assistant", not_str),
    "images": ("conversations[0].images", not_list_or_null),
    "images_entry": ("conversations[0].images[0]", not_str),
    "image": ("conversations[0].image", not_str_or_null),
    "video": ("conversations[0].video", not_str_or_null),
    "source": ("source", not_str_or_null),
    "answers": ("answers", not_list_or_null | st.just([]) | st.lists(not_str, min_size=1, max_size=3)),
    "both_image_keys": ("conversations[0]", st.just(None)),
    "nul_in_path": ("conversations[0].image", st.just("a\x00b.png")),
    "empty_path": ("conversations[0].image", st.sampled_from(["", "   "])),
    "empty_answer": ("conversations[0].assistant", st.sampled_from(["", " ", "\n\t"])),
    "blank_user_no_image": ("conversations[0].user", st.sampled_from(["", "  "])),
    "bad_image_tag": ("conversations[0].user", st.sampled_from(["<|image_2|> what?", "<|image_1|><|image_1|>"])),
    "not_an_object": ("", st.none() | _numbers | st.text(max_size=8) | st.lists(json_values, max_size=3)),
}


@st.composite
def case_params(draw, cls: str) -> dict[str, Any]:
    p: dict[str, Any] = {
        "cls": cls,
        "user": draw(texts),
        "assistant": draw(answers),
        "as_list": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }
    small = st.tuples(st.integers(1, 48), st.integers(1, 48))
    if cls == "valid_image":
        p["size"] = draw(small)
        p["mode"] = draw(st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "1", "I", "F"]))
        p["fmt"] = draw(st.sampled_from(["PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"]))
    elif cls == "broken_json":
        p["kind"] = draw(st.sampled_from(["truncated", "huge_int", "deep", "trailing", "single_quotes", "nan_only"]))
        p["cut"] = draw(st.floats(0, 1))
        p["depth"] = draw(st.integers(1, 200_000))
        p["closed"] = draw(st.booleans())
    elif cls == "random_bytes_line":
        p["data"] = draw(
            st.binary(max_size=120)
            | st.text(max_size=60).map(lambda s: s.encode("utf-8", "surrogatepass"))
            | st.builds(lambda v: json.dumps(v).encode(), json_values)
        )
    elif cls == "wrong_types":
        p["mutation"] = draw(st.sampled_from(sorted(WRONG_TYPES)))
        strategy = WRONG_TYPES[p["mutation"]][1]
        p["value"] = draw(strategy) if strategy is not None else None
    elif cls == "absurd_size":
        p["size"] = draw(
            st.sampled_from([(1, 1), (20000, 10), (10, 20000), (1, 20000), (20000, 1)])
            | st.tuples(st.integers(1, 3), st.integers(2000, 20000))
            | st.tuples(st.integers(2000, 20000), st.integers(1, 3))
        )
    elif cls == "truncated_image":
        p["size"] = draw(st.tuples(st.integers(8, 64), st.integers(8, 64)))
        p["fmt"] = draw(st.sampled_from(["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"]))
        p["keep"] = draw(st.floats(0, 0.999))
    elif cls == "png_16bit":
        p["size"] = draw(small)
        p["value"] = draw(st.integers(0, 65535))
    elif cls == "png_palette_alpha":
        p["size"] = draw(small)
        p["kind"] = draw(st.sampled_from(["P", "P_transparent", "RGBA_clear", "LA"]))
        p["color"] = draw(st.tuples(*[st.integers(0, 255)] * 3))
    elif cls == "cmyk_jpeg":
        p["size"] = draw(small)
        p["color"] = draw(st.tuples(*[st.integers(0, 255)] * 4))
    elif cls == "exif_rotated":
        long, short = draw(st.integers(40, 96)), draw(st.integers(16, 38))
        p["size"] = (long, short) if draw(st.booleans()) else (short, long)
        p["orientation"] = draw(st.integers(1, 8) | st.sampled_from([0, 9, 255, 65535]))  # out of range: ignored
    elif cls == "animated_gif":
        p["size"] = draw(small)
        palette = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 0, 0), (255, 255, 255)]
        p["colors"] = draw(st.lists(st.sampled_from(palette), min_size=2, max_size=5))
    elif cls == "decompression_bomb":
        p["fmt"] = draw(st.sampled_from(["PNG", "JPEG"]))
        p["w_frac"] = draw(st.floats(0, 1))
        p["extra"] = draw(st.integers(0, 10_000))
        p["huge_png"] = draw(st.booleans())
    elif cls == "path_escape":
        p["kind"] = draw(st.sampled_from(["relative", "relative", "absolute", "home"]))
        p["up"] = draw(st.integers(1, 6))
        p["inner"] = draw(st.sampled_from(["", "sub/", "a/b/"]))
        p["target"] = draw(st.sampled_from(["etc/passwd", "x.png", "", "train.jsonl"]))
        p["key"] = draw(st.sampled_from(["image", "images", "video"]))
    elif cls == "symlink":
        p["kind"] = draw(st.sampled_from(["inside", "outside", "dangling", "loop", "to_dir", "to_passwd", "to_dev"]))
        p["size"] = draw(small)
    elif cls == "unreadable_file":
        p["kind"] = draw(st.sampled_from(["file_000", "dir_000"]))
        p["size"] = draw(small)
    elif cls == "garbage_image":
        p["data"] = draw(st.binary(max_size=200))
        p["ext"] = draw(st.sampled_from([".png", ".jpg", ".gif", ".webp", ".txt", ""]))
        p["magic"] = draw(st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\0\0\0\0WEBP"]))
    elif cls == "missing_or_special":
        p["kind"] = draw(st.sampled_from(["missing", "directory", "fifo", "missing_in_subdir"]))
    elif cls == "multi_image_turns":
        p["turns"] = draw(st.lists(st.lists(small, max_size=2), min_size=1, max_size=3))  # image sizes per turn
        p["explicit"] = draw(st.booleans())  # tags written in every turn, or in none (then they are added)
    elif cls == "garbage_video":
        p["data"] = draw(st.binary(max_size=200))
        p["exists"] = draw(st.booleans())
    return p


def hostile_files(cases) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {
            "cases": cases,
            "limit": st.sampled_from([DEFAULT_MAX_IMAGE_PIXELS, SMALL_LIMIT]),
            "bom": st.booleans(),
            "crlf": st.booleans(),
            "explicit_image_dir": st.booleans(),
            "max_length": st.none() | st.none() | st.integers(16, 2048),
        }
    )


#: Files mixing 1-4 lines of any classes (lines must not disturb each other).
mixed_files = hostile_files(st.lists(st.sampled_from(CLASSES).flatmap(case_params), min_size=1, max_size=4))


# ----------------------------------------------------------------------------------------- materialising cases


@dataclass
class Expect:
    """What one line must end as: "sample", "problem" or "either" (+ optional field / message checks)."""

    line: bytes
    kind: str = "either"
    field: str | None = None  # a problem of the line must have exactly this field
    fragments: tuple[str, ...] = ()  # ... and contain all of these (case-insensitive)
    check: Callable[[dict, Path], None] | None = None  # called with the built example and the image path
    image: Path | None = None  # the image file, for direct load_image checks
    loader_must_refuse: bool = False


@dataclass
class Env:
    folder: Path
    image_dir: Path
    limit: int
    index: int = 0

    def name(self, suffix: str) -> str:
        return f"c{self.index}{suffix}"


def record_line(env: Env, p: dict, path: str | None, key: str | None = None) -> bytes:
    turn: dict[str, Any] = {"user": p["user"], "assistant": p["assistant"]}
    if path is not None:
        key = key or ("images" if p["as_list"] else "image")
        turn[key] = [path] if key == "images" else path
    return json.dumps({"id": f"id{env.index}", "conversations": [turn]}).encode()


def image_field(p: dict, key: str | None = None) -> str:
    key = key or ("images" if p["as_list"] else "image")
    return "conversations[0].images[0]" if key == "images" else f"conversations[0].{key}"


def expect_geometry(width: int, height: int) -> Callable[[dict, Path], None]:
    """The example's image is width x height as displayed: image_sizes and token count follow ``hd_size``."""

    def check(example: dict, _path: Path) -> None:
        ip = processor(DEFAULT_MAX_IMAGE_PIXELS).image_processor
        padded = ip.hd_size(width, height)
        assert tuple(example["image_sizes"][0].tolist()) == padded
        assert int((example["input_ids"] == -1).sum()) == num_image_tokens(*padded)

    return check


def save(env: Env, name: str, data: bytes | Image.Image, fmt: str | None = None, **kwargs) -> Path:
    path = env.image_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, Image.Image):
        data.save(path, format=fmt, **kwargs)
    else:
        path.write_bytes(data)
    return path


def make_case(env: Env, p: dict) -> Expect:  # noqa: C901 - one branch per class keeps each case readable
    cls = p["cls"]
    if cls == "valid_image":
        mode, fmt = p["mode"], p["fmt"]
        image = noise_image("L", p["size"], p["seed"]).convert(mode)
        if fmt == "JPEG" and mode not in ("RGB", "L"):
            image = image.convert("RGB")
        if fmt == "BMP" and mode in ("LA", "I", "F"):
            image = image.convert("L")
        if fmt == "PNG" and mode in ("I", "F"):  # Pillow writes neither as PNG; 16-bit grey instead
            image = image.convert("I;16")
        path = save(env, env.name(f".{fmt.lower()}"), image, fmt)
        return Expect(record_line(env, p, path.name), "sample", check=expect_geometry(*p["size"]), image=path)

    if cls == "broken_json":
        kind = p["kind"]
        good = record_line(env, p, None)
        if kind == "truncated":
            line = good[: max(1, int(p["cut"] * (len(good) - 1)))]
        elif kind == "huge_int":
            line = b'{"id": ' + b"7" * 5000 + b', "conversations": []}'
        elif kind == "deep":
            line = b"[" * p["depth"] + (b"]" * p["depth"] if p["closed"] else b"")
        elif kind == "trailing":
            line = good + b" trailing garbage"
        elif kind == "single_quotes":
            line = repr(json.loads(good)).encode()
        else:
            line = b"NaN"
        return Expect(line, "problem", field="")

    if cls == "random_bytes_line":
        return Expect(p["data"].replace(b"\n", b" "), "either")

    if cls == "wrong_types":
        mutation, (expected_field, _) = p["mutation"], WRONG_TYPES[p["mutation"]]
        value = p["value"]
        turn: dict[str, Any] = {"user": p["user"] or "hello", "assistant": p["assistant"]}
        obj: Any = {"id": f"id{env.index}", "conversations": [turn]}
        if mutation in ("id", "conversations", "source", "answers"):
            obj[mutation] = value
        elif mutation in ("id_missing", "conversations_missing"):
            del obj[mutation.split("_")[0]]
        elif mutation == "turn":
            obj["conversations"] = [value]
        elif mutation in ("user", "assistant", "images", "image", "video", "empty_answer", "blank_user_no_image"):
            key = {"empty_answer": "assistant", "blank_user_no_image": "user"}.get(mutation, mutation)
            turn[key] = value
        elif mutation == "user_missing":
            del turn["user"]
        elif mutation == "images_entry":
            turn["images"] = [value]
        elif mutation == "both_image_keys":
            turn["image"], turn["images"] = "a.png", ["b.png"]
        elif mutation in ("nul_in_path", "empty_path"):
            turn["image"] = value
        elif mutation == "bad_image_tag":
            turn["user"] = value
        elif mutation == "not_an_object":
            obj = value
        line = json.dumps(obj).encode()
        return Expect(line, "problem", field=expected_field)

    if cls == "absurd_size":
        w, h = p["size"]
        path = save(env, env.name(".png"), noise_image("L", (w, h), p["seed"]), "PNG")
        return Expect(record_line(env, p, path.name), "sample", check=expect_geometry(w, h), image=path)

    if cls == "truncated_image":
        image = noise_image("RGB", p["size"], p["seed"])
        data = encode(image, p["fmt"])
        path = save(env, env.name(f".{p['fmt'].lower()}"), data[: int(p["keep"] * len(data))])

        def check_intact(example: dict, image_path: Path) -> None:
            # accepted only when nothing but trailing bytes (end marker, checksum, row padding) is missing
            ip = processor(env.limit).image_processor
            assert ip.load_image(image_path).tobytes() == ip.load_image(data).tobytes()

        return Expect(record_line(env, p, path.name), "either", field=image_field(p), check=check_intact, image=path)

    if cls == "png_16bit":
        value = p["value"]
        path = save(env, env.name(".png"), Image.new("I;16", p["size"], value), "PNG")
        expected = round(value / 257)

        def check_16bit(example: dict, image_path: Path) -> None:
            loaded = processor(env.limit).image_processor.load_image(image_path)
            r, g, b = loaded.getpixel((0, 0))
            assert r == g == b and abs(r - expected) <= 1, (value, r, expected)

        return Expect(record_line(env, p, path.name), "sample", check=check_16bit, image=path)

    if cls == "png_palette_alpha":
        kind, color = p["kind"], p["color"]
        white = False
        if kind == "P":
            image = Image.new("RGB", p["size"], color).convert("P", palette=Image.Palette.ADAPTIVE)
            path = save(env, env.name(".png"), image, "PNG")
        elif kind == "P_transparent":
            image = Image.new("RGB", p["size"], color).convert("P", palette=Image.Palette.ADAPTIVE)
            path = save(env, env.name(".png"), image, "PNG", transparency=image.getpixel((0, 0)))
            white = True
        elif kind == "RGBA_clear":
            path = save(env, env.name(".png"), Image.new("RGBA", p["size"], (*color, 0)), "PNG")
            white = True
        else:
            path = save(env, env.name(".png"), Image.new("LA", p["size"], (color[0], 255)), "PNG")
            color = (color[0],) * 3

        def check_palette(example: dict, image_path: Path) -> None:
            loaded = processor(env.limit).image_processor.load_image(image_path)
            want = (255, 255, 255) if white else color
            got = loaded.getpixel((0, 0))
            assert loaded.mode == "RGB" and max(abs(a - b) for a, b in zip(got, want)) <= 8, (kind, got, want)

        return Expect(record_line(env, p, path.name), "sample", check=check_palette, image=path)

    if cls == "cmyk_jpeg":
        image = Image.new("CMYK", p["size"], p["color"])
        path = save(env, env.name(".jpg"), image, "JPEG", quality=95)
        want = image.convert("RGB").getpixel((0, 0))

        def check_cmyk(example: dict, image_path: Path) -> None:
            loaded = processor(env.limit).image_processor.load_image(image_path)
            got = loaded.getpixel((0, 0))
            assert loaded.mode == "RGB" and max(abs(a - b) for a, b in zip(got, want)) <= 24, (got, want)

        return Expect(record_line(env, p, path.name), "sample", check=check_cmyk, image=path)

    if cls == "exif_rotated":
        (w, h), o = p["size"], p["orientation"]
        image = Image.new("RGB", (w, h), (0, 0, 255))
        image.paste((255, 0, 0), (0, 0, w // 2, h // 2))  # the stored top-left quadrant is red
        exif = Image.Exif()
        exif[0x0112] = o
        path = save(env, env.name(".jpg"), image, "JPEG", quality=95, exif=exif.tobytes())
        shown = (h, w) if 5 <= o <= 8 else (w, h)
        # Where the stored top-left corner is displayed, from the EXIF spec (0th row / 0th column per orientation).
        corner = {1: "TL", 2: "TR", 3: "BR", 4: "BL", 5: "TL", 6: "TR", 7: "BR", 8: "BL"}.get(o, "TL")
        geometry = expect_geometry(*shown)

        def check_exif(example: dict, image_path: Path) -> None:
            geometry(example, image_path)
            loaded = processor(env.limit).image_processor.load_image(image_path)
            assert loaded.size == shown, (o, loaded.size, shown)
            dw, dh = loaded.size
            centers = {
                "TL": (dw // 4, dh // 4),
                "TR": (3 * dw // 4, dh // 4),
                "BL": (dw // 4, 3 * dh // 4),
                "BR": (3 * dw // 4, 3 * dh // 4),
            }
            opposite = {"TL": "BR", "BR": "TL", "TR": "BL", "BL": "TR"}[corner]
            red, blue = loaded.getpixel(centers[corner]), loaded.getpixel(centers[opposite])
            assert red[0] > 160 and red[2] < 96, (o, corner, red)
            assert blue[2] > 160 and blue[0] < 96, (o, opposite, blue)
            planned = build_example(example["_record"], processor(env.limit), load_pixels=False)
            assert int((planned["input_ids"] == -1).sum()) == int((example["input_ids"] == -1).sum())

        return Expect(record_line(env, p, path.name), "sample", check=check_exif, image=path)

    if cls == "animated_gif":
        frames = [Image.new("RGB", p["size"], c) for c in p["colors"]]
        path = save(env, env.name(".gif"), frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
        first = p["colors"][0]

        def check_gif(example: dict, image_path: Path) -> None:
            loaded = processor(env.limit).image_processor.load_image(image_path)
            assert loaded.getpixel((0, 0)) == first

        return Expect(record_line(env, p, path.name), "sample", check=check_gif, image=path)

    if cls == "decompression_bomb":
        limit = env.limit
        if p["fmt"] == "PNG" and p["huge_png"]:
            w, h = 100_000 + p["extra"], 100_000
            data = png_bomb(w, h)
        else:
            low = limit // 65535 + 1
            w = low + int(p["w_frac"] * (65535 - low))
            h = min(65535, limit // w + 1 + p["extra"])
            assert w * h > limit
            data = png_bomb(w, h) if p["fmt"] == "PNG" else jpeg_bomb(w, h)
        path = save(env, env.name(f".{p['fmt'].lower()}"), data)
        return Expect(
            record_line(env, p, path.name),
            "problem",
            field=image_field(p),
            fragments=("pixels", str(path)),
            image=path,
            loader_must_refuse=True,
        )

    if cls == "path_escape":
        key = p["key"]
        if p["kind"] == "relative":
            raw = p["inner"] + "../" * (p["up"] + p["inner"].count("/")) + p["target"]
            return Expect(
                record_line(env, p, raw, key), "problem", field=image_field(p, key), fragments=(repr(raw), "outside")
            )
        raw = "/etc/passwd" if p["kind"] == "absolute" else "~/" + "../" * 8 + "etc/passwd"
        if (
            key == "video"
        ):  # a readable file: the validator accepts it (videos are decoded later), build_example refuses
            return Expect(record_line(env, p, raw, key), "either", fragments=("/etc/passwd",))
        return Expect(
            record_line(env, p, raw, key),
            "problem",
            field=image_field(p, key),
            fragments=("/etc/passwd", "cannot read"),
        )

    if cls == "symlink":
        kind, size = p["kind"], p["size"]
        link = env.image_dir / env.name("_link.png")
        link.parent.mkdir(parents=True, exist_ok=True)
        outside = env.folder / "outside"
        outside.mkdir(exist_ok=True)
        line = record_line(env, p, link.name)
        if kind == "inside":
            os.symlink(save(env, env.name("_target.png"), Image.new("RGB", size, (1, 2, 3)), "PNG"), link)
            return Expect(line, "sample", check=expect_geometry(*size), image=link)
        if kind == "outside":  # symlinks are followed: the folder rule is about the paths written in the data
            target = outside / env.name(".png")
            Image.new("RGB", size, (1, 2, 3)).save(target)
            os.symlink(target, link)
            return Expect(line, "sample", check=expect_geometry(*size), image=link)
        targets = {
            "dangling": (env.folder / "nowhere.png", "not found"),
            "loop": (link, "not found"),
            "to_dir": (outside, "not a file"),
            "to_passwd": (Path("/etc/passwd"), "cannot read"),
            "to_dev": (Path("/dev/zero"), "not a file"),
        }
        target, fragment = targets[kind]
        os.symlink(target, link)
        return Expect(line, "problem", field=image_field(p), fragments=(fragment, str(link)), image=link)

    if cls == "unreadable_file":
        size = p["size"]
        if p["kind"] == "file_000":
            path = save(env, env.name(".png"), Image.new("RGB", size, (9, 9, 9)), "PNG")
            os.chmod(path, 0)
        else:
            path = save(env, env.name("_locked/x.png"), Image.new("RGB", size, (9, 9, 9)), "PNG")
            os.chmod(path.parent, 0)
        rel = os.path.relpath(path, env.image_dir)
        try:
            with open(path, "rb") as fh:
                fh.read(1)
            readable = True
        except OSError:
            readable = False
        if readable:  # root (or a capability) reads chmod 000 files: the sample is fine
            return Expect(record_line(env, p, rel), "sample", check=expect_geometry(*size))
        return Expect(record_line(env, p, rel), "problem", field=image_field(p), fragments=(str(path),))

    if cls == "garbage_image":
        path = save(env, env.name("_junk" + p["ext"]), p["magic"] + p["data"])
        return Expect(record_line(env, p, path.name), "either", field=image_field(p), image=path)

    if cls == "missing_or_special":
        kind = p["kind"]
        name = env.name(
            {"missing": ".png", "directory": "_dir", "fifo": "_fifo", "missing_in_subdir": "/x/y.png"}[kind]
        )
        path = env.image_dir / name
        if kind == "directory":
            path.mkdir(parents=True)
        elif kind == "fifo":
            env.image_dir.mkdir(parents=True, exist_ok=True)
            os.mkfifo(path)
        fragment = "not a file" if kind in ("directory", "fifo") else "not found"
        return Expect(record_line(env, p, name), "problem", field=image_field(p), fragments=(fragment, str(path)))

    if cls == "multi_image_turns":
        turns, number = [], 1
        for t, sizes in enumerate(p["turns"]):
            names = []
            for k, size in enumerate(sizes):
                names.append(save(env, env.name(f"_{t}_{k}.png"), noise_image("RGB", size, p["seed"] + k), "PNG").name)
            tags = "".join(f"<|image_{number + k}|>" for k in range(len(names))) if p["explicit"] else ""
            number += len(names)
            turns.append({"user": tags + " q" + p["user"], "assistant": p["assistant"], "images": names})
        line = json.dumps({"id": f"id{env.index}", "conversations": turns}).encode()
        return Expect(line, "sample")  # check_example checks every image's token count and numbering

    if cls == "garbage_video":
        name = env.name(".mp4")
        if p["exists"]:
            save(env, name, p["data"])
            return Expect(record_line(env, p, name, "video"), "either", fragments=(name,))
        return Expect(record_line(env, p, name, "video"), "problem", field="conversations[0].video", fragments=(name,))

    raise AssertionError(cls)


# --------------------------------------------------------------------------------------------- the invariant


def is_blank(line: bytes, first: bool) -> bool:
    if first and line.startswith(b"\xef\xbb\xbf"):
        line = line[3:]
    try:
        return not line.decode("utf-8").strip()
    except UnicodeDecodeError:
        return False


def same_field(got: str, expected: str) -> bool:
    """Field names match exactly (a single ``image`` key is named ``image``, not ``images[0]``)."""
    return got == expected


def located(problem: Problem, jsonl: Path, lines: int) -> int:
    """The line number a problem names; asserts it is ``file:line`` of this file."""
    prefix = f"{jsonl}:"
    assert problem.origin.startswith(prefix), problem
    lineno = int(problem.origin[len(prefix) :])
    assert 1 <= lineno <= lines, problem
    assert str(jsonl) in str(problem) and problem.message.strip(), problem
    return lineno


def check_example(example: dict, record) -> None:
    ids, labels = example["input_ids"], example["labels"]
    assert ids.dim() == 1 and ids.shape == labels.shape == example["attention_mask"].shape
    learned = labels != -100
    assert learned.any() and bool((labels[learned] == ids[learned]).all())
    assert bool((ids[learned] >= 0).all())  # image positions are never learned
    n = len(record.images)
    assert example["num_images"] == n
    if n:
        assert example["pixel_values"].shape[:2] == (n, NUM_CROPS + 1)
        for k, (h, w) in enumerate(example["image_sizes"].tolist(), start=1):
            assert int((ids == -k).sum()) == num_image_tokens(h, w)
    else:
        assert not bool((ids < 0).any()) and "pixel_values" not in example


def names_a_file(message: str, jsonl: Path, record) -> bool:
    files = [str(jsonl), *(str(i) for i in record.images), *(t.video for t in record.turns if t.video)]
    return any(f in message for f in files)


def run_pipeline(
    jsonl: Path, image_dir: Path | None, limit: int, max_length: int | None
) -> tuple[list, list[Problem], dict, dict]:
    """What a training run does: read -> validate -> plan (headers only) -> build each kept sample with pixels.

    Returns records, problems, {origin: example}, {origin: refusal (ValueError) at planning or build time}.
    """
    try:
        records, problems = read_jsonl(jsonl, image_dir)
    except DataError as err:
        assert str(jsonl) in str(err)
        raise
    problems = validate_records(records, problems, max_image_pixels=limit)
    bad_origins = {p.origin for p in problems}
    usable = [r for r in records if r.origin not in bad_origins]
    proc = processor(limit)
    plan = plan_records(usable, proc, SampleLayout(max_length=max_length), progress=False)
    assert len(plan.kept) + len(plan.refused) == len(usable)  # nothing dropped silently
    by_id = {r.id: r for r in usable}
    refused: dict[str, Exception] = {}
    for rid, reason, message in plan.refused:
        record = by_id[rid]
        assert names_a_file(message, jsonl, record), f"refusal does not name the file: {message}"
        refused[record.origin] = SampleRefused(rid, reason, message)
    examples = {}
    for record, length in zip(plan.kept, plan.lengths):
        try:
            example = build_example(record, proc, SampleLayout(max_length=max_length))
        except ValueError as err:  # includes SampleRefused and DataError
            assert names_a_file(str(err), jsonl, record), f"build error does not name the file: {err}"
            err.late = True  # type: ignore[attr-defined]
            refused[record.origin] = err
            LATE_REFUSALS.append(str(err))  # planned from the header, refused when decoded
            continue
        check_example(example, record)
        assert len(example["input_ids"]) == length, "planned length (image headers) != built length (pixels)"
        example["_record"] = record
        examples[record.origin] = example
    return records, problems, examples, refused


@pytest.mark.parametrize("cls", CLASSES)
@settings(max_examples=PER_CLASS, **SETTINGS)
@given(data=st.data())
def test_each_case_class_ends_as_a_sample_or_a_located_problem(cls, data):
    check_file(data.draw(hostile_files(st.lists(case_params(cls), min_size=1, max_size=2)), label="file"))


@settings(max_examples=EXAMPLES, **SETTINGS)
@given(spec=mixed_files)
def test_mixed_hostile_files_end_as_samples_or_located_problems(spec):
    check_file(spec)


def check_file(spec: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "data"
        image_dir = folder / "img" if spec["explicit_image_dir"] else folder
        folder.mkdir(parents=True)
        expectations: list[Expect] = []
        for index, p in enumerate(spec["cases"]):
            expectations.append(make_case(Env(folder, image_dir, spec["limit"], index), p))
        lines = [e.line for e in expectations]
        if spec["bom"]:
            lines[0] = b"\xef\xbb\xbf" + lines[0]
        jsonl = folder / "train.jsonl"
        jsonl.write_bytes((b"\r\n" if spec["crlf"] else b"\n").join(lines) + b"\n")

        records, problems, examples, refused = run_pipeline(
            jsonl, image_dir if spec["explicit_image_dir"] else None, spec["limit"], spec["max_length"]
        )

        by_line: dict[int, list[Problem]] = {}
        for problem in problems:
            by_line.setdefault(located(problem, jsonl, len(lines)), []).append(problem)
        record_lines = Counter(located(Problem(r.origin, r.id, "", "x"), jsonl, len(lines)) for r in records)
        assert all(n == 1 for n in record_lines.values()), record_lines
        ids = {r.origin: r.id for r in records}

        for lineno, (p, expect) in enumerate(zip(spec["cases"], expectations), start=1):
            origin = f"{jsonl}:{lineno}"
            found = by_line.get(lineno, [])
            cls = p["cls"]
            # content problems of a parsed record name its id and the field
            for problem in found:
                if origin in ids:
                    assert problem.id == ids[origin] and problem.field, problem
            if is_blank(lines[lineno - 1], lineno == 1):
                assert not found and lineno not in record_lines
                outcome = "blank"
            elif found:
                outcome = "problem"
            elif origin in refused:
                reason = getattr(refused[origin], "reason", "")
                if reason in MAX_LENGTH_REASONS:
                    outcome = "refused_max_length"
                else:
                    outcome = "refused_at_build" if getattr(refused[origin], "late", False) else "refused_by_plan"
            else:
                assert origin in examples, f"line {lineno} ({cls}) was silently dropped"
                outcome = "sample"
            CASES[(cls, outcome)] += 1
            event(f"{cls}: {outcome}")

            context = f"line {lineno} ({cls}, {p}): problems={[str(x) for x in found]}, refused={refused.get(origin)}"
            if expect.kind == "sample":
                assert outcome in ("sample", "refused_max_length"), context
            elif expect.kind == "problem":
                assert outcome in ("problem", "refused_by_plan", "refused_at_build"), context
            if outcome == "problem" and expect.field is not None:
                matching = [x for x in found if same_field(x.field, expect.field)]
                assert matching, context
                found = matching
            if outcome in ("problem", "refused_by_plan", "refused_at_build") and expect.fragments:
                messages = [x.message.lower() for x in found] + [str(refused.get(origin, "")).lower()]
                for fragment in expect.fragments:
                    assert any(fragment.lower() in m for m in messages), (fragment, context)
            if outcome == "sample" and expect.check is not None:
                expect.check(examples[origin], expect.image)
            if expect.image is not None and outcome == "problem" and expect.image.exists():
                # the processor refuses such a file directly too, naming it, with a ValueError and nothing else
                ip = processor(spec["limit"]).image_processor
                try:
                    ip.load_image(expect.image, source="probe")
                except ValueError as err:
                    assert "probe" in str(err) and str(expect.image) in str(err), err
                    if cls == "decompression_bomb":
                        assert "bomb" in str(err) or "pixels" in str(err), err
                else:
                    assert not expect.loader_must_refuse, context
                    CASES[(cls, "loader_accepts_validator_refusal")] += 1


# ------------------------------------------------------------------------------------------------ raw bytes


@settings(max_examples=EXAMPLES * 2, **SETTINGS)
@given(
    chunks=st.lists(
        st.binary(max_size=80)
        | st.sampled_from([b"{", b"}", b"[", b'"', b"\xef\xbb\xbf", b"\r", b"\x00", b"\xff\xfe", b"null"])
        | st.builds(lambda v: json.dumps(v).encode(), json_values)
        | st.builds(
            lambda i, u, img: json.dumps(
                {"id": i, "conversations": [{"user": u, "assistant": "ok", "image": img}]}
            ).encode(),
            st.integers(0, 3),
            texts,
            st.sampled_from(["x.png", "../x.png", "", "/", "~"]),
        ),
        max_size=12,
    )
)
def test_arbitrary_bytes_never_raise(chunks):
    data = b"".join(chunks)
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "raw.jsonl"
        jsonl.write_bytes(data)
        records, problems = read_jsonl(jsonl)
        problems = validate_records(records, problems, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS)
        lines = data.split(b"\n")
        accounted = {located(p, jsonl, len(lines)) for p in problems}
        accounted |= {located(Problem(r.origin, r.id, "", "x"), jsonl, len(lines)) for r in records}
        for lineno, line in enumerate(lines, start=1):
            blank = is_blank(line, lineno == 1)
            assert blank != (lineno in accounted), (lineno, line)
            RAW_LINES["blank" if blank else "accounted"] += 1
        RAW_LINES["files"] += 1


# ------------------------------------------------------------------------------------- whole-file failures


def test_unreadable_or_missing_jsonl_is_a_data_error_naming_the_file(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(DataError, match="missing.jsonl"):
        read_jsonl(missing)
    (tmp_path / "a_folder").mkdir()
    with pytest.raises(DataError, match="a_folder"):
        read_jsonl(tmp_path / "a_folder")
    locked = tmp_path / "locked.jsonl"
    locked.write_text('{"id": 1, "conversations": [{"user": "q", "assistant": "a"}]}\n')
    locked.chmod(0)
    try:
        try:
            records, problems = read_jsonl(locked)
        except DataError as err:
            assert not IS_ROOT and "locked.jsonl" in str(err)
        else:  # root reads chmod 000 files
            assert len(records) == 1 and not problems
    finally:
        locked.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_validator_names_the_image_key_the_line_uses(tmp_path):
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text(json.dumps({"id": "a", "conversations": [{"user": "q", "assistant": "x", "image": "gone.png"}]}))
    records, problems = read_jsonl(jsonl)
    (problem,) = validate_records(records, problems)
    assert "not found" in problem.message
    assert problem.field == "conversations[0].image"


# --------------------------------------------------------------------------------------------------- summary


def test_zz_every_case_class_was_tried():
    """Runs last in this file: every class produced cases; prints the counts (``pytest -s`` shows them)."""
    if not CASES:
        pytest.skip("run the whole file: the counts come from the property tests above")
    per_class = Counter()
    for (cls, outcome), n in CASES.items():
        if outcome != "loader_accepts_validator_refusal":
            per_class[cls] += n
    total = sum(per_class.values())
    files = len(CLASSES) * PER_CLASS + EXAMPLES
    print(f"\nhostile input: {total} lines in {files} files (+ raw bytes: {dict(RAW_LINES)})")
    for cls in CLASSES:
        outcomes = {o: n for (c, o), n in sorted(CASES.items()) if c == cls}
        print(f"  {cls:22s} {per_class[cls]:4d}  {outcomes}")
    print(f"  planned from headers but refused when decoded: {len(LATE_REFUSALS)} {LATE_REFUSALS[:3]}")
    assert set(per_class) == set(CLASSES), set(CLASSES) - set(per_class)
