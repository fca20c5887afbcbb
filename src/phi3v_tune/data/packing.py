"""Examples -> packed rows: the samples of a batch concatenated without padding (padding-free training).

A right-padded batch computes `batch x longest` tokens; a packed row computes the sum of the lengths. The result is
exact, the same loss and gradients as the padded batch:

* `position_ids` restart at 0 for every sample, and `cu_seq_lens_q/_k` (int32 offsets of the sample starts in the
  flattened rows, from 0 to the total) keep attention inside each sample (`model.packed_attention`);
* the loss shifts labels by one (position t predicts label t+1), so the first label of every sample is set to -100:
  the last token of sample k never learns to predict the first token of sample k+1. A sample's first label is never
  a target in a padded batch either, so the number of label tokens (HF Trainer's `num_items_in_batch`, counted over
  `labels[..., 1:]`) is the same as well;
* `rope_use_long` marks, per token, the samples longer than `original_max_position_embeddings`: those use the long
  su-RoPE factors on all their tokens, as when they run alone;
* images are concatenated in sample order; the model fills image positions row-major, so each sample's image
  features land in that sample.

With `max_tokens`, samples fill rows in order up to that many tokens each (a longer sample gets a row of its own);
shorter rows are padded at the end by a padding segment of their own (labels -100) that no sample attends to.
"""

from __future__ import annotations

from typing import Any

import torch

from ..model.loss import IGNORE_INDEX
from .collate import add_images_and_ids


def plan_rows(lengths: list[int], max_tokens: int | None) -> list[list[int]]:
    """Sample indices per row, in order; a new row starts when the next sample would pass `max_tokens`."""
    rows: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if max_tokens is not None and rows[-1] and used + n > max_tokens:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


class PackingCollator:
    """Packs the examples of a batch into one row (or a few under `max_tokens`); see the module docstring.

    Emits `input_ids`, `labels`, `position_ids` (rows, length), `cu_seq_lens_q`/`_k` (int32), `max_length_q`/`_k`,
    `rope_use_long` (when `original_max_position_embeddings` is given), `pixel_values`/`image_sizes`, `ids` and
    `num_tokens` (real tokens, for throughput). No `attention_mask`: packed rows have none.
    """

    def __init__(
        self,
        pad_token_id: int,
        max_tokens: int | None = None,
        original_max_position_embeddings: int | None = None,
    ):
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.pad_token_id = pad_token_id
        self.max_tokens = max_tokens
        self.original_max = original_max_position_embeddings

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = [int(e["input_ids"].shape[0]) for e in examples]
        rows = plan_rows(lengths, self.max_tokens)
        width = max(sum(lengths[i] for i in row) for row in rows)
        segments: list[int] = []  # lengths of the segments in flattened order, padding segments included
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        use_long = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                e, n = examples[i], lengths[i]
                input_ids[r, start : start + n] = e["input_ids"]
                if "labels" in e:
                    labels[r, start : start + n] = e["labels"]
                    labels[r, start] = IGNORE_INDEX  # never a target: the previous sample's last token precedes it
                position_ids[r, start : start + n] = torch.arange(n)
                if self.original_max is not None and n > self.original_max:
                    use_long[r, start : start + n] = True
                segments.append(n)
                start += n
            if start < width:  # padding: a segment of its own
                position_ids[r, start:] = torch.arange(width - start)
                segments.append(width - start)
        cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(segments), 0)
        longest = max(segments)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu.clone(),
            "max_length_q": longest,
            "max_length_k": longest,
        }
        if self.original_max is not None:
            batch["rope_use_long"] = use_long
        batch["num_tokens"] = sum(lengths)
        return add_images_and_ids(batch, examples)
