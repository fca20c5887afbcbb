"""Converters to the conversations jsonl: UCF-101 videos (as the original recipe) and the_cauldron-style tables."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from .schema import DataError, Record
from .sources import read_hf_dataset
from .validate import check_media
from .video import DEFAULT_VIDEO_FRAMES, sample_frames

VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".mov", ".webm")


def _ucf_root(src: Path, tmp: Path) -> Path:
    if src.is_file():
        if not tarfile.is_tarfile(src):
            raise ValueError(f"{src}: expected a folder or a .tar.gz archive")
        with tarfile.open(src) as tar:
            tar.extractall(tmp, filter="data")
        src = tmp
    # the archive may hold one top folder (UCF101_subset/) above the split folders
    children = [p for p in src.iterdir() if p.is_dir()]
    if len(children) == 1 and not any(
        p.suffix.lower() in VIDEO_SUFFIXES
        for p in children[0].rglob("*")
        if p.is_file() and p.parent.parent == children[0]
    ):
        return children[0]
    return src


def _frame_stems(videos: list[Path]) -> dict[Path, str]:
    """The recipe names frames `{video stem}.{k}.jpg`; videos of one class folder that share a stem (`v_1.avi`,
    `v_1.mp4`) keep their suffix in the name (`v_1.avi.{k}.jpg`), so no video's frames overwrite another's."""
    seen: dict[tuple[Path, str], int] = {}
    for v in videos:
        key = (v.parent, v.stem.casefold())
        seen[key] = seen.get(key, 0) + 1
    return {v: v.name if seen[(v.parent, v.stem.casefold())] > 1 else v.stem for v in videos}


RECIPE_SPLITS = ("train", "val", "test")  # the recipe's order: ids count across the splits in this order


def _split_order(names: list[str]) -> list[str]:
    """train, val, test first (the recipe's order), then any other split folder, sorted."""
    return [n for n in RECIPE_SPLITS if n in names] + sorted(n for n in names if n not in RECIPE_SPLITS)


def convert_ucf101(src: str | Path, out: str | Path, video_frames: int = DEFAULT_VIDEO_FRAMES) -> list[Path]:
    """`{split}/{class}/*.avi` -> `images/{split}/{class}/{stem}.{k}.jpg` + `ucf101_{split}.jsonl`, as the recipe.

    The layout is the original recipe's `convert_ucf101.py`, so its data loaders and ours both read the output:
    - frames at `arange(0, total, total/video_frames).astype(int)` (total counted by decoding), each frame once (a
      video shorter than `video_frames` gives fewer), RGB, not resized;
    - one class list for every split: the sorted names of the class folders that hold videos, in any split;
    - ids `{split}-{i:010d}` with one counter over all videos, split after split (train, val, test, then others),
      class after class, file names sorted;
    - image paths in the jsonl relative to `images/` (`train/Archery/v_x.0.jpg`), files `ucf101_{split}.jsonl`.
    """
    src, out = Path(src), Path(out)
    if not src.exists():
        raise FileNotFoundError(f"{src}: not found")
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = _ucf_root(src, Path(tmp))
        split_names = _split_order([p.name for p in root.iterdir() if p.is_dir()])
        if not split_names:
            raise ValueError(f"{root}: expected split folders ({{split}}/{{class}}/*.avi)")
        videos_of: dict[str, list[tuple[str, Path]]] = {}
        for split in split_names:
            classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
            videos_of[split] = [
                (c, v)
                for c in classes
                for v in sorted((root / split / c).iterdir())
                if v.is_file() and v.suffix.lower() in VIDEO_SUFFIXES
            ]
        labels = sorted({label for videos in videos_of.values() for label, _ in videos})
        if not labels:
            raise ValueError(f"{root}: no videos ({', '.join(VIDEO_SUFFIXES)}) in {{split}}/{{class}}/ folders")
        question = "Classify the video into one of the following classes: " + ", ".join(labels) + "."
        i = 0
        for split in split_names:
            lines = []
            stems = _frame_stems([video for _, video in videos_of[split]])
            for label, video in tqdm(videos_of[split], desc=f"ucf101 {split}", leave=False):
                paths = []
                for k, frame in enumerate(sample_frames(video, video_frames, distinct=True)):  # counted by decoding
                    rel = f"{split}/{label}/{stems[video]}.{k}.jpg"
                    (out / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
                    frame.save(out / "images" / rel)
                    paths.append(rel)
                lines.append(
                    {
                        "id": f"{split}-{i:010d}",
                        "source": "ucf101",
                        "conversations": [{"images": paths, "user": question, "assistant": label}],
                    }
                )
                i += 1
            if not lines:
                continue
            target = out / f"ucf101_{split}.jsonl"
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "w", encoding="utf-8") as f:
                for line in lines:
                    f.write(json.dumps(line) + "\n")
            written.append(target)
    return written


def _image_bytes(ref) -> tuple[bytes, str]:
    if isinstance(ref, (bytes, bytearray)):
        data = bytes(ref)
        fmt = (Image.open(io.BytesIO(data)).format or "PNG").lower()
        return data, {"jpeg": "jpg"}.get(fmt, fmt)
    if isinstance(ref, Image.Image):
        buf = io.BytesIO()
        ref.convert("RGB").save(buf, "PNG")
        return buf.getvalue(), "png"
    path = Path(ref)
    return path.read_bytes(), path.suffix.lstrip(".") or "png"


#: Longest id kept in an image file name (the rest of a longer id is dropped; the name stays unique).
MAX_NAME_ID = 80


def _file_stem(record_id: str, k: int, taken: set[str]) -> str:
    """`{id}_{k}` with the id made safe for file names, unique among `taken` (compared case-blind, for
    case-insensitive disks): ids that differ only in characters a file name cannot hold get `-2`, `-3`, ..."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in record_id)[:MAX_NAME_ID].lstrip(".") or "_"
    stem, n = f"{safe}_{k}", 1
    while stem.casefold() in taken:
        n += 1
        stem = f"{safe}_{k}-{n}"
    taken.add(stem.casefold())
    return stem


def write_records(records: Sequence[Record], out: str | Path, name: str) -> Path:
    """Records (images in memory or on disk) -> `{name}.jsonl` + `images/{name}/{id}_{k}.{ext}`, one file per image
    (never two images on one name). The jsonl appears only once complete."""
    out = Path(out)
    target = out / f"{name}.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    taken: set[str] = set()
    with open(partial, "w", encoding="utf-8") as f:
        for rec in tqdm(records, desc=f"writing {name}", leave=False):
            k = 0
            turns = []
            for t, turn in enumerate(rec.turns):
                paths = []
                for j, image in enumerate(turn.images):
                    try:
                        data, ext = _image_bytes(image)
                    except Exception as err:  # PIL raises many kinds; checked up front, so rare here
                        field = f"conversations[{t}].{turn.image_field(j)}"
                        raise ValueError(f"{rec.origin} id={rec.id} {field}: cannot read the image ({err})") from err
                    rel = Path("images") / name / f"{_file_stem(rec.id, k, taken)}.{ext}"
                    (out / rel).parent.mkdir(parents=True, exist_ok=True)
                    (out / rel).write_bytes(data)
                    paths.append(rel.as_posix())
                    k += 1
                entry = {"user": turn.user, "assistant": turn.assistant}
                if paths:
                    entry["images"] = paths
                turns.append(entry)
            line = {"id": rec.id, "source": rec.source, "conversations": turns}
            if rec.answers:
                line["answers"] = rec.answers
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    partial.replace(target)
    return target


def convert_cauldron(src: str | Path, out: str | Path, split: str = "train") -> list[Path]:
    """Any the_cauldron / DocVQA-style table -> `{split}.jsonl` + image files, to inspect and edit as text.

    Every image is read first: an unreadable one stops the conversion with its row, id and field, before anything
    is written."""
    records, problems = read_hf_dataset(src, split=split)
    problems = problems or check_media(records)
    if problems:
        raise DataError(problems, header=f"{len(problems)} problem(s) in {src} (nothing was written):")
    return [write_records(records, out, split)]
