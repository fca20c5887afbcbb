"""Batched greedy generation over records (left padding, KV cache, stop on `<|end|>` / `<|endoftext|>`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..data.collate import Collator
from ..data.examples import build_example
from ..data.layout import SampleLayout
from ..data.schema import Record
from ..data.video import DEFAULT_VIDEO_FRAMES
from ..model.modeling import rope_per_sample
from ..processing.processor import Phi3VProcessor


@torch.no_grad()
def generate_answers(
    model,
    processor: Phi3VProcessor,
    records: Sequence[Record],
    batch_size: int = 8,
    max_new_tokens: int = 64,
    video_frames: int = DEFAULT_VIDEO_FRAMES,
    progress: bool = True,
    desc: str = "generating",
) -> list[str]:
    """Answer the last turn of every record (earlier turns, with their answers, form the context).

    Only `video_frames` of the sample layout applies to a prompt: it is one conversation (whatever the training
    layout) and never cut."""
    layout = SampleLayout(video_frames=video_frames)
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    collate = Collator(processor.tokenizer.pad_token_id, padding_side="left")
    stop = processor.stop_token_ids
    answers: list[str] = []
    try:
        for start in tqdm(range(0, len(records), batch_size), desc=desc, disable=not progress, leave=False):
            chunk = records[start : start + batch_size]
            batch = collate([build_example(r, processor, layout, for_generation=True) for r in chunk])
            batch.pop("ids")
            batch.pop("labels")
            batch.pop("num_tokens")
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with rope_per_sample(model):  # a prompt's answer never depends on what it is batched with
                out = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=stop,
                    pad_token_id=processor.tokenizer.pad_token_id,
                )
            new = out[:, inputs["input_ids"].shape[1] :]
            answers.extend(processor.tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return answers
