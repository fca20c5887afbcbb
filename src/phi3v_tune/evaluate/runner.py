"""Generation-based evaluation: sharded across ranks, gathered, scored with the task metric, per-sample rows."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..data.examples import turn_images
from ..data.layout import DEFAULT_LAYOUT, SampleLayout
from ..data.schema import Record
from ..data.video import DEFAULT_VIDEO_FRAMES
from ..processing.geometry import IMAGE_TAG, image_tag
from ..processing.processor import Phi3VProcessor
from .generate import generate_answers
from .metrics import QUESTIONS, score


def split_questions(
    records: Sequence[Record],
    layout: SampleLayout = DEFAULT_LAYOUT,
    questions: str = "all",
) -> list[Record]:
    """One evaluation record per question: a record with k turns becomes k single-turn records with all its images.

    The_cauldron rows (NLVR2, DocVQA) hold several questions about the same images; each one is scored
    (`questions="first"`: only the first, with the record's id, as the recipe's NLVR2 and hateful-memes scripts
    score them). A question whose text places image tags keeps them where they stand, numbered across the record
    (per-turn numbers of the layout `multi_turn="recipe"` are shifted), and the record's other images are tagged in
    front of it, as untagged questions get all of them. A video turn's frames (`layout.video_frames`, decoded here)
    count as its images, after the turn's own. The record's gold `answers` belong to its last question.
    """
    if questions not in QUESTIONS:
        raise ValueError(f"questions must be one of {', '.join(QUESTIONS)}, got {questions!r}")
    out: list[Record] = []
    for rec in records:
        if len(rec.turns) == 1:
            out.append(rec)
            continue
        per_turn = [turn_images(turn, layout.video_frames) for turn in rec.turns]
        images = [image for turn_imgs in per_turn for image in turn_imgs]
        first = 1  # the conversation-wide number of this turn's first image
        last = len(rec.turns) - 1
        for j, turn in enumerate(rec.turns[:1] if questions == "first" else rec.turns):
            user = _tags_across(turn.user, first - 1 if layout.per_turn_tags else 0, len(images))
            one = replace(turn, user=user, images=list(images), video=None)
            qid = rec.id if questions == "first" else f"{rec.id}-q{j}"
            out.append(replace(rec, id=qid, turns=[one], answers=rec.answers if j == last else None))
            first += len(per_turn[j])
    return out


def _tags_across(text: str, shift: int, total: int) -> str:
    """`text` with its image tags shifted by `shift` and tags for the images it does not place put in front."""
    if not IMAGE_TAG.search(text):
        return text
    text = IMAGE_TAG.sub(lambda m: image_tag(int(m[1]) + shift), text)
    placed = {int(k) for k in IMAGE_TAG.findall(text)}
    missing = [k for k in range(1, total + 1) if k not in placed]
    return "".join(image_tag(k) for k in missing) + "\n" + text if missing else text


def golds_of(rec: Record) -> list[str]:
    return list(rec.answers) if rec.answers else [rec.turns[-1].assistant]


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """This rank's record indices, `rank::world`, padded with -1 to the same length on every rank.

    Every rank must run the same number of generation batches: under ZeRO-3 / FSDP each forward pass gathers weight
    shards from all ranks (and `generate` keeps finished ranks stepping with `synced_gpus`), so a rank with one batch
    fewer would leave the others waiting forever. Padding slots answer record 0 again and are dropped.
    """
    if n == 0:
        return []
    per_rank = -(-n // world)
    mine = list(range(rank, n, world))
    return mine + [-1] * (per_rank - len(mine))


def evaluate_records(
    model,
    processor: Phi3VProcessor,
    records: Sequence[Record],
    metric: str,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    video_frames: int = DEFAULT_VIDEO_FRAMES,
    progress: bool = True,
) -> tuple[float, list[dict[str, Any]]]:
    """Mean `metric` over `records` and one row per sample (id, prediction, gold, score), on every rank.

    Under torch.distributed each rank answers records[rank::world]; results are gathered so that every rank returns
    the same rows in the original order (and the same metric as a single process).
    """
    rank, world = _dist()
    shard = shard_indices(len(records), rank, world)
    answers = generate_answers(
        model,
        processor,
        [records[i if i >= 0 else 0] for i in shard],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        video_frames=video_frames,
        progress=progress and rank == 0,
        desc=f"evaluating ({metric})",
    )
    mine = [(i, a) for i, a in zip(shard, answers) if i >= 0]  # drop the padding answers
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, mine)
        mine = [pair for part in gathered for pair in part]
    by_index = dict(mine)
    rows = []
    for i, rec in enumerate(records):
        pred = by_index[i]
        golds = golds_of(rec)
        rows.append(
            {
                "id": rec.id,
                "prediction": pred,
                "gold": golds if len(golds) > 1 else golds[0],
                "score": score(metric, pred, golds),
            }
        )
    mean = sum(r["score"] for r in rows) / len(rows) if rows else 0.0
    return mean, rows


def write_rows(rows: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
