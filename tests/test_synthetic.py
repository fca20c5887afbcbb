"""The demo's synthetic tasks: deterministic, balanced, the pixels carry the answer, splits disjoint, jsonl output."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from phi3v_tune.data.schema import Record
from phi3v_tune.data.synthetic import (
    BACKGROUND,
    CLASSES,
    MOTION_FRAMES,
    PALETTE,
    QUESTIONS,
    TASKS,
    demo_split,
    make_demo_records,
    write_jsonl,
)
from phi3v_tune.evaluate.metrics import is_correct

N_IMAGES = {"colour": 1, "shape": 1, "compare": 2, "motion": MOTION_FRAMES, "video": MOTION_FRAMES}


def _pixels(image) -> np.ndarray:
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _mask(image) -> np.ndarray:
    """Pixels that are not background."""
    return np.abs(_pixels(image) - np.array(BACKGROUND)).sum(axis=-1) > 30


def _digest(image) -> str:
    return hashlib.sha1(_pixels(image).tobytes()).hexdigest()


def _by_task(records: list[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for r in records:
        out.setdefault(r.source, []).append(r)
    return out


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return make_demo_records(24, seed=7)


def test_structure(records):
    assert set(CLASSES) == set(TASKS)
    groups = _by_task(records)
    assert list(groups) == list(TASKS)
    for task, recs in groups.items():
        assert [r.id for r in recs] == [f"{task}-{i:06d}" for i in range(24)]
        for r in recs:
            assert r.source == task and len(r.turns) == 1
            turn = r.turns[0]
            assert turn.user == QUESTIONS[task] and turn.video is None
            assert turn.assistant in CLASSES[task]
            assert len(turn.images) == N_IMAGES[task]
            for image in turn.images:
                assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (336, 336)
    assert len({r.id for r in records}) == len(records)


def test_deterministic(records):
    again = make_demo_records(24, seed=7)
    assert [r.id for r in again] == [r.id for r in records]
    assert [r.turns[0].assistant for r in again] == [r.turns[0].assistant for r in records]
    assert [_digest(i) for r in again for i in r.images] == [_digest(i) for r in records for i in r.images]

    other = make_demo_records(24, seed=8)
    same = sum(_digest(a) == _digest(b) for r, s in zip(records, other) for a, b in zip(r.images, s.images))
    assert same == 0
    assert [r.turns[0].assistant for r in other] != [r.turns[0].assistant for r in records]


def test_records_do_not_depend_on_count_or_task_list(records):
    fewer = make_demo_records(5, seed=7, tasks=("motion", "colour"))
    mine = {r.id: r for r in records}
    for r in fewer:
        assert r.turns[0].assistant == mine[r.id].turns[0].assistant
        assert [_digest(i) for i in r.images] == [_digest(i) for i in mine[r.id].images]


def test_classes_balanced():
    n = 200
    for task, recs in _by_task(make_demo_records(n, seed=1, image_size=64)).items():
        counts = Counter(r.turns[0].assistant for r in recs)
        assert set(counts) == set(CLASSES[task])
        uniform = n / len(CLASSES[task])
        assert all(abs(c - uniform) <= 0.2 * uniform for c in counts.values()), (task, counts)


def test_colour_pixels(records):
    names = list(PALETTE)
    palette = np.array([PALETTE[k] for k in names])
    for r in _by_task(records)["colour"]:
        mask = _mask(r.images[0])
        assert mask.mean() > 0.05  # a large shape
        mean = _pixels(r.images[0])[mask].mean(axis=0)
        nearest = names[int(np.argmin(((palette - mean) ** 2).sum(axis=1)))]
        assert nearest == r.turns[0].assistant, r.id


def test_shape_pixels(records):
    fill_of = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
    for r in _by_task(records)["shape"]:
        mask = _mask(r.images[0])
        ys, xs = np.nonzero(mask)
        height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert min(height, width) >= 0.5 * 336 - 2  # big: 50-70% of the side
        fill = mask.sum() / (height * width)
        nearest = min(fill_of, key=lambda k: abs(fill_of[k] - fill))
        assert nearest == r.turns[0].assistant, (r.id, fill)
        assert abs(fill - fill_of[nearest]) < 0.05, (r.id, fill)


def test_compare_pixels(records):
    for r in _by_task(records)["compare"]:
        areas = [_mask(image).sum() for image in r.images]
        big = 0 if r.turns[0].assistant == "first" else 1
        assert areas[big] > 3 * areas[1 - big], (r.id, areas)


def test_motion_pixels(records):
    for r in _by_task(records)["motion"]:
        answer = r.turns[0].assistant
        centroids = []
        for frame in r.images:
            ys, xs = np.nonzero(_mask(frame))
            assert len(xs) > np.pi * 35**2  # radius >= 40 px
            centroids.append((xs.mean(), ys.mean()))
        xs, ys = np.array(centroids).T
        along, across = (xs, ys) if answer in ("left", "right") else (ys, xs)
        steps = np.diff(along)
        if answer in ("left", "up"):
            steps = -steps
        assert (steps > 10).all(), (r.id, along)
        assert along.max() - along.min() > 336 / 2  # crosses most of the frame
        assert np.ptp(across) < 2  # a straight line
        assert abs(across.mean() - 168) <= 41


def test_splits_disjoint():
    train, evaluation = demo_split(40, 20, seed=3)
    assert len(train) == 40 * len(TASKS) and len(evaluation) == 20 * len(TASKS)
    assert not {r.id for r in train} & {r.id for r in evaluation}
    train_images = {_digest(i) for r in train for i in r.images}
    eval_images = {_digest(i) for r in evaluation for i in r.images}
    assert not train_images & eval_images
    # The eval set does not depend on the train size.
    _, evaluation2 = demo_split(5, 20, seed=3)
    assert [_digest(i) for r in evaluation2 for i in r.images] == [_digest(i) for r in evaluation for i in r.images]


def test_as_png_same_pixels():
    pil = make_demo_records(3, seed=2, tasks=("compare",))
    png = make_demo_records(3, seed=2, tasks=("compare",), as_png=True)
    assert all(isinstance(i, bytes) for r in png for i in r.images)
    assert [_digest(i) for r in png for i in r.images] == [_digest(i) for r in pil for i in r.images]


@pytest.mark.parametrize("as_png", [False, True])
def test_write_jsonl(tmp_path, as_png):
    recs = make_demo_records(3, seed=5, as_png=as_png)
    path = write_jsonl(recs, tmp_path / "demo")
    assert path == tmp_path / "demo" / "data.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(recs)
    for line, r in zip(lines, recs):
        obj = json.loads(line)
        assert obj["id"] == r.id and obj["source"] == r.source
        [turn] = obj["conversations"]
        assert turn["user"] == r.turns[0].user and turn["assistant"] == r.turns[0].assistant
        assert len(turn["images"]) == len(r.images)
        for rel, image in zip(turn["images"], r.images):
            assert not rel.startswith("/")
            file = path.parent / rel
            assert file.is_file()
            with Image.open(file) as reloaded:
                assert np.array_equal(_pixels(reloaded), _pixels(image))


def test_write_jsonl_reads_back(tmp_path):
    from phi3v_tune.data.sources import read_jsonl

    recs = make_demo_records(2, seed=9)
    path = write_jsonl(recs, tmp_path)
    loaded, problems = read_jsonl(path)
    assert problems == []
    assert [(r.id, r.source, r.turns[0].user, r.turns[0].assistant) for r in loaded] == [
        (r.id, r.source, r.turns[0].user, r.turns[0].assistant) for r in recs
    ]
    for a, b in zip(loaded, recs):
        assert [_digest(Image.open(p)) for p in a.images] == [_digest(i) for i in b.images]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        make_demo_records(1, 0, tasks=("colour", "texture"))
    with pytest.raises(ValueError):
        make_demo_records(-1, 0)


def test_answer_is_correct():
    """The demo scores its answers with the recipe's accuracy rule (one home: evaluate.metrics)."""
    assert is_correct(" Red. ", "red")
    assert is_correct("FIRST", "first.")
    assert not is_correct("reddish", "red")
    assert not is_correct("", "red")


def test_video_task_switches_colour_halfway(records):
    from phi3v_tune.data.synthetic import BACKGROUND, PALETTE

    for rec in [r for r in records if r.source == "video"][:8]:
        frames = rec.turns[0].images
        means = []
        for frame in frames:
            px = np.asarray(frame).reshape(-1, 3).astype(int)
            px = px[np.abs(px - np.array(BACKGROUND)).sum(1) > 60]
            means.append(px.mean(0))
        nearest = [min(PALETTE, key=lambda c, m=m: np.abs(np.array(PALETTE[c]) - m).sum()) for m in means]
        half = len(frames) // 2
        assert nearest[half:] == [rec.turns[0].assistant] * (len(frames) - half)
        assert len(set(nearest[:half])) == 1 and nearest[0] != rec.turns[0].assistant
