"""Preference pairs -> model inputs: one prompt with its images and two answers (chosen, rejected), built by the SFT
example builder; planning (lengths, refusals), the pair data set, and the padded and packed pair collators (batch
layout: `model.preference`).

A pair example holds the prompt's images once (`pixel_values`, `image_sizes`) and two token sequences, each the
prompt followed by one answer, labelled on that answer only (earlier turns of the conversation are context). Both
sequences are built by `data.examples.build_example` from records that differ only in the last answer, so prompts,
image numbering, answer format and truncation are those of SFT; the prompt is built as generation builds it (one
conversation, images numbered across it).

Pair batch keys (both collators), for `model.preference.preference_step`:
  model inputs   `input_ids`, `labels` and `attention_mask` (padded; omitted without padding when asked) or
                 `position_ids`, `cu_seq_lens_q/_k`, `max_length_q/_k`, `rope_use_long` (packed); `pixel_values`,
                 `image_sizes`, `image_token_count` and `image_index` (with images): every pair's images once, and
                 which of them fills each image block (chosen and rejected of a pair name the same images);
                 packed pairs that share their prompt add the `model.packed_attention.BRANCH_KEYS` tensors
  `sequence_bounds`  [start, end) of each sequence in the flattened rows, in pair order (chosen, rejected, ...); a
                 shared-prompt rejected sequence is its branch (the prompt's last token and the rejected answer)
  `reference_logps`  (2P,) float32 in pair order, when every example carries precomputed reference log-probs
  `ids`          the pair ids;  `num_tokens`  real tokens (throughput)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..model.loss import IGNORE_INDEX
from ..model.packed_attention import branch_attention_inputs
from ..processing.processor import Phi3VProcessor
from .collate import Collator
from .dataset import DataPlan
from .examples import SampleRefused, build_example, turn_images
from .layout import DEFAULT_LAYOUT, SampleLayout
from .packing import plan_rows
from .schema import ImageRef, Record

ANSWERS = ("chosen", "rejected")


@dataclass
class PreferenceRecord:
    """A prompt (a conversation whose last turn's `assistant` text is not used) and two answers to its last turn."""

    prompt: Record
    chosen: str
    rejected: str

    @property
    def id(self) -> str:
        return self.prompt.id

    @classmethod
    def of(cls, record: Record) -> PreferenceRecord:
        """The pair a record of preference data holds (its last turn's `chosen` and `rejected`; `Record.is_pair`)."""
        if not record.is_pair:
            where = f"{record.origin} id={record.id}" if record.origin else f"id={record.id}"
            raise ValueError(f"{where}: not a preference pair (the last turn has no 'chosen' and 'rejected')")
        last = record.turns[-1]
        return cls(with_last_answer(record, ""), last.chosen, last.rejected)

    def answered(self, name: str = "chosen") -> Record:
        """The prompt answered by one of the two answers: an SFT record (e.g. to score greedy answers against the
        chosen one)."""
        return with_last_answer(self.prompt, getattr(self, name))


def image_identity(image: ImageRef) -> str:
    """What identifies an image cheaply: its path, the hash of its encoded bytes, or (decoded, e.g. video frames)
    its size and mode."""
    if isinstance(image, (str, Path)):
        return str(image)
    if isinstance(image, bytes):
        return hashlib.sha1(image).hexdigest()
    return f"{image.mode}{image.size}"


def pair_digest(pair: PreferenceRecord) -> str:
    """A short fingerprint of a pair's content (every turn's text, video and images, both answers): a resumed run
    checks with it that the reference log-probabilities it stored still belong to the same pairs."""
    turns = [[t.user, t.assistant, t.video, [image_identity(i) for i in t.images]] for t in pair.prompt.turns]
    content = json.dumps([turns, pair.chosen, pair.rejected], ensure_ascii=False)
    return hashlib.sha1(content.encode()).hexdigest()[:16]


def with_last_answer(record: Record, answer: str) -> Record:
    """The record with its last turn answered by `answer` (a plain answer: no chosen / rejected left on it)."""
    last = replace(record.turns[-1], assistant=answer, chosen=None, rejected=None)
    return replace(record, turns=[*record.turns[:-1], last])


def frames_as_images(record: Record, video_frames: int) -> Record:
    """Video turns with their frames decoded once, as images (the builder would decode them per sequence)."""
    if all(turn.video is None for turn in record.turns):
        return record
    turns = [replace(t, images=turn_images(t, video_frames), video=None) if t.video else t for t in record.turns]
    return replace(record, turns=turns)


def build_pair_example(
    pair: PreferenceRecord,
    processor: Phi3VProcessor,
    layout: SampleLayout = DEFAULT_LAYOUT,
    *,
    load_pixels: bool = True,
) -> dict[str, Any]:
    """`chosen_input_ids`/`_labels`, `rejected_input_ids`/`_labels`, the prompt's `pixel_values`/`image_sizes` (once),
    `prompt_length`, `num_images`, `truncated` and `id` of one pair.

    `layout.max_length` truncates each sequence as SFT does (text after the last image only); a sequence that keeps no
    token of its answer raises `SampleRefused`. `layout.video_frames`: frames sampled from each video (decoded once
    for both answers). The prompt is always one conversation (the layout generation uses), whatever
    `layout.multi_turn` says. `load_pixels=False` reads image headers only (lengths for planning).
    """
    max_length = layout.max_length
    record = frames_as_images(pair.prompt, layout.video_frames)
    where = f"{record.origin} id={record.id}" if record.origin else f"id={record.id}"
    prompt = build_example(record, processor, load_pixels=load_pixels, for_generation=True)
    prompt_ids = prompt["input_ids"]
    n = len(prompt_ids)
    example: dict[str, Any] = {"id": record.id, "prompt_length": n, "num_images": prompt["num_images"]}
    truncated = False
    for name in ANSWERS:
        answer = getattr(pair, name)
        built = build_example(
            with_last_answer(record, answer), processor, SampleLayout(max_length=max_length), load_pixels=False
        )
        ids, labels = built["input_ids"], built["labels"].clone()
        if len(ids) <= n or not torch.equal(ids[:n], prompt_ids):
            if not built["truncated"]:  # the builder's layout changed: prompt and answer sequence must agree
                raise ValueError(f"{where}: the {name} sequence does not start with the prompt")
            raise SampleRefused(
                record.id,
                "no_answer_after_truncation",
                f"{where}: no token of the {name} answer is left after truncating to "
                f"max_length={max_length} (the prompt alone has {n} tokens)",
            )
        labels[:n] = IGNORE_INDEX  # earlier turns' answers are context, not learned
        example[f"{name}_input_ids"] = ids
        example[f"{name}_labels"] = labels
        truncated = truncated or built["truncated"]
    example["truncated"] = truncated
    if prompt.get("pixel_values") is not None:
        example["pixel_values"] = prompt["pixel_values"]
        example["image_sizes"] = prompt["image_sizes"]
    return example


# ---------------------------------------------------------------------------------------------------------------------
def plan_pairs(
    pairs: list[PreferenceRecord], processor: Phi3VProcessor, layout: SampleLayout = DEFAULT_LAYOUT
) -> DataPlan:
    """`data.dataset.plan_records` for pairs: every pair built from image headers (no decoding), its length the
    tokens of both sequences (what a packed batch holds), truncation and refusals (a pair whose answer is cut away
    entirely, or whose images alone pass --max-length) listed."""
    plan = DataPlan()
    for pair in pairs:
        try:
            ex = build_pair_example(pair, processor, layout, load_pixels=False)
        except SampleRefused as err:
            plan.refused.append((pair.id, err.reason, str(err)))
            continue
        except ValueError as err:
            plan.refused.append((pair.id, "invalid", str(err)))
            continue
        plan.kept.append(pair)
        plan.lengths.append(sum(int(ex[f"{name}_input_ids"].shape[0]) for name in ANSWERS))
        plan.num_images += ex["num_images"]
        if ex["truncated"]:
            plan.truncated.append(pair.id)
    return plan


class PairDataset(Dataset):
    """Pair examples of planned pairs (images decoded here, in the data-loader workers); with `reference`
    ({pair id: (chosen, rejected)} reference log-probabilities, `model.preference.precompute_reference`) every example
    carries its pair's values, which the collators put in the batch."""

    def __init__(
        self,
        pairs: list[PreferenceRecord],
        processor: Phi3VProcessor,
        layout: SampleLayout = DEFAULT_LAYOUT,
        lengths: list[int] | None = None,
        reference: dict[str, tuple[float, float]] | None = None,
    ):
        self.pairs = pairs
        self.processor = processor
        self.layout = layout
        self.lengths = lengths
        self.reference = reference
        missing = [p.id for p in pairs if reference is not None and p.id not in reference]
        if missing:
            raise ValueError(f"no reference log-probabilities for pair(s) {', '.join(missing[:5])}")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        pair = self.pairs[i]
        example = build_pair_example(pair, self.processor, self.layout)
        if self.reference is not None:
            example["reference_chosen_logps"], example["reference_rejected_logps"] = self.reference[pair.id]
        return example


# ---------------------------------------------------------------------------------------------------------------------
def pair_sequences(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The token sequences of the pairs in pair order (chosen, rejected, chosen, ...), without images."""
    return [
        {"id": e.get("id"), "input_ids": e[f"{name}_input_ids"], "labels": e[f"{name}_labels"]}
        for e in examples
        for name in ANSWERS
    ]


def add_pair_fields(
    batch: dict[str, Any],
    examples: list[dict[str, Any]],
    bounds: list[tuple[int, int]],
    shared: list[bool] | None = None,
) -> dict[str, Any]:
    """Images once per pair with their `image_index`, `sequence_bounds`, pair `ids` and precomputed reference
    log-probabilities, on a batch of the pairs' sequences. `shared[i]`: pair i's prompt (so its image blocks) is in
    the batch once, not once per answer."""
    pixel_values, image_sizes, image_index = [], [], []
    for i, e in enumerate(examples):
        if e.get("pixel_values") is None:
            continue
        first = len(image_sizes)
        sizes = e["image_sizes"].tolist()
        own = list(range(first, first + len(sizes)))
        pixel_values.append(e["pixel_values"])
        image_sizes.extend(sizes)
        image_index.extend(own if shared and shared[i] else own + own)  # chosen, then rejected: the same images
    if pixel_values:
        batch["pixel_values"] = torch.cat(pixel_values, dim=0)
        batch["image_sizes"] = image_sizes
        batch["image_index"] = image_index
        batch["image_token_count"] = sum(int((e[f"{a}_input_ids"] < 0).sum()) for e in examples for a in ANSWERS)
    batch["sequence_bounds"] = bounds
    batch["ids"] = [e.get("id") for e in examples]
    carried = [e.get("reference_chosen_logps") is not None for e in examples]
    if any(carried):
        if not all(carried):
            missing = [str(e.get("id")) for e, c in zip(examples, carried) if not c]
            raise ValueError(f"pairs without precomputed reference log-probabilities: {', '.join(missing)}")
        values = [float(e[f"reference_{a}_logps"]) for e in examples for a in ANSWERS]
        batch["reference_logps"] = torch.tensor(values, dtype=torch.float32)
    return batch


class PairCollator:
    """Pairs -> a right-padded batch, sequence s in row s (pair order); see the module docstring for the keys."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, omit_full_mask: bool = False):
        self.collator = Collator(pad_token_id, "right", pad_to_multiple_of, omit_full_mask)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        sequences = pair_sequences(examples)
        batch = self.collator(sequences)
        width = batch["input_ids"].shape[1]
        bounds = [(s * width, s * width + len(seq["input_ids"])) for s, seq in enumerate(sequences)]
        return add_pair_fields(batch, examples, bounds)


class PackedPairCollator:
    """Pairs -> packed rows (`data.packing`); keys: see the module docstring.

    With `share_prompt` (the default) each pair is one unit in a row: its prompt and chosen answer, then a branch (the
    prompt's last token again and the rejected answer, positions continuing the prompt's) that attends to the prompt
    through the `model.packed_attention.BRANCH_KEYS` tensors; the prompt and its images run once per pair. A pair is
    packed as two full sequences instead where the two would take different su-RoPE factor sets (one sequence past
    `original_max_position_embeddings`, the other not), since its prompt would then differ between them. Without
    `share_prompt`, every pair is its two full sequences, concatenated in pair order. Either way both answers of a
    pair are in the same step and the same row (a unit longer than `max_tokens` gets a row of its own).
    """

    def __init__(
        self,
        pad_token_id: int,
        max_tokens: int | None = None,
        original_max_position_embeddings: int | None = None,
        share_prompt: bool = True,
    ):
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.pad_token_id = pad_token_id
        self.max_tokens = max_tokens
        self.original_max = original_max_position_embeddings
        self.share_prompt = share_prompt

    def _shares(self, example: dict[str, Any]) -> bool:
        n = int(example["prompt_length"])
        ids = [example[f"{name}_input_ids"] for name in ANSWERS]
        if not self.share_prompt or n < 1 or int(ids[0][n - 1]) < 0:
            return False
        if self.original_max is None:
            return True
        return (len(ids[0]) > self.original_max) == (len(ids[1]) > self.original_max)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        units = [unit for i, e in enumerate(examples) for unit in self._units(e, i)]
        rows = plan_rows([len(u["input_ids"]) for u in units], self.max_tokens)
        width = max(sum(len(units[i]["input_ids"]) for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        use_long = torch.zeros((len(rows), width), dtype=torch.bool)
        segments: list[int] = []
        bounds: list[tuple[int, int]] = [(0, 0)] * (2 * len(examples))
        branches: list[tuple[int, int, int, int]] = []
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                unit, flat = units[i], r * width + start
                n = len(unit["input_ids"])
                input_ids[r, start : start + n] = unit["input_ids"]
                labels[r, start : start + n] = unit["labels"]
                position_ids[r, start : start + n] = unit["position_ids"]
                use_long[r, start : start + n] = unit["use_long"]
                segments.extend(unit["segments"])
                for s, (s0, s1) in unit["sequences"].items():
                    bounds[s] = (flat + s0, flat + s1)
                if unit["branch"] is not None:
                    p0, p1, b0, b1 = unit["branch"]
                    branches.append((flat + p0, flat + p1, flat + b0, flat + b1))
                start += n
            if start < width:  # padding: a segment of its own
                position_ids[r, start:] = torch.arange(width - start)
                segments.append(width - start)
        cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(segments), 0)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu.clone(),
            "max_length_q": max(segments),
            "max_length_k": max(segments),
        }
        if self.original_max is not None:
            batch["rope_use_long"] = use_long
        if branches:
            batch.update(branch_attention_inputs(branches))
        batch["num_tokens"] = sum(len(u["input_ids"]) for u in units)
        shared = [False] * len(examples)
        for unit in units:
            if unit["branch"] is not None:
                shared[min(unit["sequences"]) // 2] = True
        batch = add_pair_fields(batch, examples, bounds, shared=shared)
        if "image_token_count" in batch:
            batch["image_token_count"] = int((input_ids < 0).sum())
        return batch

    def _units(self, example: dict[str, Any], index: int) -> list[dict[str, Any]]:
        """Pair `index`'s pieces for the rows: one shared-prompt unit, or its two sequences as units of their own.
        Each holds ids, labels (first one never a target), positions, su-RoPE flags, segment lengths, its sequences'
        {pair-order index: [start, end)} and its branch (prompt start, prompt end, branch start, branch end) or None."""
        ids = [example[f"{name}_input_ids"] for name in ANSWERS]
        labels = [example[f"{name}_labels"].clone() for name in ANSWERS]
        longs = [self.original_max is not None and len(x) > self.original_max for x in ids]
        for x in labels:
            x[0] = IGNORE_INDEX  # never a target: the previous segment's last token precedes it
        if not self._shares(example):
            return [
                {
                    "input_ids": x,
                    "labels": y,
                    "position_ids": torch.arange(len(x)),
                    "use_long": torch.full((len(x),), flag),
                    "segments": [len(x)],
                    "sequences": {2 * index + k: (0, len(x))},
                    "branch": None,
                }
                for k, (x, y, flag) in enumerate(zip(ids, labels, longs))
            ]
        n = int(example["prompt_length"])
        chosen, rest = len(ids[0]), len(ids[1]) - n + 1  # the branch: the prompt's last token, then the answer
        return [
            {
                "input_ids": torch.cat([ids[0], ids[1][n - 1 :]]),
                "labels": torch.cat([labels[0], labels[1][n - 1 :]]),  # labels[1][n - 1] is the prompt's: -100
                "position_ids": torch.cat([torch.arange(chosen), torch.arange(n - 1, n - 1 + rest)]),
                "use_long": torch.full((chosen + rest,), longs[0]),
                "segments": [chosen, rest],
                "sequences": {2 * index: (0, chosen), 2 * index + 1: (chosen, chosen + rest)},
                "branch": (0, n - 1, chosen, chosen + rest),
            }
        ]
