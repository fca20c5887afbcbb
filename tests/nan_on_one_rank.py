"""Run by test_distributed under torchrun: `phi3v-tune train ...` where only rank 1's first training batch has a
NaN loss (what one bad sample does), to check that every rank stops, or skips, together."""

from __future__ import annotations

import os
import sys

from transformers import Trainer

from phi3v_tune.cli import main

plain_compute_loss = Trainer.compute_loss
batches_seen = [0]


def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    result = plain_compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
    if model.training and os.environ.get("RANK") == "1":
        batches_seen[0] += 1
        if batches_seen[0] == 1:
            return result * float("nan")
    return result


Trainer.compute_loss = compute_loss
sys.exit(main())
