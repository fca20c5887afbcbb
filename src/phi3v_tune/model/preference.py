"""Preference tuning on the model: answer log-probabilities per sequence, the DPO / IPO losses, images once per pair and
the reference model's log-probabilities.

Batch layout (built by `data.preference`). P pairs give 2P sequences in *pair order*: sequence 2i is pair i's chosen
answer, 2i+1 its rejected one. Each sequence is the pair's prompt (earlier turns, the last user turn and its images)
followed by one answer, and only the answer's tokens are labelled. Padded batches hold sequence s in row s; packed
batches concatenate the sequences in order (`data.packing`). `sequence_bounds` gives each sequence's [start, end) in
the flattened (rows x width) tokens. A pair's images are stored once in `pixel_values`; `image_index` names the image
that fills each image block of the batch (`Phi3VModel.embed`), so both sequences of a pair read the features of one
vision-tower pass, and the gradient of an image feature sums its two uses.

Loss definitions. For an answer y to prompt x, log π(y|x) is the SUM over its labelled tokens of log π(y_t | x, y_<t)
(labels shifted as the LM loss shifts them; the answer's `<|end|>`, newline and `<|endoftext|>` count, as in SFT) and
|y| is the number of those tokens. With policy π_θ, reference π_ref, chosen y_w and rejected y_l, the log-ratios are
ρ_w = log π_θ(y_w|x) - log π_ref(y_w|x) and ρ_l = log π_θ(y_l|x) - log π_ref(y_l|x). Per pair:

* ``sigmoid`` (DPO, Rafailov et al. 2023, eq. 7), with label smoothing ε (conservative DPO: the recorded preference
  is taken to be wrong with probability ε):  h = β (ρ_w - ρ_l),  loss = -(1 - ε) log σ(h) - ε log σ(-h).
  ε = 0 is the paper's loss. Rewards: r_w = β ρ_w, r_l = β ρ_l (the paper's implicit reward; summed log-probs).
* ``ipo`` (Azar et al. 2023, eq. 17, with τ = β): loss = (ρ̄_w - ρ̄_l - 1/(2β))^2 with ρ̄ = ρ / |y|, the
  per-token MEAN log-ratio. The squared loss pulls the margin to a fixed target whatever the answers' lengths; with
  sums, a long answer pair would need a margin many times a short pair's for the same per-token preference (TRL's
  ipo loss normalises the same way). Rewards: r = β ρ̄ (what the loss compares). Label smoothing does not apply.
* SFT term (RPO, Pang et al. 2024), added to either loss: sft_weight x (-log π_θ(y_w|x) / |y_w|), the chosen answer's
  mean negative log-likelihood per answer token.

The step's loss is the mean of the per-pair losses over the pairs of the batch, or their sum divided by `num_pairs`
when the caller counts the pairs of a whole accumulated step. Reward accuracy is the share of pairs with r_w > r_l,
a tie counting half (before the first update every pair is a tie: 50%, chance); the reward margin is r_w - r_l.

Reference. For LoRA / QLoRA the reference is the policy model with its adapters disabled (PEFT's `disable_adapter()`;
no second copy); for full / freeze-vision training a frozen copy (`frozen_copy`) or log-probabilities computed before
training (`precompute_reference`), which batches then carry as `reference_logps`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput

from .loss import DEFAULT_CHUNK, IGNORE_INDEX, shifted_labels
from .packed_attention import BRANCH_KEYS

LOSS_TYPES = ("sigmoid", "ipo")

#: Batch keys the model's forward takes (the rest of a preference batch is read here or by the trainer).
MODEL_KEYS = (
    "input_ids",
    "attention_mask",
    "labels",
    "position_ids",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
    "rope_use_long",
    "pixel_values",
    "image_sizes",
    "image_token_count",
    "image_index",
    *BRANCH_KEYS,
)


@dataclass
class TokenLogpsOutput(ModelOutput):
    """`Phi3VForCausalLM.forward(..., labels=..., return_token_logps=True)`: `token_logps` (B, L) float32, at position
    t the log-probability of label t+1 where that label is not ignored, 0 elsewhere."""

    token_logps: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def _chunk_logps(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor):
    logits = head(hidden).float()
    return -nn.functional.cross_entropy(logits, targets, reduction="none")


def chunked_token_logps(
    hidden_states: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """(B, L) float32 log-probabilities of the shifted `labels` (0 where ignored) from the base model's hidden states.

    As `model.loss.chunked_lm_loss`: only labelled positions go through `lm_head` (called as a module, so PEFT and
    DeepSpeed hooks apply), in chunks whose fp32 logits are recomputed in backward instead of stored.
    """
    targets = shifted_labels(labels, ignore_index).to(hidden_states.device).reshape(-1)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    index = (targets != ignore_index).nonzero().squeeze(1)
    hidden = hidden.index_select(0, index)
    kept = targets.index_select(0, index)
    pieces = []
    # at least one (possibly empty) chunk: lm_head stays in the graph when no position is labelled (DDP wants it)
    for start in range(0, max(1, kept.numel()), chunk_size):
        h, t = hidden[start : start + chunk_size], kept[start : start + chunk_size]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_logps, lm_head, h, t, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(lm_head, h, t))
    values = torch.cat(pieces)
    return values.new_zeros(targets.numel()).index_put((index,), values).view(labels.shape)


def per_sequence_sums(values: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
    """Sums of `values` (rows x width, flattened) over each [start, end) of `bounds`: (len(bounds),).

    Slices in a fixed order rather than `index_add` (whose CUDA atomics add in a varying order): same inputs, same
    bits, which bit-exact resume needs.
    """
    flat = values.reshape(-1)
    return torch.stack([flat[start:end].sum() for start, end in bounds])


def answer_token_counts(labels: torch.Tensor, bounds: list[tuple[int, int]], ignore_index: int = IGNORE_INDEX):
    """Labelled (answer) tokens of each sequence, counted after the shift as the log-probabilities are: (S,) long."""
    return per_sequence_sums(shifted_labels(labels, ignore_index).ne(ignore_index).long(), bounds)


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The entries of a preference batch that go to the model's forward."""
    return {k: v for k, v in batch.items() if k in MODEL_KEYS}


def sequence_logps(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed answer-token log-probabilities (S,) float32, answer-token counts (S,) long) of the batch's sequences in
    pair order, padded or packed; one forward of `model` (any wrapper: DDP, PEFT, DeepSpeed), logits only for
    labelled positions and chunked."""
    bounds = batch["sequence_bounds"]
    token_logps = model(**model_inputs(batch), return_token_logps=True).token_logps
    labels = batch["labels"].to(token_logps.device)
    return per_sequence_sums(token_logps, bounds), answer_token_counts(labels, bounds)


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair order (chosen, rejected, chosen, ...) -> (chosen (P,), rejected (P,))."""
    if values.shape[0] % 2:
        raise ValueError(f"{values.shape[0]} sequences are not pairs (pair order: chosen, rejected, ...)")
    return values[0::2], values[1::2]


# ---------------------------------------------------------------------------------------------------------------------
def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    *,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and (detached) rewards of chosen and rejected answers; see the module docstring.

    Every log-probability is the SUMMED answer-token log-probability (P,). "sigmoid" uses the sums; "ipo" divides the
    log-ratios by the answer-token counts `chosen_tokens` / `rejected_tokens` (required for ipo) to per-token means.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        h = beta * (chosen_ratio - rejected_ratio)
        logsigmoid = nn.functional.logsigmoid
        losses = -(1.0 - label_smoothing) * logsigmoid(h) - label_smoothing * logsigmoid(-h)
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid (DPO) loss only, not to ipo")
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss compares per-token means: pass chosen_tokens and rejected_tokens")
        chosen_ratio = chosen_ratio / chosen_tokens.to(chosen_ratio.device)
        rejected_ratio = rejected_ratio / rejected_tokens.to(rejected_ratio.device)
        losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def sft_loss(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """RPO's added term per pair: the chosen answer's mean negative log-likelihood per answer token (P,)."""
    return -policy_chosen / chosen_tokens.to(policy_chosen.device)


# ---------------------------------------------------------------------------------------------------------------------
def find_peft_model(model: nn.Module) -> nn.Module | None:
    """The PEFT model inside `model` (itself, or inside DDP / DeepSpeed `.module` or torch.compile `._orig_mod`)."""
    seen = model
    for _ in range(8):
        if hasattr(seen, "disable_adapter") and hasattr(seen, "peft_config"):
            return seen
        inner = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
        if inner is None:
            return None
        seen = inner
    return None


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block `model` (a PEFT model, or a wrapper around one) computes what its base model computes."""
    peft_model = find_peft_model(model)
    if peft_model is None:
        raise ValueError(
            "the reference is the base model with adapters disabled, but this model has no PEFT adapters: "
            "pass a reference model (full / freeze-vision) or precomputed reference log-probabilities"
        )
    with peft_model.disable_adapter():
        yield


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode copy of `model` (before any DDP / DeepSpeed / FSDP wrapping) to serve as the reference."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference.eval()


@torch.no_grad()
def reference_logps(model: nn.Module, batch: dict[str, Any], reference: nn.Module | None = None) -> torch.Tensor:
    """Summed answer-token log-probabilities (S,) of the reference model for the batch's sequences, in pair order.

    Taken from the batch when it carries precomputed `reference_logps`; else computed by `reference` when given (a
    frozen copy); else by `model` with its PEFT adapters disabled. Runs without gradients; the model's train/eval mode
    is left as it is (with adapters disabled LoRA dropout does not run; the published config has no other dropout).
    """
    stored = batch.get("reference_logps")
    if stored is not None:
        return stored.to(batch["input_ids"].device, torch.float32)
    if reference is not None:
        return sequence_logps(reference, batch)[0]
    with adapters_disabled(model):
        return sequence_logps(model, batch)[0]


def precompute_reference(
    model: nn.Module, batches: Iterable[dict[str, Any]], reference: nn.Module | None = None
) -> dict[str, tuple[float, float]]:
    """{pair id: (reference log-prob of chosen, of rejected)} over `batches` (preference batches with pair `ids`), for
    storing with a run; batches then carry them as `reference_logps` (see `data.preference`). Ids must be unique."""
    table: dict[str, tuple[float, float]] = {}
    for batch in batches:
        chosen, rejected = split_pairs(reference_logps(model, {**batch, "reference_logps": None}, reference))
        for pair_id, c, r in zip(batch["ids"], chosen.tolist(), rejected.tolist()):
            if pair_id in table:
                raise ValueError(f"pair id {pair_id!r} occurs twice: reference log-probabilities are stored by id")
            table[pair_id] = (c, r)
    return table


# ---------------------------------------------------------------------------------------------------------------------
def reward_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per pair 1 where the chosen answer's reward is higher, 0 where lower, 1/2 for a tie: an undecided model scores
    chance (before the first update the policy is the reference, so every reward is 0 and every pair a tie)."""
    return (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()


@dataclass
class PreferenceStep:
    """One preference batch through policy and reference: the loss to backpropagate and per-pair values for metrics
    (detached, float32, (P,) each)."""

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: torch.Tensor
    reference_rejected: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        """Per-pair values under their metric names (average over the pairs of a logging window or evaluation)."""
        return {
            "rewards/chosen": self.chosen_rewards,
            "rewards/rejected": self.rejected_rewards,
            "rewards/margins": self.chosen_rewards - self.rejected_rewards,
            "rewards/accuracies": reward_accuracy(self.chosen_rewards, self.rejected_rewards),
            "logps/chosen": self.policy_chosen,
            "logps/rejected": self.policy_rejected,
            "ref_logps/chosen": self.reference_chosen,
            "ref_logps/rejected": self.reference_rejected,
        }


def preference_step(
    model: nn.Module,
    batch: dict[str, Any],
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    reference: nn.Module | None = None,
    num_pairs: int | torch.Tensor | None = None,
) -> PreferenceStep:
    """Reference log-probabilities (see `reference_logps`), then the policy's forward and the loss: the mean of the
    per-pair losses (+ `sft_weight` x `sft_loss`), or their sum / `num_pairs` (pairs of the whole accumulated step,
    as the Trainer's `num_items_in_batch`)."""
    ref_chosen, ref_rejected = split_pairs(reference_logps(model, batch, reference))
    logps, tokens = sequence_logps(model, batch)
    policy_chosen, policy_rejected = split_pairs(logps)
    chosen_tokens, rejected_tokens = split_pairs(tokens)
    ref_chosen, ref_rejected = ref_chosen.to(logps.device), ref_rejected.to(logps.device)
    losses, chosen_rewards, rejected_rewards = preference_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        beta,
        loss_type,
        label_smoothing,
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
    )
    if sft_weight:
        losses = losses + sft_weight * sft_loss(policy_chosen, chosen_tokens)
    if num_pairs is None:
        loss = losses.mean()
    else:
        loss = losses.sum() / (num_pairs.to(losses.device) if torch.is_tensor(num_pairs) else num_pairs)
    return PreferenceStep(
        loss=loss,
        losses=losses.detach(),
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        policy_chosen=policy_chosen.detach(),
        policy_rejected=policy_rejected.detach(),
        reference_chosen=ref_chosen,
        reference_rejected=ref_rejected,
    )
