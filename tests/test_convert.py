"""`phi3v-tune convert`: UCF-101 videos -> frames + jsonl (the recipe's layout), the_cauldron -> jsonl."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

av = pytest.importorskip("av")

from phi3v_tune.data import SampleLayout, load_records  # noqa: E402
from phi3v_tune.data.convert import convert_cauldron, convert_ucf101  # noqa: E402
from phi3v_tune.data.video import count_frames, frame_indices, sample_frames  # noqa: E402


def make_video(path, n_frames: int, size=(48, 32)) -> None:
    """Frame k is a flat grey of value 12*k (mod 256), so decoded frames reveal their index (k < 22)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for k in range(n_frames):
            arr = np.full((size[1], size[0], 3), 12 * k % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def grey_index(image_path) -> int:
    return round(float(np.asarray(Image.open(image_path)).mean()) / 12)


@pytest.fixture()
def ucf_tree(tmp_path):
    root = tmp_path / "UCF101_subset"
    for split in ("train", "test"):
        for label, n in (("Basketball", 20), ("ApplyEyeMakeup", 13)):
            for v in ("v_b", "v_a"):
                make_video(root / split / label / f"{v}_{label}.avi", n)
    return root


def test_frame_indices_are_the_recipes():
    assert frame_indices(20, 8) == [0, 2, 5, 7, 10, 12, 15, 17]
    assert frame_indices(13, 8) == list(np.arange(0, 13, 13 / 8).astype(int))
    assert frame_indices(5, 8) == [0, 0, 1, 1, 2, 3, 3, 4]
    # the recipe's converter keeps each decoded frame once: a short video gives fewer frames
    assert frame_indices(5, 8, distinct=True) == [0, 1, 2, 3, 4]
    assert frame_indices(1, 8, distinct=True) == [0]
    assert frame_indices(20, 8, distinct=True) == frame_indices(20, 8)


def test_ucf101_layout_ids_questions_and_frames(ucf_tree, tmp_path):
    out = tmp_path / "out"
    files = convert_ucf101(ucf_tree, out, video_frames=8)
    assert [f.name for f in files] == ["ucf101_train.jsonl", "ucf101_test.jsonl"]  # the recipe's file names
    lines = [json.loads(x) for x in (out / "ucf101_train.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == [f"train-{i:010d}" for i in range(4)]
    # one counter over all videos, split after split (the recipe's enumerate over train + val + test)
    test_ids = [json.loads(x)["id"] for x in (out / "ucf101_test.jsonl").read_text().splitlines()]
    assert test_ids == [f"test-{i:010d}" for i in range(4, 8)]
    # classes sorted; videos sorted within a class
    assert [x["conversations"][0]["assistant"] for x in lines] == ["ApplyEyeMakeup"] * 2 + ["Basketball"] * 2
    first = lines[0]
    assert first["source"] == "ucf101"
    turn = first["conversations"][0]
    assert turn["user"] == "Classify the video into one of the following classes: ApplyEyeMakeup, Basketball."
    # paths relative to images/, as the recipe writes them (its loader joins them to DATA/images)
    assert turn["images"] == [f"train/ApplyEyeMakeup/v_a_ApplyEyeMakeup.{k}.jpg" for k in range(8)]
    # frame k of a 13-frame video is frame arange(0, 13, 13/8)[k]; not resized
    for k, rel in enumerate(turn["images"]):
        assert Image.open(out / "images" / rel).size == (48, 32)
        assert grey_index(out / "images" / rel) == frame_indices(13, 8)[k]
    bball = lines[2]["conversations"][0]["images"]
    assert [grey_index(out / "images" / r) for r in bball] == [0, 2, 5, 7, 10, 12, 15, 17]
    # our reader takes the folder (ucf101_{split}.jsonl) and finds the frames below images/
    records, problems = load_records(out, split="test")
    assert problems == [] and [r.id for r in records] == test_ids
    assert Path(records[0].images[0]) == out / "images" / "test" / "ApplyEyeMakeup" / "v_a_ApplyEyeMakeup.0.jpg"


def test_ucf101_classes_from_every_split_and_short_videos(tmp_path):
    """The class list is one for all splits (folders holding videos); a video of 5 frames gives 5 frames."""
    root = tmp_path / "ucf"
    make_video(root / "train" / "Archery" / "v_1.avi", 9)
    make_video(root / "train" / "Zumba" / "v_2.avi", 5)
    make_video(root / "val" / "Archery" / "v_3.avi", 9)
    (root / "train" / "Empty").mkdir()
    out = tmp_path / "out"
    convert_ucf101(root, out)
    train = [json.loads(x) for x in (out / "ucf101_train.jsonl").read_text().splitlines()]
    (val,) = [json.loads(x) for x in (out / "ucf101_val.jsonl").read_text().splitlines()]
    question = "Classify the video into one of the following classes: Archery, Zumba."
    assert {line["conversations"][0]["user"] for line in train + [val]} == {question}
    assert val["id"] == "val-0000000002"
    short = train[1]["conversations"][0]["images"]
    assert [grey_index(out / "images" / r) for r in short] == [0, 1, 2, 3, 4]


def test_ucf101_from_tar_and_video_frames(ucf_tree, tmp_path):
    archive = tmp_path / "UCF101_subset.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(ucf_tree, arcname="UCF101_subset")
    out = tmp_path / "from_tar"
    convert_ucf101(archive, out, video_frames=4)
    line = json.loads((out / "ucf101_test.jsonl").read_text().splitlines()[3])
    assert line["id"] == "test-0000000007" and len(line["conversations"][0]["images"]) == 4


def test_video_frames_in_a_turn_are_sampled(tmp_path):
    make_video(tmp_path / "clip.avi", 16)
    frames = sample_frames(tmp_path / "clip.avi", 8)
    assert len(frames) == 8
    assert [round(float(np.asarray(f).mean()) / 12) for f in frames] == [0, 2, 4, 6, 8, 10, 12, 14]
    assert count_frames(tmp_path / "clip.avi") == 16  # what validate decodes, keeping no frame


def test_cauldron_table_to_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets")
    img = Image.new("RGB", (20, 10), (200, 10, 10))
    table = datasets.Dataset.from_dict(
        {
            "images": [[img, img], [img]],
            "texts": [
                [
                    {"user": "Same?", "assistant": "yes", "source": "nlvr2"},
                    {"user": "Red?", "assistant": "yes", "source": "nlvr2"},
                ],
                [{"user": "Colour?", "assistant": "red", "source": "nlvr2"}],
            ],
        },
        features=datasets.Features(
            {
                "images": datasets.Sequence(datasets.Image()),
                "texts": [
                    {
                        "user": datasets.Value("string"),
                        "assistant": datasets.Value("string"),
                        "source": datasets.Value("string"),
                    }
                ],
            }
        ),
    )
    table.save_to_disk(str(tmp_path / "cauldron"))
    (path,) = convert_cauldron(tmp_path / "cauldron", tmp_path / "jsonl", split="train")
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 2 and len(rows[0]["conversations"]) == 2
    assert len(rows[0]["conversations"][0]["images"]) == 2 and "images" not in rows[0]["conversations"][1]
    assert (tmp_path / "jsonl" / rows[1]["conversations"][0]["images"][0]).is_file()
    from phi3v_tune.data import read_jsonl

    records, problems = read_jsonl(path)
    assert not problems and records[0].turns[1].assistant == "yes"


def _cauldron_table(datasets, ids, images):
    return datasets.Dataset.from_dict(
        {
            "id": ids,
            "images": [[im] for im in images],
            "texts": [[{"user": "Colour?", "assistant": str(i), "source": "t"}] for i in range(len(ids))],
        },
        features=datasets.Features(
            {
                "id": datasets.Value("string"),
                "images": datasets.Sequence(datasets.Image()),
                "texts": [{k: datasets.Value("string") for k in ("user", "assistant", "source")}],
            }
        ),
    )


def test_cauldron_ids_that_clash_as_file_names_keep_their_own_images(tmp_path):
    """Ids differing only in characters a file name cannot hold (or in case, or past the length kept in names) get
    distinct files: every row's image is its own."""
    datasets = pytest.importorskip("datasets")
    ids = ["a/b", "a_b", "a b", "A_B", "x" * 300, "x" * 299 + "y"]
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    images = [Image.new("RGB", (12, 8), c) for c in colours]
    _cauldron_table(datasets, ids, images).save_to_disk(str(tmp_path / "c"))
    (path,) = convert_cauldron(tmp_path / "c", tmp_path / "out")
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    files = [row["conversations"][0]["images"][0] for row in rows]
    assert [row["id"] for row in rows] == ids and len({f.casefold() for f in files}) == len(ids)
    for f, colour in zip(files, colours):
        assert Image.open(tmp_path / "out" / f).convert("RGB").getpixel((0, 0)) == colour


def test_cauldron_with_an_unreadable_image_names_the_row_and_writes_nothing(tmp_path):
    datasets = pytest.importorskip("datasets")
    good = Image.new("RGB", (12, 8), (1, 2, 3))
    table = _cauldron_table(datasets, ["ok", "broken"], [good, good])
    rows = table.cast_column("images", datasets.Sequence(datasets.Image(decode=False))).to_list()
    rows[1]["images"][0] = {"bytes": b"not an image at all", "path": None}
    broken = datasets.Dataset.from_list(rows, features=table.features)
    broken.save_to_disk(str(tmp_path / "c"))
    with pytest.raises(ValueError) as err:
        convert_cauldron(tmp_path / "c", tmp_path / "out")
    message = str(err.value)
    assert "nothing was written" in message and "[row 1]" in message and "id=broken" in message
    assert "conversations[0].images[0]" in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def test_a_video_turn_trains_as_its_sampled_frames(tmp_path, tiny_processor):
    from phi3v_tune.data import read_jsonl
    from phi3v_tune.data.examples import build_example

    make_video(tmp_path / "clip.avi", 12)
    (tmp_path / "d.jsonl").write_text(
        json.dumps({"id": "v1", "conversations": [{"video": "clip.avi", "user": "What happens?", "assistant": "fade"}]})
        + "\n"
    )
    (record,), problems = read_jsonl(tmp_path / "d.jsonl")
    assert not problems and record.turns[0].video.endswith("clip.avi")
    example = build_example(record, tiny_processor, SampleLayout(video_frames=8))
    assert example["num_images"] == 8 and example["pixel_values"].shape[0] == 8
    assert [int((example["input_ids"] == -k).sum() > 0) for k in range(1, 9)] == [1] * 8
    assert build_example(record, tiny_processor, SampleLayout(video_frames=4))["num_images"] == 4


def test_evaluation_questions_of_a_video_record_keep_its_frames_and_golds(tmp_path, tiny_processor):
    """Split into questions for evaluation, a record whose first turn is a video gives every question the 8 frames
    plus the later image (tags numbered across the record: the image is <|image_9|>); its gold answers go with the
    last question, the one they belong to."""
    from phi3v_tune.data import read_jsonl, validate_records
    from phi3v_tune.data.examples import build_example
    from phi3v_tune.evaluate.runner import golds_of, split_questions

    make_video(tmp_path / "clip.avi", 12)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    turns = [
        {
            "video": "clip.avi",
            "user": "".join(f"<|image_{k}|>" for k in range(1, 9)) + "What happens?",
            "assistant": "fade",
        },
        {"images": ["red.png"], "user": "and <|image_9|>?", "assistant": "red"},
    ]
    line = {"id": "v", "conversations": turns, "answers": ["red", "crimson"]}
    (tmp_path / "d.jsonl").write_text(json.dumps(line) + "\n")
    (record,), problems = read_jsonl(tmp_path / "d.jsonl")
    assert not problems and not validate_records([record])
    first, second = split_questions([record], SampleLayout(video_frames=8))
    frames = sample_frames(tmp_path / "clip.avi", 8)
    for q in (first, second):
        assert len(q.turns) == 1 and q.turns[0].video is None and len(q.turns[0].images) == 9
        assert [np.asarray(f).tolist() for f in q.turns[0].images[:8]] == [np.asarray(f).tolist() for f in frames]
        example = build_example(q, tiny_processor, SampleLayout(video_frames=8), for_generation=True)
        assert example["num_images"] == 9
    assert first.turns[0].user == "<|image_9|>\n" + turns[0]["user"]
    assert second.turns[0].user == "".join(f"<|image_{k}|>" for k in range(1, 9)) + "\nand <|image_9|>?"
    assert golds_of(first) == ["fade"] and golds_of(second) == ["red", "crimson"]
    (only,) = split_questions([record], SampleLayout(video_frames=8), questions="first")
    assert only.id == "v" and golds_of(only) == ["fade"] and len(only.turns[0].images) == 9


def test_a_wrong_frame_count_in_the_header_does_not_change_the_frames(tmp_path):
    import struct

    root = tmp_path / "ucf"
    path = root / "train" / "Archery" / "v_x.avi"
    make_video(path, 20)
    data = bytearray(path.read_bytes())
    avih = data.index(b"avih")
    struct.pack_into("<I", data, avih + 8 + 16, 3)  # MainAVIHeader.dwTotalFrames
    strh = data.index(b"strh")
    struct.pack_into("<I", data, strh + 8 + 32, 3)  # AVIStreamHeader.dwLength
    path.write_bytes(bytes(data))
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 3  # the header now lies
    convert_ucf101(root, tmp_path / "out")
    line = json.loads((tmp_path / "out" / "ucf101_train.jsonl").read_text())
    got = [grey_index(tmp_path / "out" / "images" / r) for r in line["conversations"][0]["images"]]
    assert got == [0, 2, 5, 7, 10, 12, 15, 17]  # indices from the 20 decoded frames


def test_frames_per_video_below_one_are_refused(tmp_path, capsys):
    from phi3v_tune.cli import main as cli
    from phi3v_tune.config import TrainConfig

    with pytest.raises(ValueError, match="frames per video must be >= 1, got 0"):
        frame_indices(20, 0)
    with pytest.raises(ValueError, match="--video-frames must be >= 1, got -2"):
        TrainConfig(video_frames=-2).validate()
    (tmp_path / "d.jsonl").write_text("{}\n")
    for argv in (
        ["validate", str(tmp_path / "d.jsonl"), "--video-frames", "0"],
        ["convert", "ucf101", str(tmp_path), str(tmp_path / "out"), "--video-frames", "-1"],
        ["eval", "--model", "m", "--data", "d", "--metric", "anls", "--video-frames", "0"],
    ):
        with pytest.raises(SystemExit) as stop:
            cli(argv)
        assert stop.value.code == 2
        assert "must be >= 1, got" in capsys.readouterr().err


def test_sampling_holds_only_the_sampled_frames(tmp_path):
    """A long clip is not held in memory as RGB images: 240 frames of 640x480 would be 221 MB; 8 are 7 MB."""
    make_video(tmp_path / "long.avi", 240, size=(640, 480))
    probe = (
        "import sys\n"
        "from phi3v_tune.data.video import sample_frames\n"
        "def peak():\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) // 1024\n"
        "import av, numpy, PIL.Image\n"
        "before = peak()\n"
        "frames = sample_frames(sys.argv[1], 8)\n"
        "print(peak() - before, len(frames))\n"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "long.avi")], capture_output=True, text=True)
    grown_mib, count = (int(x) for x in out.stdout.split())
    assert count == 8 and grown_mib < 80, out.stdout + out.stderr


def test_a_relative_video_name_with_a_colon_is_a_file_not_a_protocol(tmp_path, monkeypatch):
    make_video(tmp_path / "take:2.avi", 16)
    monkeypatch.chdir(tmp_path)
    assert count_frames("take:2.avi") == 16
    assert [round(float(np.asarray(f).mean()) / 12) for f in sample_frames("take:2.avi", 4)] == [0, 4, 8, 12]


def test_ucf101_videos_sharing_a_name_keep_their_own_frames_and_upper_case_suffixes_count(tmp_path):
    root = tmp_path / "src"
    make_video(root / "train" / "Archery" / "v_1.AVI", 8, size=(48, 32))
    make_video(root / "train" / "Archery" / "v_1.mp4", 8, size=(64, 48))
    make_video(root / "train" / "Archery" / "v_2.avi", 8, size=(32, 16))
    convert_ucf101(root, tmp_path / "out")
    lines = [json.loads(x) for x in (tmp_path / "out" / "ucf101_train.jsonl").read_text().splitlines()]
    images = [line["conversations"][0]["images"] for line in lines]
    assert [paths[0] for paths in images] == [
        "train/Archery/v_1.AVI.0.jpg",
        "train/Archery/v_1.mp4.0.jpg",
        "train/Archery/v_2.0.jpg",  # a unique stem keeps the recipe's name
    ]
    sizes = [Image.open(tmp_path / "out" / "images" / paths[0]).size for paths in images]
    assert sizes == [(48, 32), (64, 48), (32, 16)]
