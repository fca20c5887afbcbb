"""Synthetic picture tasks for the demo: learnable from pixels by a tiny randomly initialised model on a CPU.

Four tasks, each a single turn with a one-word answer from a small closed set (``CLASSES``):

* ``colour``  -- one image, one large filled shape; answer its colour (red / green / blue / black).
* ``shape``   -- one image, one very large filled shape; answer its kind (circle / square / triangle).
* ``compare`` -- two images, each with one shape of very different sizes; which image has the bigger one
  (first / second).
* ``motion``  -- eight frames of a large dot crossing the frame in a straight line; answer the direction
  (left / right / up / down). The frames are the turn's images, in order.

Everything is deterministic: a record's pixels and answer depend only on ``seed`` and its id, so records do not
change when more are asked for, and train / eval splits (different ids) never share a record. Answers are balanced:
every consecutive block of ``len(CLASSES[task])`` records holds each class exactly once, in a seeded random order.

``write_jsonl`` writes records in the project's conversations jsonl format (``data.jsonl`` plus ``images/*.png``);
``preference_pairs`` turns records into preference pairs (chosen: the right answer, rejected: a wrong one).
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from ..processing.geometry import CROP_SIZE
from .schema import ImageRef, Record, Turn

#: Every task the generator knows; the demo trains on ``DEMO_TASKS``.
TASKS: tuple[str, ...] = ("colour", "shape", "compare", "motion", "video")
#: Tasks a tiny model learns quickly on a CPU: one image, two images, an 8-frame video.
DEMO_TASKS: tuple[str, ...] = ("colour", "compare", "video")
#: The demo's data: samples per task for training and for the held-out split.
DEMO_SIZES = {"train_per_task": 100, "eval_per_task": 20}
#: The preference-tuning demo's data (colour task): training and held-out pairs, and samples of its brief SFT stage.
DPO_DEMO_SIZES = {"train_pairs": 96, "eval_pairs": 32, "sft_samples": 48}

#: task -> the answer words (lowercase, one word each).
CLASSES: dict[str, list[str]] = {
    "colour": ["red", "green", "blue", "black"],
    "shape": ["circle", "square", "triangle"],
    "compare": ["first", "second"],
    "motion": ["left", "right", "up", "down"],
    "video": ["red", "green", "blue", "black"],
}

#: task -> the fixed user question.
QUESTIONS: dict[str, str] = {
    "colour": "What colour is the shape? Answer with one word.",
    "shape": "What shape is shown? Answer with one word.",
    "compare": "Which image shows the bigger shape? Answer first or second.",
    "motion": "In which direction does the dot move? Answer with one word.",
    "video": "The dot changes colour during the video. What colour is it at the end? Answer with one word.",
}

#: The palette: very distinct, pure-ish RGB colours (each channel is jittered by at most ``COLOUR_JITTER``). No two
#: are opposite each other around the grey background: a tiny random model confused blue and yellow for long.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 175, 55),
    "blue": (35, 65, 220),
    "black": (25, 25, 25),
}
COLOUR_JITTER = 20
#: Plain light-grey background of every image.
BACKGROUND: tuple[int, int, int] = (210, 210, 210)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Frames per ``motion`` record.
MOTION_FRAMES = 8
#: Prefix of the eval records' ids in ``demo_split`` (train ids have none).
EVAL_ID_PREFIX = "eval-"

# Sizes as fractions of the image side.
_COLOUR_SIZE = (0.40, 0.60)
_SHAPE_SIZE = (0.50, 0.70)
_COMPARE_SMALL = (0.20, 0.30)
_COMPARE_BIG = (0.60, 0.75)
# Motion: dot radius and position offsets in pixels of a one-crop (336) image, scaled by image_size / CROP_SIZE.
_DOT_RADIUS = (40, 60)
_EDGE_MARGIN = (4, 16)  # gap between the dot and the edge at the start and end of the track
_PERPENDICULAR_JITTER = 40  # the track's offset from the centre line, at most this much either way


# ------------------------------------------------------------------------------------------------ drawing


def _colour(rng: random.Random, name: str) -> tuple[int, int, int]:
    r, g, b = (min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in PALETTE[name])
    return r, g, b


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, x0: int, y0: int, side: int, fill: tuple[int, int, int]) -> None:
    """A filled ``kind`` whose bounding box is the ``side`` x ``side`` square at ``(x0, y0)``."""
    x1, y1 = x0 + side - 1, y0 + side - 1
    if kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif kind == "triangle":  # upright isosceles: base along the bottom, apex at the top centre
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r} (expected one of {', '.join(SHAPES)})")


def _shape_image(rng: random.Random, size: int, kind: str, colour: str, side_range: tuple[float, float]) -> Image.Image:
    """One filled shape, side drawn from ``side_range`` (fractions of ``size``), at a random place fully inside."""
    side = rng.randint(round(side_range[0] * size), round(side_range[1] * size))
    x0 = rng.randint(0, size - side)
    y0 = rng.randint(0, size - side)
    image = Image.new("RGB", (size, size), BACKGROUND)
    _draw_shape(ImageDraw.Draw(image), kind, x0, y0, side, _colour(rng, colour))
    return image


def _motion_frames(rng: random.Random, size: int, direction: str, end_colour: str | None = None) -> list[Image.Image]:
    """A dot crossing the frame; with ``end_colour`` it switches to that colour halfway (from another colour)."""
    scale = size / CROP_SIZE
    radius = round(rng.randint(*_DOT_RADIUS) * scale)
    if end_colour is None:
        colour = _colour(rng, rng.choice(list(PALETTE)))
        colours = [colour] * MOTION_FRAMES
    else:
        first = rng.choice([c for c in PALETTE if c != end_colour])
        half = MOTION_FRAMES // 2
        colours = [_colour(rng, first)] * half + [_colour(rng, end_colour)] * (MOTION_FRAMES - half)
    start = radius + round(rng.randint(*_EDGE_MARGIN) * scale)
    end = size - 1 - radius - round(rng.randint(*_EDGE_MARGIN) * scale)
    across = size / 2 + rng.uniform(-_PERPENDICULAR_JITTER, _PERPENDICULAR_JITTER) * scale
    if direction in ("left", "up"):
        start, end = end, start
    frames = []
    for k in range(MOTION_FRAMES):
        along = start + (end - start) * k / (MOTION_FRAMES - 1)
        cx, cy = (along, across) if direction in ("left", "right") else (across, along)
        cx, cy = round(cx), round(cy)
        frame = Image.new("RGB", (size, size), BACKGROUND)
        ImageDraw.Draw(frame).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colours[k])
        frames.append(frame)
    return frames


def _make_images(task: str, answer: str, rng: random.Random, size: int) -> list[Image.Image]:
    if task == "colour":
        return [_shape_image(rng, size, rng.choice(SHAPES), answer, _COLOUR_SIZE)]
    if task == "shape":
        return [_shape_image(rng, size, answer, rng.choice(list(PALETTE)), _SHAPE_SIZE)]
    if task == "compare":
        kind = rng.choice(SHAPES)  # same kind in both images: only the size differs
        ranges = (_COMPARE_BIG, _COMPARE_SMALL) if answer == "first" else (_COMPARE_SMALL, _COMPARE_BIG)
        return [_shape_image(rng, size, kind, rng.choice(list(PALETTE)), r) for r in ranges]
    if task == "motion":
        return _motion_frames(rng, size, answer)
    if task == "video":
        return _motion_frames(rng, size, rng.choice(CLASSES["motion"]), end_colour=answer)
    raise ValueError(f"unknown task {task!r} (expected one of {', '.join(TASKS)})")


# ------------------------------------------------------------------------------------------------ records


def _answers(task: str, seed: int, id_prefix: str, n: int) -> list[str]:
    """Balanced answers for records ``0 .. n-1``: each block of ``k`` classes is a seeded random permutation."""
    classes = CLASSES[task]
    k = len(classes)
    answers: list[str] = []
    block = -1
    order: list[str] = []
    for i in range(n):
        if i // k != block:
            block = i // k
            order = list(classes)
            random.Random(f"phi3v-demo-labels:{seed}:{id_prefix}{task}:{block}").shuffle(order)
        answers.append(order[i % k])
    return answers


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def make_demo_records(
    n_per_task: int,
    seed: int,
    tasks: Sequence[str] = TASKS,
    image_size: int = CROP_SIZE,
    *,
    id_prefix: str = "",
    as_png: bool = False,
) -> list[Record]:
    """``n_per_task`` records of each task in ``tasks`` (grouped by task, in order), ids ``{id_prefix}{task}-{i:06d}``.

    A record's images and answer depend only on ``seed``, ``id_prefix``, its task and index ``i`` (and
    ``image_size``). ``as_png`` stores each image as PNG bytes (plain shapes compress to a small fraction of the
    decoded size) instead of a PIL image.
    """
    if n_per_task < 0:
        raise ValueError(f"n_per_task must be >= 0, got {n_per_task}")
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64, got {image_size}")
    unknown = [t for t in tasks if t not in CLASSES]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))} (expected some of {', '.join(TASKS)})")
    records: list[Record] = []
    for task in tasks:
        for i, answer in enumerate(_answers(task, seed, id_prefix, n_per_task)):
            rid = f"{id_prefix}{task}-{i:06d}"
            rng = random.Random(f"phi3v-demo:{seed}:{rid}")
            pil = _make_images(task, answer, rng, image_size)
            images: list[ImageRef] = [_png(image) for image in pil] if as_png else list(pil)
            turn = Turn(user=QUESTIONS[task], assistant=answer, images=images)
            records.append(Record(id=rid, source=task, turns=[turn], origin=f"synthetic:{rid}"))
    return records


def demo_split(
    n_train_per_task: int, n_eval_per_task: int, seed: int = 0, tasks: Sequence[str] = TASKS, **kwargs
) -> tuple[list[Record], list[Record]]:
    """Train and held-out eval records. Eval ids carry ``EVAL_ID_PREFIX``, so their random streams are disjoint
    from the train ones; the eval set does not depend on ``n_train_per_task``. ``kwargs`` go to
    ``make_demo_records`` (``image_size``, ``as_png``).
    """
    train = make_demo_records(n_train_per_task, seed, tasks, **kwargs)
    evaluation = make_demo_records(n_eval_per_task, seed, tasks, id_prefix=EVAL_ID_PREFIX, **kwargs)
    return train, evaluation


def preference_pairs(records: Sequence[Record], seed: int = 0) -> list[Record]:
    """Preference pairs of demo records: the chosen answer is the record's (right) answer, the rejected one another
    answer of its task, drawn from a seeded stream per record id (balanced over the wrong classes on average)."""
    pairs = []
    for record in records:
        turn = record.turns[-1]
        wrong = [c for c in CLASSES[record.source] if c != turn.assistant]
        rejected = random.Random(f"phi3v-demo-rejected:{seed}:{record.id}").choice(wrong)
        last = Turn(user=turn.user, assistant="", images=turn.images, chosen=turn.assistant, rejected=rejected)
        pairs.append(Record(id=record.id, source=record.source, turns=[*record.turns[:-1], last], origin=record.origin))
    return pairs


# ------------------------------------------------------------------------------------------------ writing


def _save_png(image: ImageRef, path: Path) -> None:
    if isinstance(image, Image.Image):
        image.save(path, "PNG", compress_level=1)
        return
    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
        opened.save(path, "PNG", compress_level=1)


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def write_jsonl(records: Sequence[Record], folder: str | os.PathLike) -> Path:
    """Write ``folder/data.jsonl`` and ``folder/images/{id}_{k}.png``; return the jsonl path.

    One line per record in the conversations format ``{"id", "source", "conversations": [{"images": [...],
    "user", "assistant"}]}``, image paths relative to ``folder``. A turn's ``video`` is written as it is.
    """
    folder = Path(folder)
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    path = folder / "data.jsonl"
    with open(path, "w", encoding="utf-8") as out:
        for record in records:
            number = 0
            conversations = []
            for turn in record.turns:
                entry: dict = {}
                if turn.images:
                    names = []
                    for image in turn.images:
                        name = f"{_safe_name(record.id)}_{number}.png"
                        number += 1
                        _save_png(image, image_dir / name)
                        names.append(f"images/{name}")
                    entry["images"] = names
                if turn.video is not None:
                    entry["video"] = str(turn.video)
                entry["user"] = turn.user
                if turn.chosen is not None:  # a preference pair's last turn
                    entry["chosen"], entry["rejected"] = turn.chosen, turn.rejected
                else:
                    entry["assistant"] = turn.assistant
                conversations.append(entry)
            obj: dict = {"id": record.id}
            if record.source is not None:
                obj["source"] = record.source
            obj["conversations"] = conversations
            out.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return path
