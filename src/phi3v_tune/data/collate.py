"""Examples -> a padded batch. Attention masks come from lengths (pad id == `<|endoftext|>`, a learned token)."""

from __future__ import annotations

from typing import Any

import torch

from ..model.loss import IGNORE_INDEX


class Collator:
    """Right-pads `input_ids` (pad id), `labels` (-100) and builds `attention_mask` from each example's length.

    Images of all examples are concatenated in batch order, which is the order in which the model fills the image
    positions. `ids` (sample ids) travel with the batch so errors can name the samples of a step, `num_tokens` (real
    tokens) for throughput.

    `omit_full_mask` (training): a batch without padding (batch size 1, or rows of equal length) gets no
    `attention_mask`. The model computes the same without it, and it spares a GPU-to-host read per step
    (transformers checks whether a given mask is all ones before it lets SDPA run plain causal attention).
    """

    def __init__(
        self,
        pad_token_id: int,
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        omit_full_mask: bool = False,
    ):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.omit_full_mask = omit_full_mask

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = [int(e["input_ids"].shape[0]) for e in examples]
        width = max(lengths)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        n = len(examples)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, (e, length) in enumerate(zip(examples, lengths)):
            sl = slice(width - length, width) if self.padding_side == "left" else slice(0, length)
            input_ids[i, sl] = e["input_ids"]
            if "labels" in e:
                labels[i, sl] = e["labels"]
            mask[i, sl] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        if self.omit_full_mask and all(length == width for length in lengths):
            del batch["attention_mask"]
        batch["num_tokens"] = sum(lengths)
        return add_images_and_ids(batch, examples)


def add_images_and_ids(batch: dict[str, Any], examples: list[dict[str, Any]]) -> dict[str, Any]:
    """The images of all examples, concatenated in example order (the order in which the model fills image
    positions), their (h, w) sizes and token count (`image_token_count`), and the sample ids; shared by the padded
    and the packing collator.

    Sizes and count are plain Python values: the model reads them only on the host, and data loaders and DDP move
    tensors to the GPU, from where every step would have to read them back (a stall of the host)."""
    with_images = [e for e in examples if e.get("pixel_values") is not None]
    if with_images:
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images], dim=0)
        batch["image_sizes"] = [size for e in with_images for size in e["image_sizes"].tolist()]
        batch["image_token_count"] = sum(int((e["input_ids"] < 0).sum()) for e in examples)
    batch["ids"] = [e.get("id") for e in examples]
    return batch
