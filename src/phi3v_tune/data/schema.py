"""The internal training sample (``Record`` of ``Turn``s) and the way data problems are reported.

A preference pair (DPO) is a ``Record`` whose last turn carries two answers, ``chosen`` and ``rejected``, instead of
``assistant``; its earlier turns are ordinary context (``Record.is_pair``).

Every source (a conversations jsonl, a ``.json`` list, a local or Hub ``datasets`` table) is mapped to ``Record``s.
Whatever is wrong with the data becomes a ``Problem`` that names the file and line (or dataset row), the sample id,
the field and what was expected; ``DataError`` carries a list of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

from PIL import Image

#: An image of a turn: an absolute file path (from a jsonl), or an in-memory image (from a ``datasets`` table):
#: a decoded PIL image or the encoded file bytes (PNG, JPEG, ...).
ImageRef: TypeAlias = str | Path | Image.Image | bytes

#: At most this many problems are spelled out in a ``DataError`` message.
MAX_PRINTED_PROBLEMS = 50


@dataclass
class Turn:
    """One user message (text plus its images, or a video) and the assistant's answer to it."""

    user: str
    assistant: str
    images: list[ImageRef] = field(default_factory=list)
    #: Absolute path of a video file; its frames are decoded later (they count as the turn's images).
    video: str | None = None
    #: The data wrote a single ``"image"`` (not ``"images"``): problems then name that key.
    single_image_key: bool = False
    #: Without images the text stands alone (the_cauldron's later questions, as the recipe's NLVR2 script asks them),
    #: instead of following a newline (the recipe's jsonl reader: ``"\n" + user``).
    bare_text: bool = False
    #: Preference data: the better and the worse answer to this (last) turn; ``assistant`` is then empty.
    chosen: str | None = None
    rejected: str | None = None

    def image_field(self, j: int) -> str:
        return "image" if self.single_image_key else f"images[{j}]"


@dataclass
class Record:
    """One training / evaluation sample: a conversation of one or more turns."""

    id: str
    source: str | None
    turns: list[Turn]
    #: Where the sample came from, for messages: ``"file.jsonl:LINE"`` or ``"dataset_dir[row N]"``.
    origin: str = ""
    #: Every gold answer (DocVQA-style data), for ANLS / accuracy; ``turns[-1].assistant`` is the first of them.
    answers: list[str] | None = None

    @property
    def images(self) -> list[ImageRef]:
        """All images of the conversation in order (the order of their conversation-wide numbers 1..n)."""
        return [image for turn in self.turns for image in turn.images]

    @property
    def is_pair(self) -> bool:
        """A preference pair: the last turn has ``chosen`` and ``rejected`` answers (training with DPO)."""
        return bool(self.turns) and self.turns[-1].chosen is not None and self.turns[-1].rejected is not None


@dataclass
class Problem:
    """One thing wrong with the data: where, which sample, which field, what is wrong and what was expected."""

    origin: str
    id: str | None
    field: str
    message: str

    def __str__(self) -> str:
        parts = [self.origin]
        if self.id is not None:
            parts.append(f"id={self.id}")
        if self.field:
            parts.append(self.field)
        return " ".join(parts) + ": " + self.message


def format_problems(problems: Iterable[Problem], limit: int | None = MAX_PRINTED_PROBLEMS, indent: str = "  ") -> str:
    """One line per problem, at most ``limit`` of them followed by ``... and N more``."""
    problems = list(problems)
    shown = problems if limit is None else problems[:limit]
    lines = [indent + str(p) for p in shown]
    if len(problems) > len(shown):
        lines.append(f"{indent}... and {len(problems) - len(shown)} more")
    return "\n".join(lines)


class DataError(ValueError):
    """The data cannot be used as it is; ``problems`` lists every reason."""

    def __init__(self, problems: Iterable[Problem] | Problem, header: str | None = None):
        if isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        n = len(self.problems)
        if header is None:
            header = f"{count(n, 'problem')} in the data:"
        super().__init__(header + ("\n" + format_problems(self.problems) if self.problems else ""))


ORIGIN_POSITION = re.compile(r"^(?P<prefix>.*?)(?::(?P<line>\d+)|\[row (?P<row>\d+)\]|\[(?P<index>\d+)\])$")


def count(n: int, noun: str) -> str:
    """'1 record', '2 records'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def origin_position(origin: str) -> tuple[str, int]:
    """(source, line / row number) of a sample's origin; -1 for an origin without a position."""
    match = ORIGIN_POSITION.match(origin)
    if match:
        return match["prefix"], int(match["line"] or match["row"] or match["index"])
    return origin, -1


def file_order(origins: Sequence[str]) -> list[int]:
    """Indices of `origins` in file order: grouped by source in order of first appearance, then by line / row
    number; equal positions keep their given order."""
    source_rank: dict[str, int] = {}
    keys = []
    for i, origin in enumerate(origins):
        source, position = origin_position(origin)
        keys.append((source_rank.setdefault(source, len(source_rank)), position, i))
    return [k[2] for k in sorted(keys)]


def sort_problems(problems: Iterable[Problem]) -> list[Problem]:
    """Problems in file order: grouped by source in order of first appearance, then by line / row number.

    Problems of the same line keep their relative order. Origins without a position stay in front of their source.
    """
    problems = list(problems)
    return [problems[i] for i in file_order([p.origin for p in problems])]
