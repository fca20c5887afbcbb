"""Content checks on ``Record``s: empty answers, duplicate ids, missing or unreadable images, image tag mismatches,
and for preference pairs (DPO) both answers present, non-empty and different.

``validate_records`` adds these problems to those found while reading; ``validate_path`` reads and checks a whole
source and returns a ``ValidationReport`` that prints as a summary followed by every problem.
"""

from __future__ import annotations

import io
import os
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ..processing.geometry import IMAGE_TAG, image_tag
from ..processing.image import allow_pixels
from .layout import DEFAULT_LAYOUT, SampleLayout
from .schema import (
    ORIGIN_POSITION,
    DataError,
    ImageRef,
    Problem,
    Record,
    count,
    file_order,
    format_problems,
    origin_position,
    sort_problems,
)
from .sources import PathLike, load_records
from .video import DEFAULT_VIDEO_FRAMES, count_frames

#: Show a progress bar when more images than this are checked.
PROGRESS_MIN_IMAGES = 200
#: What the samples train: supervised answers, or preference pairs (the last turn's chosen and rejected answers).
OBJECTIVES = ("sft", "dpo")


def objective_of(records: Sequence[Record]) -> str:
    """The objective a data set is for: "dpo" when it holds preference pairs, else "sft"."""
    return "dpo" if any(r.is_pair for r in records) else "sft"


def source_of(origin: str) -> str:
    """The file or table of a sample's origin (``file.jsonl:LINE`` -> ``file.jsonl``)."""
    return origin_position(origin)[0]


def objective_problems(records: Sequence[Record], objective: str) -> list[Problem]:
    """One problem per source whose samples are all of the other kind (preference pairs in an SFT run, conversations
    with answers in a DPO run), saying what to pass; sources that mix both are left to `validate_records`, which
    names each sample."""
    kinds: dict[str, set[bool]] = {}
    for record in records:
        kinds.setdefault(source_of(record.origin), set()).add(record.is_pair)
    problems = []
    for source, seen in kinds.items():
        if objective == "sft" and seen == {True}:
            problems.append(Problem(source, None, "", PAIRS_IN_SFT))
        elif objective == "dpo" and seen == {False}:
            problems.append(Problem(source, None, "", ANSWERS_IN_DPO))
    return problems


PAIRS_IN_SFT = (
    "preference pairs (the last turn has 'chosen' and 'rejected'), but this is supervised training: train on them "
    "with --objective dpo (validate: --for dpo)"
)
ANSWERS_IN_DPO = (
    "conversations with 'assistant' answers, but --objective dpo trains on preference pairs: give the last turn "
    "'chosen' and 'rejected' answers instead of 'assistant', or train with --objective sft"
)


def duplicate_id(first: str) -> str:
    return f"duplicate id (first used at {first}; expected unique ids)"


def unparsed_samples(records: Sequence[Record], problems: Sequence[Problem]) -> list[tuple[str, str]]:
    """(origin, id) of the samples that failed to parse (their problems name an id, but no record came of them)."""
    parsed = {record.origin for record in records}
    seen: dict[str, str] = {}
    for problem in problems:
        if problem.id is not None and problem.origin not in parsed:
            seen.setdefault(problem.origin, problem.id)
    return list(seen.items())


def repeated_ids(
    records: Sequence[Record], unparsed: list[tuple[str, str]]
) -> tuple[list[str | None], list[str | None]]:
    """Per record and per unparsed sample: the origin of its id's first use when it is a later use, else None; in
    file order over parsed and unparsed samples alike (records of the same origin in their given order)."""
    uses = [(r.origin, r.id) for r in records] + unparsed
    first: dict[str, str] = {}
    earlier: list[str | None] = [None] * len(uses)
    for i in file_order([origin for origin, _ in uses]):
        origin, sample_id = uses[i]
        if sample_id in first:
            earlier[i] = first[sample_id]
        else:
            first[sample_id] = origin
    return earlier[: len(records)], earlier[len(records) :]


def validate_records(
    records: Sequence[Record],
    problems: Iterable[Problem] = (),
    check_images: bool = True,
    max_image_pixels: int | None = None,
    num_workers: int | None = None,
    layout: SampleLayout = DEFAULT_LAYOUT,
    answers_required: bool = True,
    decode_videos: bool = False,
    objective: str = "sft",
) -> list[Problem]:
    """Return ``problems`` plus the content problems of ``records``, in file / row order.

    Checks: empty answers; empty user text without images or video; duplicate ids (second and later uses);
    ``<|image_k|>`` tags (see ``check_image_tags``); and with ``check_images``: image files that are missing or are
    not files, images PIL cannot fully decode, images over ``max_image_pixels``, and missing video files (videos are
    not decoded here). Images are decoded on ``num_workers`` threads (default: up to 8). ``layout``: with
    ``multi_turn="recipe"`` tags are numbered per turn (the recipe's layout), not across the conversation;
    ``video_frames`` frames are sampled from each video (they count as its turn's images, after the turn's own).
    ``answers_required=False`` (questions to predict answers for) lets answers be empty. ``decode_videos`` also
    decodes every video (what `phi3v-tune validate` does; training leaves it to planning, which decodes each video
    once anyway). ``objective="dpo"``: every sample must be a preference pair whose chosen and rejected answers are
    non-empty and differ (earlier turns' answers are checked as for SFT); with "sft" a pair is a problem.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    found: list[Problem] = list(problems)
    unparsed = unparsed_samples(records, found)  # a sample that did not parse can still repeat an id
    repeats, unparsed_repeats = repeated_ids(records, unparsed)
    for (origin, sample_id), first in zip(unparsed, unparsed_repeats):
        if first is not None:
            found.append(Problem(origin, sample_id, "id", duplicate_id(first)))
    for record, first in zip(records, repeats):
        if first is not None:
            found.append(Problem(record.origin, record.id, "id", duplicate_id(first)))
        found.extend(_pair_problems(record, objective))
        for i, turn in enumerate(record.turns):
            # (a preference turn's answers are chosen and rejected, checked above)
            if answers_required and turn.chosen is None and not turn.assistant.strip():
                found.append(
                    Problem(
                        record.origin,
                        record.id,
                        f"conversations[{i}].assistant",
                        "empty answer (expected non-empty text)",
                    )
                )
            if not turn.user.strip() and not turn.images and not turn.video:
                found.append(
                    Problem(
                        record.origin,
                        record.id,
                        f"conversations[{i}].user",
                        "empty question with no image or video (expected text, images or both)",
                    )
                )
        found.extend(check_image_tags(record, per_turn=layout.per_turn_tags, video_frames=layout.video_frames))
    if check_images:
        found.extend(check_media(records, max_image_pixels, num_workers, decode_videos))
    return sort_problems(found)


def _pair_problems(record: Record, objective: str) -> list[Problem]:
    """A preference pair in an SFT run, a sample without one in a DPO run, or a pair whose answers are empty or the
    same."""
    last = f"conversations[{len(record.turns) - 1}]"
    match = ORIGIN_POSITION.match(record.origin)
    # a table row (RLAIF-V, TRL) holds the answers in its own `chosen` and `rejected` columns
    answer = (lambda name: name) if match and match["row"] is not None else (lambda name: f"{last}.{name}")
    if not record.is_pair:
        if objective == "dpo":
            return [
                Problem(
                    record.origin,
                    record.id,
                    f"{last}.assistant",
                    "not a preference pair (expected 'chosen' and 'rejected' answers in the last turn instead of "
                    "'assistant')",
                )
            ]
        return []
    if objective == "sft":
        return [Problem(record.origin, record.id, answer("chosen"), PAIRS_IN_SFT)]
    turn = record.turns[-1]
    found = [
        Problem(record.origin, record.id, answer(name), "empty answer (expected non-empty text)")
        for name, text in (("chosen", turn.chosen), ("rejected", turn.rejected))
        if not (text or "").strip()
    ]
    if not found and turn.chosen.strip() == turn.rejected.strip():
        found.append(
            Problem(
                record.origin,
                record.id,
                answer("rejected"),
                "the same text as 'chosen' (expected two different answers: there is nothing to prefer)",
            )
        )
    return found


def check_image_tags(record: Record, per_turn: bool = False, video_frames: int = DEFAULT_VIDEO_FRAMES) -> list[Problem]:
    """Check ``<|image_k|>`` tags in the user texts of a record.

    Images are numbered 1..n across the whole conversation in order (a first turn with 2 images owns 1 and 2, a
    second turn with 1 image owns 3). When no turn has tags, that is fine: the prompt builder adds them. When any
    turn has tags, each turn's tags must be exactly the numbers of its own images, each at most once. A video turn
    owns its images and then ``video_frames`` frames (sampling always gives that many, repeating frames of a
    shorter clip). ``per_turn`` (`--multi-turn recipe`): every turn numbers its own images from 1.
    """
    if not any(IMAGE_TAG.search(turn.user) for turn in record.turns):
        return []
    problems: list[Problem] = []
    next_number = 1
    for i, turn in enumerate(record.turns):
        if per_turn:
            next_number = 1
        count = len(turn.images) + (video_frames if turn.video else 0)
        owned = list(range(next_number, next_number + count))
        next_number += count
        tags = [int(k) for k in IMAGE_TAG.findall(turn.user)]
        where = f"conversations[{i}].user"
        repeated = sorted(k for k, n in Counter(tags).items() if n > 1)
        if repeated:
            problems.append(
                Problem(
                    record.origin,
                    record.id,
                    where,
                    f"image tag{'s' if len(repeated) > 1 else ''} {_tags(repeated)} used more than once (expected each tag at most once)",
                )
            )
        if set(tags) != set(owned):
            if owned:
                expected = (
                    f"exactly {_tags(owned)} for this turn's {len(owned)} image{'s' if len(owned) > 1 else ''}, "
                    + ("numbered from 1 in every turn (--multi-turn recipe)" if per_turn else
                       "numbered across the whole conversation")
                )  # fmt: skip
            else:
                expected = "no tags, this turn has no images"
            got = _tags(sorted(set(tags))) if tags else "no tags"
            problems.append(
                Problem(
                    record.origin,
                    record.id,
                    where,
                    f"image tags do not match the images: found {got} (expected {expected}; "
                    "or leave out the tags in every turn and they are added automatically)",
                )
            )
    return problems


def _tags(numbers: Iterable[int]) -> str:
    return ", ".join(image_tag(k) for k in numbers)


def check_image(ref: ImageRef, max_image_pixels: int | None = None) -> str | None:
    """Why an image is unusable (``"not found: /abs/path"``, PIL's reason, too many pixels), or None if fine."""
    what = "in-memory image"
    allow_pixels(max_image_pixels)
    try:
        if isinstance(ref, Image.Image):
            _check_pixels(ref.size, max_image_pixels)
            ref.load()
            return None
        if isinstance(ref, bytes):
            source: io.BytesIO | Path = io.BytesIO(ref)
        else:
            source = Path(ref)
            what = str(source)
            if not os.path.exists(source):
                return f"not found: {source}"
            if not os.path.isfile(source):
                return f"not a file: {source}"
        with Image.open(source) as image:
            _check_pixels(image.size, max_image_pixels)
            image.load()
        return None
    except _TooLarge as e:
        return f"{what}: {e}"
    except UnidentifiedImageError:
        return f"cannot read {what}: not an image, or a format PIL does not know (expected PNG, JPEG, ...)"
    except Exception as e:  # PIL raises many kinds: UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        reason = str(e) or type(e).__name__
        return f"cannot read {what}: {reason} (expected a readable image file: PNG, JPEG, ...)"


class _TooLarge(Exception):
    pass


def _check_pixels(size: tuple[int, int], max_image_pixels: int | None) -> None:
    width, height = size
    if max_image_pixels is not None and width * height > max_image_pixels:
        raise _TooLarge(f"{width}x{height} = {width * height} pixels, more than max_image_pixels={max_image_pixels}")


def check_media(
    records: Sequence[Record],
    max_image_pixels: int | None = None,
    num_workers: int | None = None,
    decode_videos: bool = False,
) -> list[Problem]:
    """Problems of the records' images (missing, unreadable, too large) and videos (missing; undecodable with
    ``decode_videos``). Each distinct file is decoded once, however many samples share it."""
    jobs: dict[object, ImageRef] = {}
    uses: list[tuple[Record, str, object]] = []
    videos: list[tuple[Record, str, str]] = []
    for record in records:
        for i, turn in enumerate(record.turns):
            for j, image in enumerate(turn.images):
                key: object = ("path", str(image)) if isinstance(image, (str, Path)) else ("obj", id(image))
                jobs.setdefault(key, image)
                uses.append((record, f"conversations[{i}].{turn.image_field(j)}", key))
            if turn.video:
                videos.append((record, f"conversations[{i}].video", turn.video))

    keys = list(jobs)
    workers = num_workers or min(8, os.cpu_count() or 1)
    bar = None
    if len(keys) > PROGRESS_MIN_IMAGES:
        bar = tqdm(total=len(keys), desc="checking images", unit="img", disable=not sys.stderr.isatty())
    readable = sorted({video for _, _, video in videos if os.path.isfile(video)}) if decode_videos else []
    results: dict[object, str | None] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoding = pool.map(_check_video, readable)  # submitted now: videos decode alongside the images
        for key, result in zip(keys, pool.map(lambda k: check_image(jobs[k], max_image_pixels), keys)):
            results[key] = result
            if bar is not None:
                bar.update(1)
        decoded = dict(zip(readable, decoding))
    if bar is not None:
        bar.close()

    problems = [Problem(record.origin, record.id, where, results[key]) for record, where, key in uses if results[key]]
    for record, where, video in videos:
        if not os.path.isfile(video):
            problems.append(
                Problem(
                    record.origin,
                    record.id,
                    where,
                    f"{'not a file' if os.path.exists(video) else 'not found'}: {video}",
                )
            )
        elif decoded.get(video):
            problems.append(Problem(record.origin, record.id, where, decoded[video]))
    return problems


def _check_video(path: str) -> str | None:
    """None if PyAV decodes frames from it, else why not."""
    try:
        count_frames(path)
    except ValueError as err:
        return str(err)
    return None


@dataclass
class ValidationReport:
    """What ``validate_path`` found: counts and every problem (``records`` holds the readable samples)."""

    data: str
    num_records: int
    num_turns: int
    num_images: int
    problems: list[Problem]
    num_videos: int = 0
    records: list[Record] = field(default_factory=list, repr=False)
    num_pairs: int = 0  # preference pairs among the records

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self, max_problems: int | None = None) -> str:
        """A human-readable summary: the counts, then every problem (or the first ``max_problems``)."""
        counts = (
            f"{count(self.num_records, 'record')}, {count(self.num_turns, 'turn')}, {count(self.num_images, 'image')}"
        )
        if self.num_pairs:
            counts = f"{count(self.num_pairs, 'preference pair')}, " + counts
        if self.num_videos:
            counts += f", {count(self.num_videos, 'video')}"
        # samples whose problems kept them from being read are not among the counts: say how many there are
        unread = {p.origin for p in self.problems if ORIGIN_POSITION.match(p.origin)} - {r.origin for r in self.records}
        if unread and len(self.records) == self.num_records:  # (a report made without its records cannot tell)
            counts += f" (and {count(len(unread), 'sample')} that could not be read: see below)"
        lines = [f"{self.data}: {counts}"]
        if not self.problems:
            lines.append("no problems found")
        else:
            n = len(self.problems)
            lines.append(f"{count(n, 'problem')}:")
            lines.append(format_problems(self.problems, limit=max_problems))
        return "\n".join(lines)

    def raise_if_problems(self) -> None:
        if self.problems:
            raise DataError(self.problems)


def validate_path(
    data: PathLike | Sequence[PathLike],
    image_dir: PathLike | None = None,
    split: str = "train",
    check_images: bool = True,
    max_image_pixels: int | None = None,
    layout: SampleLayout = DEFAULT_LAYOUT,
    answers_required: bool = True,
    objective: str | None = "sft",
    **load_kwargs,
) -> ValidationReport:
    """Read ``data`` with ``load_records`` and check everything; a source that cannot be read at all is reported
    as a problem of the report rather than raised. ``answers_required=False``: data for prediction, where the last
    turn of a sample may leave its answer out (what ``predict --data`` accepts). ``objective``: "sft", "dpo"
    (preference pairs), or None to check the data as what it holds (`objective_of`)."""
    label = ", ".join(str(d) for d in data) if isinstance(data, (list, tuple)) else str(data)
    try:
        records, problems = load_records(
            data, image_dir=image_dir, split=split, answers_required=answers_required, **load_kwargs
        )
    except DataError as e:
        return ValidationReport(label, 0, 0, 0, list(e.problems))
    objective = objective or objective_of(records)
    problems = validate_records(
        records,
        problems,
        check_images=check_images,
        max_image_pixels=max_image_pixels,
        layout=layout,
        answers_required=answers_required,
        decode_videos=check_images,
        objective=objective,
    )
    if not records and not problems:  # training would stop on it: say so here too
        problems = [Problem(label, None, "", "no samples found (expected at least one conversation)")]
    return ValidationReport(
        data=label,
        num_records=len(records),
        num_turns=sum(len(r.turns) for r in records),
        num_images=sum(len(t.images) for r in records for t in r.turns),
        problems=problems,
        num_videos=sum(1 for r in records for t in r.turns if t.video),
        records=records,
        num_pairs=sum(1 for r in records if r.is_pair),
    )
