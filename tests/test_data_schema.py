"""The sample schema, problem reporting and the content checks of phi3v_tune.data.validate."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from phi3v_tune.data import (
    DataError,
    Problem,
    Record,
    Turn,
    ValidationReport,
    check_image,
    check_image_tags,
    sort_problems,
    validate_path,
    validate_records,
)


def png_bytes(size=(32, 32), color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path, size=(32, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (0, 120, 0)).save(path)
    return path


def rec(id_, *turns, origin=None):
    return Record(id=id_, source=None, turns=list(turns), origin=origin or f"d.jsonl:{id_}")


# ------------------------------------------------------------------------------------------------ schema


def test_problem_str_is_one_readable_line():
    p = Problem("data/train.jsonl:12", "abc", "conversations[0].assistant", "empty answer (expected non-empty text)")
    assert str(p) == "data/train.jsonl:12 id=abc conversations[0].assistant: empty answer (expected non-empty text)"
    assert str(Problem("t.jsonl:3", None, "", "invalid JSON: x")) == "t.jsonl:3: invalid JSON: x"
    assert str(Problem("t.jsonl:3", None, "id", "missing")) == "t.jsonl:3 id: missing"


def test_data_error_lists_problems_and_caps_the_list():
    problems = [Problem(f"f.jsonl:{i}", str(i), "id", "bad") for i in range(1, 121)]
    err = DataError(problems)
    assert isinstance(err, ValueError)
    assert err.problems == problems
    text = str(err)
    assert text.startswith("120 problems in the data:")
    assert "f.jsonl:50 id=50 id: bad" in text
    assert "f.jsonl:51 " not in text
    assert text.rstrip().endswith("... and 70 more")
    small = DataError(Problem("x", None, "", "boom"))
    assert str(small) == "1 problem in the data:\n  x: boom"


def test_turn_and_record_defaults():
    t = Turn(user="q", assistant="a")
    assert t.images == [] and t.video is None
    r = Record(id="1", source=None, turns=[Turn("q", "a", ["/x/1.png", "/x/2.png"]), Turn("q2", "a2", ["/x/3.png"])])
    assert r.answers is None and r.origin == ""
    assert r.images == ["/x/1.png", "/x/2.png", "/x/3.png"]


def test_sort_problems_orders_by_source_then_line():
    ps = [
        Problem("b.jsonl:3", None, "", "x"),
        Problem("a.jsonl:10", None, "", "x"),
        Problem("b.jsonl:1", None, "", "first"),
        Problem("a.jsonl:2", None, "", "x"),
        Problem("b.jsonl:1", None, "", "second"),
        Problem("ds[row 2]", None, "", "x"),
        Problem("ds[row 1]", None, "", "x"),
    ]
    got = [(p.origin, p.message) for p in sort_problems(ps)]
    assert got == [
        ("b.jsonl:1", "first"),
        ("b.jsonl:1", "second"),
        ("b.jsonl:3", "x"),
        ("a.jsonl:2", "x"),
        ("a.jsonl:10", "x"),
        ("ds[row 1]", "x"),
        ("ds[row 2]", "x"),
    ]


# ------------------------------------------------------------------------------------------------ tags


def test_no_tags_anywhere_is_fine():
    r = rec("a", Turn("q", "a", ["1", "2"]), Turn("q2", "a2", ["3"]))
    assert check_image_tags(r) == []


def test_tags_are_numbered_across_the_conversation():
    good = rec(
        "a", Turn("<|image_1|><|image_2|>\nq", "a", ["1", "2"]), Turn("<|image_3|> q2", "a2", ["3"]), Turn("q3", "a3")
    )
    assert check_image_tags(good) == []
    # turn 2 restarting at 1 is wrong: its image is number 3 in the conversation
    bad = rec("b", Turn("<|image_1|><|image_2|>\nq", "a", ["1", "2"]), Turn("<|image_1|> q2", "a2", ["3"]))
    problems = check_image_tags(bad)
    assert [(p.field, p.id) for p in problems] == [("conversations[1].user", "b")]
    assert "<|image_3|>" in problems[0].message and "found <|image_1|>" in problems[0].message


def test_a_video_turn_owns_its_sampled_frames_when_tags_are_checked():
    """A video's frames are numbered after its turn's own images (8 by default): a later image is then <|image_9|>
    (<|image_5|> with 4 frames), and a wrong number after a video is caught like any other."""
    frames = "".join(f"<|image_{k}|>" for k in range(1, 9))
    good = rec("v", Turn(frames + "What happens?", "fade", video="/x/clip.mp4"), Turn("and <|image_9|>?", "r", ["1"]))
    assert check_image_tags(good) == []
    problems = check_image_tags(good, video_frames=4)
    assert [p.field for p in problems] == ["conversations[0].user", "conversations[1].user"]
    assert "expected exactly <|image_5|>" in problems[1].message
    bad = rec("w", Turn(frames + "What happens?", "fade", video="/x/clip.mp4"), Turn("and <|image_2|>?", "r", ["1"]))
    problems = check_image_tags(bad)
    assert [p.field for p in problems] == ["conversations[1].user"] and "found <|image_2|>" in problems[0].message
    untagged_video = rec("u", Turn("What happens?", "fade", video="/x/clip.mp4"), Turn("and <|image_9|>?", "r", ["1"]))
    assert [p.field for p in check_image_tags(untagged_video)] == ["conversations[0].user"]  # tags in all turns
    mixed = rec("m", Turn("<|image_1|> then " + "".join(f"<|image_{k}|>" for k in range(2, 10)), "x", ["1"], "/c.mp4"))
    assert check_image_tags(mixed) == []
    assert check_image_tags(mixed, per_turn=True) == []


def test_tags_in_one_turn_require_tags_in_all():
    r = rec("c", Turn("<|image_1|>\nq", "a", ["1"]), Turn("q2", "a2", ["2"]))
    problems = check_image_tags(r)
    assert [p.field for p in problems] == ["conversations[1].user"]
    assert "found no tags" in problems[0].message


def test_repeated_and_extra_tags():
    r = rec("d", Turn("<|image_1|><|image_1|> q", "a", ["1"]))
    problems = check_image_tags(r)
    assert len(problems) == 1 and "more than once" in problems[0].message
    r = rec("e", Turn("<|image_1|><|image_2|> q", "a", ["1"]))
    problems = check_image_tags(r)
    assert len(problems) == 1 and "found <|image_1|>, <|image_2|>" in problems[0].message
    r = rec("f", Turn("<|image_1|> q", "a"))
    assert "no tags, this turn has no images" in check_image_tags(r)[0].message


def test_tags_numbered_per_turn_for_the_recipe_layout():
    """--multi-turn recipe numbers every turn's images from 1; across-conversation numbers are then wrong."""
    per_turn = rec("p", Turn("<|image_1|> q", "a", ["1"]), Turn("<|image_1|> vs <|image_2|>", "b", ["2", "3"]))
    across = rec("c", Turn("<|image_1|> q", "a", ["1"]), Turn("<|image_2|> vs <|image_3|>", "b", ["2", "3"]))
    assert check_image_tags(per_turn, per_turn=True) == [] and check_image_tags(across) == []
    (problem,) = check_image_tags(across, per_turn=True)
    assert problem.field == "conversations[1].user" and "numbered from 1 in every turn" in problem.message
    assert "numbered across the whole conversation" in check_image_tags(per_turn)[0].message


def test_video_turns_and_later_turns_are_tag_checked():
    """The video turn owns <|image_2|>..<|image_9|> here (its 8 frames after turn 0's image): both wrong tags show."""
    r = rec(
        "v",
        Turn("<|image_1|> q", "a", ["1"]),
        Turn("<|image_9|> what happens?", "a", video="/v.mp4"),
        Turn("<|image_5|>", "a"),
    )
    assert [p.field for p in check_image_tags(r)] == ["conversations[1].user", "conversations[2].user"]


# ------------------------------------------------------------------------------------------------ records


def test_content_problems(tmp_path):
    img = save_png(tmp_path / "ok.png")
    records = [
        rec("1", Turn("q", "a", [img])),
        rec("2", Turn("q", "   ")),
        rec("3", Turn("  ", "a")),  # no text, no image
        rec("4", Turn("", "a", [img])),  # image only: fine
        rec("1", Turn("q", "a"), origin="d.jsonl:9"),
        rec("1", Turn("q", "a"), origin="d.jsonl:10"),
    ]
    problems = validate_records(records)
    got = [(p.origin, p.id, p.field) for p in problems]
    assert got == [
        ("d.jsonl:2", "2", "conversations[0].assistant"),
        ("d.jsonl:3", "3", "conversations[0].user"),
        ("d.jsonl:9", "1", "id"),
        ("d.jsonl:10", "1", "id"),
    ]
    assert "empty answer" in problems[0].message
    assert "first used at d.jsonl:1" in problems[2].message and "first used at d.jsonl:1" in problems[3].message


def test_validate_keeps_earlier_problems_in_order():
    earlier = [Problem("d.jsonl:5", None, "", "invalid JSON")]
    problems = validate_records([rec("2", Turn("q", ""))], earlier)
    assert [p.origin for p in problems] == ["d.jsonl:2", "d.jsonl:5"]


def test_image_checks(tmp_path):
    good = save_png(tmp_path / "good.png")
    big = save_png(tmp_path / "big.png", size=(64, 64))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not an image at all")
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(png_bytes(size=(64, 64))[:-40])
    folder = tmp_path / "folder.png"
    folder.mkdir()
    missing = tmp_path / "missing.png"
    assert check_image(good) is None
    assert check_image(str(good)) is None
    assert check_image(png_bytes()) is None
    assert check_image(Image.new("RGB", (4, 4))) is None
    assert check_image(missing) == f"not found: {missing}"
    assert check_image(folder) == f"not a file: {folder}"
    assert check_image(corrupt).startswith(f"cannot read {corrupt}: ")
    assert check_image(truncated).startswith(f"cannot read {truncated}: ")
    assert check_image(b"\x89PNG garbage").startswith("cannot read in-memory image: ")
    assert "more than max_image_pixels=1024" in check_image(big, max_image_pixels=32 * 32)
    assert check_image(good, max_image_pixels=32 * 32) is None
    assert "more than max_image_pixels" in check_image(Image.new("RGB", (40, 40)), max_image_pixels=100)

    r = rec("x", Turn("q", "a", [good, missing]), Turn("q", "a", [corrupt, good]))
    problems = validate_records([r])
    assert [p.field for p in problems] == ["conversations[0].images[1]", "conversations[1].images[0]"]
    assert problems[0].message == f"not found: {missing}"
    assert problems[1].message.startswith(f"cannot read {corrupt}: ")
    assert validate_records([r], check_images=False) == []


def test_missing_video_is_reported(tmp_path):
    video = tmp_path / "clip.mp4"
    r = rec("v", Turn("what happens?", "a", video=str(video)))
    problems = validate_records([r])
    assert [(p.field, p.message) for p in problems] == [("conversations[0].video", f"not found: {video}")]
    video.write_bytes(b"\x00" * 10)  # not decoded by training's check (planning decodes every video once)
    assert validate_records([r]) == []
    # `phi3v-tune validate` decodes it: an unreadable video is a located problem there, not only at training
    (problem,) = validate_records([r], decode_videos=True)
    assert problem.field == "conversations[0].video" and problem.message.startswith(f"video '{video}': cannot decode")
    pytest.importorskip("av")
    from test_convert import make_video

    make_video(video, 4)
    assert validate_records([r], decode_videos=True) == []


def test_many_images_use_progress_and_threads(tmp_path):
    paths = [save_png(tmp_path / f"{i}.png", size=(8, 8)) for i in range(210)]
    paths[7].write_bytes(b"broken")
    records = [rec(str(i), Turn("q", "a", [p])) for i, p in enumerate(paths)]
    problems = validate_records(records, num_workers=4)
    assert [(p.id, p.field) for p in problems] == [("7", "conversations[0].images[0]")]


def test_report_format(tmp_path):
    report = ValidationReport(
        "d.jsonl",
        3,
        4,
        5,
        [Problem("d.jsonl:2", "x", "conversations[0].assistant", "empty answer (expected non-empty text)")],
    )
    text = report.format()
    assert text.splitlines() == [
        "d.jsonl: 3 records, 4 turns, 5 images",
        "1 problem:",
        "  d.jsonl:2 id=x conversations[0].assistant: empty answer (expected non-empty text)",
    ]
    assert not report.ok
    with pytest.raises(DataError):
        report.raise_if_problems()
    clean = ValidationReport("d.jsonl", 1, 1, 0, [])
    assert clean.ok and clean.format().endswith("no problems found")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    empty = validate_path(tmp_path / "blank.jsonl")
    assert not empty.ok and "no samples found" in empty.format()
    (tmp_path / "wide.jsonl").write_text('{"id": "a", "conversations": []}\n{"id": "b"}\n', encoding="utf-16")
    (problem,) = validate_path(tmp_path / "wide.jsonl").problems
    assert problem.origin.endswith("wide.jsonl:1") and "save the file as UTF-8" in problem.message


def test_a_pixel_limit_above_pillows_own_is_honoured(tmp_path, monkeypatch):
    """--max-image-pixels above Pillow's limit accepts the image (Pillow refuses above twice its own limit when
    opening, before our check could); images over our limit are still refused, by us."""
    from phi3v_tune.processing.image import load_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 60x40 image is then a "bomb" to Pillow (> 2 * 1000)
    path = tmp_path / "wide.png"
    Image.new("RGB", (60, 40), (9, 8, 7)).save(path)
    assert check_image(path, max_image_pixels=5000) is None
    assert load_image(path, max_image_pixels=5000).size == (60, 40)
    assert "more than max_image_pixels=2000" in check_image(path, max_image_pixels=2000)
    with pytest.raises(ValueError, match="max_image_pixels=2000"):
        load_image(path, max_image_pixels=2000)
