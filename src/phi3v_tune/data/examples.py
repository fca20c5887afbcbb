"""One record -> model inputs and labels: the single place where prompts, image numbering and labels are built.

Single-turn records reproduce the original recipe exactly: user content `<|image_1|><|image_2|>...\\n{user}`
(unless the text already holds the tags), the chat template with the generation prompt, then the answer
`{assistant}<|end|>\\n<|endoftext|>` tokenized without `<s>`; prompt tokens are -100, answer tokens are learned.

Multi-turn records are ONE conversation (images numbered 1..n across it) in which every answer with its `<|end|>\\n`
is learned, the last one also with `<|endoftext|>`. The text is tokenized in pieces that end at special tokens, which
gives the same ids as tokenizing the whole conversation with the published processor. The layout
`multi_turn="recipe"` builds the original recipe's layout instead: every turn its own prompt (its own `<s>`, images
numbered from 1 again), each followed by its answer and `<|endoftext|>`, all concatenated into one sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..model.loss import IGNORE_INDEX
from ..processing.geometry import IMAGE_TAG, image_tag
from ..processing.image import header_size
from ..processing.processor import Phi3VProcessor
from .layout import DEFAULT_LAYOUT, SampleLayout
from .schema import ImageRef, Record, Turn
from .sources import PathResolver, parse_conversation
from .video import load_video_frames

END = "<|end|>"
EOS = "<|endoftext|>"


class SampleRefused(ValueError):
    """A sample that cannot be trained on as it is (reason in the message); never dropped silently."""

    def __init__(self, record_id: str, reason: str, message: str):
        self.record_id = record_id
        self.reason = reason
        super().__init__(message)


@dataclass
class Piece:
    text: str
    learned: bool


def turn_images(turn: Turn, video_frames: int) -> list[ImageRef]:
    """A turn's images; a video turn contributes its `video_frames` sampled frames after them."""
    if turn.video is not None:
        return [*turn.images, *load_video_frames(turn.video, video_frames)]
    return list(turn.images)


def user_content(turn: Turn, first_number: int, count: int, source: str) -> str:
    """The turn's user text with its images' tags: the recipe's `<|image_1|>...<|image_n|>` + "\\n" + text (with no
    image that is "\\n" + text, as the recipe's jsonl reader builds it, or the bare text for a `bare_text` turn, as its
    NLVR2 script asks the_cauldron's later questions), unless the text already places the tags."""
    wanted = list(range(first_number, first_number + count))
    present = [int(k) for k in IMAGE_TAG.findall(turn.user)]
    if present:
        if sorted(present) != wanted:
            raise ValueError(
                f"{source}: the text holds tags {', '.join(image_tag(k) for k in present)} but this turn's images "
                f"are {', '.join(image_tag(k) for k in wanted) or 'none'} (numbered across the conversation)"
            )
        return turn.user
    if not wanted and turn.bare_text:
        return turn.user
    return "".join(image_tag(k) for k in wanted) + "\n" + turn.user


def conversation_pieces(record: Record, processor: Phi3VProcessor, counts: list[int], with_answers: bool = True):
    """The conversation as (text, learned) pieces; `counts[t]` is the number of images of turn t."""
    pieces: list[Piece] = []
    number = 1
    last = len(record.turns) - 1
    for t, (turn, n) in enumerate(zip(record.turns, counts)):
        content = user_content(turn, number, n, f"{record.origin or record.id} conversations[{t}].user")
        number += n
        prompt = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        pieces.append(Piece(prompt, False))
        if not with_answers and t == last:
            break
        pieces.append(Piece(turn.assistant + END + "\n" + (EOS if t == last else ""), True))
    return pieces


def build_example(
    record: Record | dict,
    processor: Phi3VProcessor,
    layout: SampleLayout = DEFAULT_LAYOUT,
    *,
    image_dir: str | Path | None = None,
    load_pixels: bool = True,
    for_generation: bool = False,
) -> dict[str, Any]:
    """`input_ids`, `labels`, `attention_mask`, `pixel_values`, `image_sizes` (+ `id`, `truncated`) of one record.

    `record` is a `Record` or one object of the conversations jsonl (image paths relative to `image_dir`).
    `layout.max_length` truncates only text after the last image; a sample whose images alone exceed it, or that
    keeps no answer token, raises `SampleRefused`. `layout.multi_turn`: "conversation" or "recipe" (see the module
    docstring; training layouts only, generation prompts are always one conversation). `layout.video_frames`: frames
    sampled from each video. `load_pixels=False` reads image headers only (lengths for planning).
    `for_generation=True` leaves the last answer out and ends with the generation prompt (evaluation).
    """
    max_length = layout.max_length
    if isinstance(record, dict):
        base = Path(image_dir) if image_dir is not None else Path.cwd()
        parsed, problems = parse_conversation(record, "record", PathResolver([base, base / "images"]))
        if parsed is None:
            raise ValueError("; ".join(str(p) for p in problems))
        record = parsed
    where = record.origin or f"id={record.id}"
    images_per_turn = [turn_images(turn, layout.video_frames) for turn in record.turns]
    flat = [img for imgs in images_per_turn for img in imgs]
    ip = processor.image_processor

    pixel_values = image_sizes = None
    if load_pixels and flat:
        loaded = [ip.load_image(img, source=f"{where} id={record.id} image {i + 1}") for i, img in enumerate(flat)]
        out = ip(loaded)
        pixel_values, image_sizes, tokens = out["pixel_values"], out["image_sizes"], out["num_img_tokens"]
    else:
        tokens = []
        for img in flat:
            tokens.append(ip.num_tokens_for_size(*header_size(img, ip.apply_exif_orientation)))
    counts = {k + 1: n for k, n in enumerate(tokens)}

    ids: list[int] = []
    labels: list[int] = []
    if layout.multi_turn == "recipe" and not for_generation:
        ids, labels, order = recipe_turns(record, processor, [len(x) for x in images_per_turn], tokens, where)
        return _finish(record, ids, labels, order, flat, pixel_values, image_sizes, max_length, for_generation)
    pieces = conversation_pieces(record, processor, [len(x) for x in images_per_turn], with_answers=True)
    if for_generation:
        pieces = pieces[:-1]
    for i, piece in enumerate(pieces):
        if piece.learned:
            piece_ids = processor.tokenizer(piece.text, add_special_tokens=False)["input_ids"]
        else:
            piece_ids = processor.prompt_ids(piece.text, counts, source=where, leading_bos=(i == 0), check_tags=False)
        ids.extend(piece_ids)
        labels.extend(piece_ids if piece.learned else [IGNORE_INDEX] * len(piece_ids))
    order = [k - 1 for k in appearance_order(ids)]
    return _finish(record, ids, labels, order, flat, pixel_values, image_sizes, max_length, for_generation)


def recipe_turns(
    record: Record, processor: Phi3VProcessor, per_turn: list[int], tokens: list[int], where: str
) -> tuple[list[int], list[int], list[int]]:
    """The recipe's multi-turn layout: (ids, labels, image order). Every turn is its own prompt (leading `<s>`, images
    numbered from 1, so ids -1, -2, ... recur per turn) followed by `{answer}<|end|>\\n<|endoftext|>`. The image order
    is each turn's order of appearance, turn after turn (indices into the record's flat image list)."""
    ids: list[int] = []
    labels: list[int] = []
    order: list[int] = []
    first = 0
    for t, (turn, n) in enumerate(zip(record.turns, per_turn)):
        content = user_content(turn, 1, n, f"{record.origin or record.id} conversations[{t}].user")
        prompt = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        turn_counts = {k + 1: tokens[first + k] for k in range(n)}
        prompt_ids = processor.prompt_ids(prompt, turn_counts, source=where, leading_bos=True, check_tags=False)
        answer_ids = processor.tokenizer(turn.assistant + END + "\n" + EOS, add_special_tokens=False)["input_ids"]
        order.extend(first + k - 1 for k in appearance_order(prompt_ids))
        ids.extend(prompt_ids + answer_ids)
        labels.extend([IGNORE_INDEX] * len(prompt_ids) + answer_ids)
        first += n
    return ids, labels, order


def _finish(
    record: Record,
    ids: list[int],
    labels: list[int],
    order: list[int],
    flat: list[ImageRef],
    pixel_values: torch.Tensor | None,
    image_sizes: torch.Tensor | None,
    max_length: int | None,
    for_generation: bool,
) -> dict[str, Any]:
    """Truncation (text after the last image only), refusals, tensors; images stored in `order` (appearance)."""
    where = record.origin or f"id={record.id}"
    truncated = False
    if max_length is not None and len(ids) > max_length:
        image_end = max((i + 1 for i, x in enumerate(ids) if x < 0), default=0)
        if image_end > max_length:
            raise SampleRefused(
                record.id,
                "images_exceed_max_length",
                f"{where} id={record.id}: its images alone need {image_end} tokens > max_length={max_length} "
                "(lower num_crops or raise max_length)",
            )
        ids, labels = ids[:max_length], labels[:max_length]
        truncated = True
        if not for_generation and all(x == IGNORE_INDEX for x in labels):
            raise SampleRefused(
                record.id,
                "no_answer_after_truncation",
                f"{where} id={record.id}: no answer token is left after truncating to max_length={max_length}",
            )
    example = {
        "id": record.id,
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.ones(len(ids), dtype=torch.long),
        "truncated": truncated,
        "num_images": len(flat),
    }
    if pixel_values is not None:
        # the model fills image positions in order of appearance: a text that places <|image_2|> before <|image_1|>
        # needs image 2's pixels first (as the processor stores them)
        if order != list(range(len(order))):  # (no copy of the pixels in the usual case: tags in 1..n order)
            index = torch.tensor(order, dtype=torch.long)
            pixel_values, image_sizes = pixel_values[index], image_sizes[index]
        example["pixel_values"] = pixel_values
        example["image_sizes"] = image_sizes
    return example


def appearance_order(ids: list[int]) -> list[int]:
    """Image numbers in the order their placeholder blocks (ids -k) first appear."""
    seen: dict[int, None] = {}
    for x in ids:
        if x < 0:
            seen.setdefault(-x)
    return list(seen)
