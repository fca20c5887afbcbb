"""Causal-LM loss without full-vocabulary logits for every position.

transformers' path projects every position onto the 32064-token vocabulary and upcasts the result to fp32 before the
cross-entropy: for a DocVQA sample (thousands of tokens, a few dozen of them answer tokens) that is sequence length x
32064 fp32 logits kept for backward, almost all of them for image and prompt positions whose label is -100. Here only
the positions with a (shifted) label go through `lm_head`, in chunks, and each chunk runs under non-reentrant
activation checkpointing so its logits are recomputed in backward instead of stored. `lm_head` is called as a module,
so a PEFT LoRA-wrapped head (or a DeepSpeed-hooked one) works unchanged.

Semantics are those of transformers' `ForCausalLMLoss`: labels shifted left by one (or `shift_labels` as given),
`ignore_index` -100, logits upcast to fp32, `sum / num_items_in_batch` when the Trainer passes `num_items_in_batch`,
otherwise the mean over the labelled positions (NaN when there are none, as `cross_entropy` gives).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
DEFAULT_CHUNK = 2048


def shifted_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Label of position i = token i+1 (the last position predicts nothing)."""
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def keep_positions(x: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """`x` (B, L, ...) restricted to the positions `logits_to_keep` selects (transformers' convention, 0 = all)."""
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.ndim == 2:
        if logits_to_keep.dtype == torch.bool:
            return x[logits_to_keep]
        index = logits_to_keep.reshape(*logits_to_keep.shape, *([1] * (x.dim() - 2)))
        return torch.take_along_dim(x, index, dim=1)
    if isinstance(logits_to_keep, int):
        return x if logits_to_keep == 0 else x[:, -logits_to_keep:]
    return x[:, logits_to_keep]


def _chunk_loss_sum(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor):
    logits = head(hidden).float()
    return nn.functional.cross_entropy(logits, targets, reduction="sum")


def chunked_lm_loss(
    hidden_states: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor | None = None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    chunk_size: int = DEFAULT_CHUNK,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Loss of `lm_head(hidden_states)` against the shifted `labels`, computed on labelled positions only.

    `hidden_states` is (B, L, H) from the base model; `labels` is (B, L) (or pass `shift_labels` already shifted).
    `logits_to_keep` restricts the loss to the positions it selects (after shifting).
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("pass labels or shift_labels")
        shift_labels = shifted_labels(labels, ignore_index)
    shift_labels = shift_labels.to(hidden_states.device)
    hidden = keep_positions(hidden_states, logits_to_keep)
    targets = keep_positions(shift_labels[..., None], logits_to_keep)[..., 0]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    index = (targets != ignore_index).nonzero().squeeze(1)
    hidden = hidden.index_select(0, index)
    targets = targets.index_select(0, index)
    total = hidden_states.new_zeros((), dtype=torch.float32)
    # at least one (possibly empty) chunk: lm_head stays in the graph when no position is labelled (DDP wants it)
    for start in range(0, max(1, targets.numel()), chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, lm_head, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(lm_head, h, t)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / targets.numel()  # 0 / 0 = NaN with no labelled position, as cross_entropy's mean
