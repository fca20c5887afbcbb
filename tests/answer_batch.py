"""One chat-formatted image question with its answer, labelled on the last tokens only (shared by the tests that
compare losses and gradients of two model variants on the same batch)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def answer_batch(processor, answer: str, image_seed: int, image_hw: tuple[int, int], labelled: int = 6):
    """(processor outputs, labels): the question "What colour?" about a random image, then `answer`; only the last
    `labelled` tokens carry labels."""
    chat = processor.apply_chat_template
    text = chat([{"role": "user", "content": "<|image_1|>\nWhat colour?"}]) + f"{answer}<|end|>\n<|endoftext|>"
    pixels = np.random.RandomState(image_seed).randint(0, 256, (*image_hw, 3), dtype=np.uint8)
    inputs = dict(processor(text=[text], images=[[Image.fromarray(pixels)]]))
    labels: torch.Tensor = inputs["input_ids"].clone()
    labels[labels < 0] = -100
    labels[:, :-labelled] = -100
    return inputs, labels
