"""Reading data: the conversations jsonl / json, and datasets tables (the_cauldron, DocVQA, conversations)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from phi3v_tune.data import (
    DataError,
    Turn,
    load_hf_dataset,
    load_image,
    load_records,
    read_jsonl,
    validate_path,
    validate_records,
)


def save_image(path: Path, size=(32, 32), color=(10, 200, 30), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def png_bytes(size=(32, 32), color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path: Path, lines: list) -> Path:
    """Objects are dumped as JSON; strings and bytes are written as they are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for line in lines:
        if isinstance(line, bytes):
            out.append(line)
        elif isinstance(line, str):
            out.append(line.encode())
        else:
            out.append(json.dumps(line).encode())
    path.write_bytes(b"\n".join(out) + b"\n")
    return path


# ------------------------------------------------------------------------------------------------ good jsonl


def test_good_jsonl(tmp_path):
    data = tmp_path / "data"
    a = save_image(data / "a.png")  # next to the jsonl
    b = save_image(data / "images" / "sub" / "b.jpg", fmt="JPEG")  # found through images/
    c = save_image(tmp_path / "elsewhere" / "c.png")  # absolute
    jsonl = write_jsonl(
        data / "train.jsonl",
        [
            {
                "id": "multi",
                "source": "mine",
                "conversations": [
                    {"images": ["a.png", "sub/b.jpg"], "user": "Compare.", "assistant": "Same size."},
                    {"user": "And this one?", "assistant": "Bigger.", "images": [str(c)]},
                    {"user": "Thanks", "assistant": "You're welcome."},
                ],
            },
            "",
            {"id": 7, "conversations": [{"image": "a.png", "user": "What colour?", "assistant": "Green."}]},
            "   ",
            {"id": "vid", "conversations": [{"video": "clips/x.mp4", "user": "What happens?", "assistant": "A jump."}]},
        ],
    )
    records, problems = read_jsonl(jsonl)
    assert problems == []
    assert [r.id for r in records] == ["multi", "7", "vid"]
    multi = records[0]
    assert multi.source == "mine" and multi.origin == f"{jsonl}:1" and multi.answers is None
    assert [len(t.images) for t in multi.turns] == [2, 1, 0]
    assert multi.turns[0].images == [a, b] and multi.turns[1].images == [c]
    assert all(isinstance(p, Path) and p.is_absolute() for p in multi.images)
    assert multi.turns[2] == Turn("Thanks", "You're welcome.", [])
    assert records[1].origin == f"{jsonl}:3" and records[1].source is None
    assert records[1].turns[0].images == [a]
    # a video path is resolved like an image (first candidate kept when missing) and left as a string
    assert records[2].turns[0].video == str(data / "clips" / "x.mp4")
    assert records[2].turns[0].images == []

    problems = validate_records(records, problems)
    assert [(p.origin, p.field, p.message) for p in problems] == [
        (f"{jsonl}:5", "conversations[0].video", f"not found: {data / 'clips' / 'x.mp4'}")
    ]


def test_image_dir_override_and_json_list(tmp_path):
    data = tmp_path / "data"
    save_image(data / "a.png", color=(255, 0, 0))
    other = save_image(tmp_path / "pics" / "a.png", color=(0, 0, 255))
    obj = {"id": "x", "conversations": [{"images": ["a.png"], "user": "q", "assistant": "a"}]}
    jsonl = write_jsonl(data / "train.jsonl", [obj])
    records, _ = read_jsonl(jsonl, image_dir=tmp_path / "pics")
    assert records[0].turns[0].images == [other]
    records, _ = read_jsonl(jsonl)
    assert records[0].turns[0].images == [data / "a.png"]
    # with image_dir, only image_dir is searched: a missing file is reported with the image_dir path
    records, _ = read_jsonl(jsonl, image_dir=tmp_path / "empty")
    assert validate_records(records)[0].message == f"not found: {tmp_path / 'empty' / 'a.png'}"

    as_json = data / "train.json"
    as_json.write_text(json.dumps([obj, {"id": "y", "conversations": "nope"}]))
    records, problems = load_records(as_json, image_dir=tmp_path / "pics")
    assert [r.id for r in records] == ["x"] and records[0].turns[0].images == [other]
    assert [(p.origin, p.id, p.field) for p in problems] == [(f"{as_json}[1]", "y", "conversations")]
    # a folder holding {split}.jsonl
    records, problems = load_records(data, image_dir=tmp_path / "pics")
    assert [r.id for r in records] == ["x"] and records[0].origin == f"{jsonl}:1"
    # a .json file that is really JSON lines
    lines = data / "lines.json"
    lines.write_text(json.dumps(obj) + "\n" + json.dumps({**obj, "id": "z"}) + "\n")
    records, problems = load_records(lines)
    assert [r.id for r in records] == ["x", "z"] and problems == []


def test_missing_file_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "nope.jsonl")
    report = validate_path(tmp_path / "nope.jsonl")
    assert not report.ok and report.num_records == 0 and "file not found" in report.format()


# ------------------------------------------------------------------------------------------------ bad jsonl


def test_bad_jsonl_reports_every_problem(tmp_path):
    data = tmp_path / "data"
    save_image(data / "ok.png")
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (data / "trunc.png").write_bytes(png_bytes(size=(64, 64))[:-60])

    def conv(user="q", assistant="a", images=None):
        turn = {"user": user, "assistant": assistant}
        if images is not None:
            turn["images"] = images
        return [turn]

    # (line content, expected problems as (id, field, message fragment)); [] = a good line
    plan = [
        ({"id": "good1", "conversations": conv(images=["ok.png"])}, []),
        ("{not json", [(None, "", "invalid JSON")]),
        ("[1, 2]", [(None, "", "expected a JSON object")]),
        ({"conversations": conv()}, [(None, "id", "missing")]),
        ({"id": "noconv"}, [("noconv", "conversations", "missing")]),
        ({"id": "str", "conversations": "hello"}, [("str", "conversations", "expected a list of turns, got string")]),
        ({"id": "empty", "conversations": []}, [("empty", "conversations", "empty list")]),
        ({"id": "notobj", "conversations": ["hi"]}, [("notobj", "conversations[0]", "expected an object")]),
        (
            {"id": "usernum", "conversations": [{"user": 3, "assistant": "a"}]},
            [("usernum", "conversations[0].user", "got number")],
        ),
        (
            {"id": "noans", "conversations": [{"user": "q", "asistant": "a"}]},
            [("noans", "conversations[0].assistant", "'asistant'")],
        ),
        (
            {"id": "imgnum", "conversations": conv(images=["ok.png", 5])},
            [("imgnum", "conversations[0].images[1]", "got number")],
        ),
        (
            {"id": "imgstr", "conversations": conv(images="ok.png")},
            [("imgstr", "conversations[0].images", "got string")],
        ),
        ({"id": True, "conversations": conv()}, [(None, "id", "got boolean")]),
        (
            {"id": "emptyans", "conversations": conv(assistant="  ")},
            [("emptyans", "conversations[0].assistant", "empty answer")],
        ),
        (
            {"id": "missing", "conversations": conv(images=["nope.png"])},
            [("missing", "conversations[0].images[0]", "not found: ")],
        ),
        (
            {"id": "corrupt", "conversations": conv(images=["corrupt.png"])},
            [("corrupt", "conversations[0].images[0]", "cannot read ")],
        ),
        (
            {"id": "trunc", "conversations": conv(images=["trunc.png"])},
            [("trunc", "conversations[0].images[0]", "truncated")],
        ),
        (
            {"id": "escape", "conversations": conv(images=["../../etc/passwd"])},
            [("escape", "conversations[0].images[0]", "outside")],
        ),
        ({"id": "good1", "conversations": conv()}, [("good1", "id", "duplicate id (first used at ")]),
        (
            {
                "id": "tags",
                "conversations": [
                    {"images": ["ok.png"], "user": "<|image_1|>\nq", "assistant": "a"},
                    {"images": ["ok.png"], "user": "<|image_1|>\nq2", "assistant": "a2"},
                ],
            },
            [("tags", "conversations[1].user", "expected exactly <|image_2|>")],
        ),
        (b'{"id": "bytes", "conversations": "\xff\xfe"}', [(None, "", "not valid UTF-8")]),
        (
            {"id": "both", "conversations": [{"image": "ok.png", "images": ["ok.png"], "user": "q", "assistant": "a"}]},
            [("both", "conversations[0]", "both")],
        ),
        (  # a misspelt image key must not turn the sample into a text-only one
            {"id": "imgpath", "conversations": [{"image_path": "ok.png", "user": "q", "assistant": "a"}]},
            [("imgpath", "conversations[0].image_path", "unknown field")],
        ),
        (  # images at the top level would be ignored; other top-level keys are metadata and pass
            {"id": "toplevel", "images": ["ok.png"], "meta": {"split": "x"}, "conversations": conv()},
            [("toplevel", "images", "belong to a turn")],
        ),
        ({"id": "nullkey", "conversations": [{"video": None, "notes": None, "user": "q", "assistant": "a"}]}, []),
        ("", []),  # blank: skipped, not a sample
        ({"id": "good2", "conversations": conv(images=[str(data / "ok.png")]) * 2}, []),
    ]
    jsonl = write_jsonl(data / "bad.jsonl", [line for line, _ in plan])
    records, read_problems = read_jsonl(jsonl)

    nonblank = [n for n, (line, _) in enumerate(plan, start=1) if line != ""]
    bad_read_lines = {int(p.origin.rsplit(":", 1)[1]) for p in read_problems}
    record_lines = {int(r.origin.rsplit(":", 1)[1]) for r in records}
    assert not bad_read_lines & record_lines
    assert len(records) + len(bad_read_lines) == len(nonblank)  # nothing lost
    assert bad_read_lines | record_lines == set(nonblank)

    problems = validate_records(records, read_problems)
    got = [(int(p.origin.rsplit(":", 1)[1]), p.id, p.field, p.message) for p in problems]
    expected = [(n, id_, field, frag) for n, (_, exp) in enumerate(plan, start=1) for id_, field, frag in exp]
    assert [g[:3] for g in got] == [e[:3] for e in expected], "\n".join(map(str, problems))
    for g, e in zip(got, expected):
        assert e[3] in g[3], (g, e)
    assert all(p.origin.startswith(str(jsonl) + ":") for p in problems)
    # the named line of the first good1 and the full path of the missing file
    dup = next(p for p in problems if p.field == "id" and p.id == "good1")
    assert f"first used at {jsonl}:1" in dup.message
    missing = next(p for p in problems if p.id == "missing")
    assert missing.message == f"not found: {data / 'nope.png'}"
    assert str(missing).startswith(f"{jsonl}:15 id=missing conversations[0].images[0]: not found: ")

    report = validate_path(jsonl)
    assert report.num_records == len(records) and report.problems == problems
    assert report.num_images == sum(len(r.images) for r in records)
    assert f"{len(problems)} problems:" in report.format()


@st.composite
def garbage_line(draw):
    json_value = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
        max_leaves=8,
    )
    text_or_any = st.text(max_size=10) | json_value
    turn = st.dictionaries(
        st.sampled_from(["user", "assistant", "images", "image", "video", "other"]),
        text_or_any | st.lists(text_or_any, max_size=3),
        max_size=5,
    )
    record = st.fixed_dictionaries(
        {"id": st.text(max_size=5) | st.integers() | json_value},
        optional={"conversations": st.lists(turn | json_value, max_size=3) | json_value, "source": text_or_any},
    )
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=60)).replace(b"\n", b" ")
    if kind == 1:
        return draw(st.text(max_size=40)).replace("\n", " ").encode("utf-8", "surrogatepass")
    if kind == 2:
        return json.dumps(draw(json_value)).encode()
    return json.dumps(draw(record)).encode()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(garbage_line(), max_size=6))
def test_garbage_never_raises(tmp_path_factory, lines):
    folder = tmp_path_factory.getbasetemp() / "garbage"
    folder.mkdir(exist_ok=True)
    path = folder / "g.jsonl"
    path.write_bytes(b"\n".join(lines))
    records, problems = read_jsonl(path)
    if b"\n".join(lines).startswith((b"\xff\xfe", b"\xfe\xff")):  # a UTF-16/32 file: one problem for the file
        assert records == [] and [p.origin for p in problems] == [f"{path}:1"]
        assert "UTF-8" in str(problems[0])
        return
    nonblank = set()
    for n, raw in enumerate(lines, start=1):
        raw = raw[3:] if n == 1 and raw.startswith(b"\xef\xbb\xbf") else raw
        try:
            if not raw.decode("utf-8").strip():
                continue
        except UnicodeDecodeError:
            pass
        nonblank.add(n)
    covered = {int(r.origin.rsplit(":", 1)[1]) for r in records} | {int(p.origin.rsplit(":", 1)[1]) for p in problems}
    assert covered == nonblank
    assert len(records) <= len(nonblank)
    for p in validate_records(records, problems):
        assert str(p)


# ---------------------------------------------------------------------------------------------- datasets


def _cauldron_dataset(broken: bool = False):
    import datasets

    text = {"user": datasets.Value("string"), "assistant": datasets.Value("string"), "source": datasets.Value("string")}
    features = datasets.Features({"images": datasets.List(datasets.Image()), "texts": datasets.List(text)})
    red, blue = Image.new("RGB", (32, 24), "red"), Image.new("RGB", (16, 16), "blue")
    third = {"bytes": b"not an image", "path": None} if broken else Image.new("RGB", (8, 8), "green")
    return datasets.Dataset.from_dict(
        {
            "images": [[red, blue], [third]],
            "texts": [
                [
                    {"user": "Q1?", "assistant": "A1.", "source": "docvqa"},
                    {"user": "Q2?", "assistant": "A2.", "source": "docvqa"},
                ],
                [{"user": "Only?", "assistant": "Yes.", "source": "other"}],
            ],
        },
        features=features,
    )


def _docvqa_dataset():
    import datasets

    features = datasets.Features(
        {
            "questionId": datasets.Value("int64"),
            "image": datasets.Image(),
            "query": {"en": datasets.Value("string")},
            "answers": datasets.List(datasets.Value("string")),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "questionId": [101, 102],
            "image": [Image.new("RGB", (40, 30), "white"), Image.new("L", (20, 20), 128)],
            "query": [{"en": "What is the date?"}, {"en": "Who signed?"}],
            "answers": [["1 May 1990", "May 1, 1990"], ["J. Smith"]],
        },
        features=features,
    )


def _check_cauldron(records, label):
    assert [r.id for r in records] == ["train-0000000000", "train-0000000001"]
    first, second = records
    assert [len(t.images) for t in first.turns] == [2, 0]  # every image belongs to the first turn
    assert [(t.user, t.assistant) for t in first.turns] == [("Q1?", "A1."), ("Q2?", "A2.")]
    assert first.source == "docvqa" and second.source == "other"
    assert [load_image(i).size for i in first.images] == [(32, 24), (16, 16)]
    assert all(isinstance(i, (bytes, Image.Image)) for i in first.images)
    assert len(second.turns) == 1 and len(second.images) == 1
    assert first.origin == f"{label}[row 0]" and second.origin == f"{label}[row 1]"
    assert first.answers is None


def test_cauldron_save_to_disk_and_parquet(tmp_path):
    ds = _cauldron_dataset()
    disk = tmp_path / "cauldron_disk"
    ds.save_to_disk(str(disk))
    records, problems = load_records(disk)
    assert problems == []
    _check_cauldron(records, str(disk))
    arrow = next(disk.glob("*.arrow"))  # a single arrow file
    records, problems = load_records(arrow)
    assert problems == []
    _check_cauldron(records, str(arrow))

    pq = tmp_path / "pq" / "train-00000-of-00001.parquet"
    pq.parent.mkdir()
    ds.to_parquet(str(pq))
    cache = tmp_path / "cache"
    records, problems = load_records(pq, cache_dir=cache)
    assert problems == []
    _check_cauldron(records, str(pq))
    records, problems = load_records(pq.parent, cache_dir=cache)  # a folder of parquet files
    assert problems == []
    _check_cauldron(records, str(pq.parent))
    assert validate_records(records) == []

    with pytest.raises(DataError, match="split 'test'"):
        load_records(pq.parent, split="test", cache_dir=cache)


def test_docvqa_save_to_disk_and_parquet(tmp_path):
    import datasets

    ds = _docvqa_dataset()
    folder = tmp_path / "docvqa"
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(folder))
    pq = tmp_path / "docvqa.parquet"
    ds.to_parquet(str(pq))
    for source in (folder, pq):
        records = load_hf_dataset(source, split="validation", cache_dir=tmp_path / "cache")
        assert [r.id for r in records] == ["101", "102"]
        assert [len(r.turns) for r in records] == [1, 1]
        assert records[0].turns[0].user == "What is the date?\nAnswer briefly."  # the recipe's DocVQA prompt
        assert records[0].turns[0].assistant == "1 May 1990"
        assert records[0].answers == ["1 May 1990", "May 1, 1990"] and records[1].answers == ["J. Smith"]
        assert [load_image(r.images[0]).size for r in records] == [(40, 30), (20, 20)]
    with pytest.raises(DataError, match="no split 'train'"):
        load_records(folder)


def test_docvqa_plain_question_and_generated_ids(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"image": [png_bytes()], "question": ["Q?"], "answers": [["a", "b"]]},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "question": datasets.Value("string"),
                "answers": datasets.List(datasets.Value("string")),
            }
        ),
    )
    ds.save_to_disk(str(tmp_path / "d"))
    records, problems = load_records(tmp_path / "d", split="val")
    assert problems == [] and records[0].id == "val-0000000000" and records[0].answers == ["a", "b"]


def test_unanswered_questions_are_read_only_when_answers_are_not_required(tmp_path):
    """`answers_required=False` (predict) reaches every reader, through a data folder, a list of sources, a .json
    list and a table: a last turn without "assistant" (or a row without answers) is a question with an empty answer;
    an earlier turn still needs its answer. By default each is a problem, and the choice never leaks into a later
    read."""
    import datasets

    folder = tmp_path / "data"
    save_image(folder / "a.png")
    asked = {"id": "q", "conversations": [{"images": ["a.png"], "user": "What?"}]}
    early = {"id": "e", "conversations": [{"user": "1?"}, {"user": "2?", "assistant": "x"}]}
    write_jsonl(folder / "test.jsonl", [asked, early])
    (folder / "more.json").write_text(json.dumps([{**asked, "id": "j"}]))
    ds = datasets.Dataset.from_dict({"image": [png_bytes()], "question": ["Q?"], "answers": [[]]})
    ds.save_to_disk(str(tmp_path / "table"))

    records, problems = load_records([folder, folder / "more.json"], split="test", answers_required=False)
    assert [(r.id, r.turns[-1].assistant) for r in records] == [("q", ""), ("j", "")]
    assert [(p.id, p.field) for p in problems] == [("e", "conversations[0].assistant")]
    assert "only the last turn's answer may be left out" in problems[0].message
    (row,), none = load_records(tmp_path / "table", split="train", answers_required=False)
    assert none == [] and row.answers == [""] and row.turns[0].assistant == ""

    records, problems = load_records([folder, folder / "more.json"], split="test")
    assert records == [] and [(p.id, p.field) for p in problems] == [
        ("q", "conversations[0].assistant"),
        ("e", "conversations[0].assistant"),
        ("j", "conversations[0].assistant"),
    ]
    assert load_records(tmp_path / "table", split="train")[1][0].field == "answers"


def test_conversations_dataset(tmp_path):
    import datasets

    save_image(tmp_path / "ds" / "images" / "a.png")
    ds = datasets.Dataset.from_dict(
        {
            "id": ["c1", "c2"],
            "conversations": [
                [
                    {"images": ["a.png"], "user": "q", "assistant": "a"},
                    {"images": [], "user": "q2", "assistant": "a2"},
                ],
                [{"images": ["missing.png"], "user": "q", "assistant": " "}],
            ],
        }
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    report = validate_path(tmp_path / "ds")
    assert (report.num_records, report.num_turns, report.num_images) == (2, 3, 2)
    assert report.records[0].turns[0].images == [tmp_path / "ds" / "images" / "a.png"]
    assert [(p.origin, p.id, p.field) for p in report.problems] == [
        (f"{tmp_path / 'ds'}[row 1]", "c2", "conversations[0].assistant"),
        (f"{tmp_path / 'ds'}[row 1]", "c2", "conversations[0].images[0]"),
    ]


def test_dataset_row_problems_and_unknown_schema(tmp_path):
    import datasets

    _cauldron_dataset(broken=True).save_to_disk(str(tmp_path / "c"))
    report = validate_path(tmp_path / "c")
    assert [(p.origin, p.field) for p in report.problems] == [
        (f"{tmp_path / 'c'}[row 1]", "conversations[0].images[0]")
    ]
    assert report.problems[0].message.startswith("cannot read in-memory image")

    datasets.Dataset.from_dict({"foo": [1]}).save_to_disk(str(tmp_path / "u"))
    with pytest.raises(DataError, match="unrecognised columns"):
        load_records(tmp_path / "u")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no dataset in this folder"):
        load_records(tmp_path / "empty")
    with pytest.raises(DataError, match="no such file or folder"):
        load_records(tmp_path / "nothing_here")


def test_hub_failure_is_a_clear_error(monkeypatch):
    import datasets

    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        load_records("HuggingFaceM4/the_cauldron:docvqa", split="train")
    assert calls[0][0] == ("HuggingFaceM4/the_cauldron",) and calls[0][1]["name"] == "docvqa"
    assert "Hugging Face Hub" in str(info.value) and "no network" in str(info.value)


def test_a_repeated_id_is_reported_also_where_one_of_its_samples_does_not_parse(tmp_path):
    """Every problem at once: a sample with a malformed field still counts for duplicate ids, whichever of the two
    uses comes first, so fixing the field does not reveal a new problem on the next pass."""
    turn = [{"user": "q", "assistant": "a"}]
    jsonl = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"id": "a", "conversations": turn},
            {"id": "a", "conversations": [{"user": 3, "assistant": "a"}]},  # malformed, and a repeated id
            {"id": "b", "conversations": [{"user": "q", "assistant": 5}]},  # malformed, first use of b
            {"id": "b", "conversations": turn},
        ],
    )
    records, read_problems = read_jsonl(jsonl)
    assert [r.id for r in records] == ["a", "b"]
    found = [(p.origin.rsplit(":", 1)[1], p.id, p.field, p.message) for p in validate_records(records, read_problems)]
    assert found == [
        ("2", "a", "conversations[0].user", "expected a string, got number"),
        ("2", "a", "id", f"duplicate id (first used at {jsonl}:1; expected unique ids)"),
        ("3", "b", "conversations[0].assistant", "expected a string, got number"),
        ("4", "b", "id", f"duplicate id (first used at {jsonl}:3; expected unique ids)"),
    ]
