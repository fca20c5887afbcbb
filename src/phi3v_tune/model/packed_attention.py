"""Attention for packed rows: several samples concatenated into one row, told apart by `cu_seq_lens`.

Why: a right-padded batch costs `batch x longest sample` tokens in every layer; packing the same samples into one
row without padding costs the sum of their lengths. It stays exact because each sample attends causally to its own
tokens only, and its positions restart at 0 (see `data.packing.PackingCollator`), so every token sees what it would see
if its sample ran alone.

`ATTN_NAME` ("phi3v_packed") is registered with transformers' attention interface. Given the flash-attention style
kwargs `cu_seq_lens_q`/`cu_seq_lens_k` (int32 offsets into the flattened `batch x length` tokens, starting at 0) and
`max_length_q`/`max_length_k`, it runs variable-length attention: `torch.nn.attention.varlen.varlen_attn` on CUDA in
bf16/fp16 where this torch has it, otherwise causal SDPA over each segment (exact; the CPU path). Without those kwargs
it *is* transformers' "sdpa", so evaluation and generation through the same model are unchanged.

transformers builds a dense block-diagonal mask when position ids restart inside a row; packed forwards run inside
`packed_rows()`, under which the mask function registered for this name builds nothing.

Shared prompts (preference pairs, `data.preference.PackedPairCollator`): a pair is packed as its prompt and chosen
answer (one causal segment), then a *branch*: the prompt's last token again and the rejected answer, with positions
continuing the prompt's. The branch's tokens must see the prompt as well as themselves, which no block-diagonal layout
expresses, so the `BRANCH_KEYS` tensors (`branch_attention_inputs`) describe them: the attention first runs every
segment as above (the branch segment alone, a few dozen tokens), then recomputes the branch tokens' outputs with the
prompt's keys in front of theirs (one masked SDPA over all branches of the batch) and writes them over. Each branch
token then sees exactly what the rejected sequence run alone would show it, so logits, loss and gradients are those
of two full sequences while the prompt, thousands of tokens at document shapes, runs once.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

try:  # torch >= 2.10; older releases run packed rows through SDPA per segment
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

ATTN_NAME = "phi3v_packed"

#: Batch keys of shared-prompt branches (tensors; see the module docstring and `branch_attention_inputs`).
BRANCH_KEYS = ("branch_query_index", "branch_key_index", "branch_mask", "branch_positions", "branch_slots")

_PACKED_ROWS: ContextVar[bool] = ContextVar("phi3v_packed_rows", default=False)


@contextmanager
def packed_rows() -> Iterator[None]:
    """While active, the mask function of `ATTN_NAME` returns None (the attention takes segments from cu_seq_lens)."""
    token = _PACKED_ROWS.set(True)
    try:
        yield
    finally:
        _PACKED_ROWS.reset(token)


def packed_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' sdpa mask, except on packed rows, where no (dense, length x length) mask is needed."""
    return None if _PACKED_ROWS.get() else sdpa_mask(*args, **kwargs)


def _find_varlen() -> tuple[Callable | None, dict[str, Any]]:
    """torch's varlen_attn and its causal keyword (torch 2.10/2.11: is_causal=True; 2.13: window_size=(-1, 0))."""
    if varlen_attn is None:
        return None, {}
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        return varlen_attn, {"window_size": (-1, 0)}
    if "is_causal" in params:
        return varlen_attn, {"is_causal": True}
    return None, {}


VARLEN_ATTN, _VARLEN_CAUSAL = _find_varlen()
_VARLEN_SCALE = VARLEN_ATTN is not None and "scale" in inspect.signature(VARLEN_ATTN).parameters


def segment_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: list[int],
    scaling: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """(T, H, D) flattened tokens -> (T, H, D): causal SDPA inside each segment [cu[i], cu[i+1])."""
    out = []
    for start, end in zip(cu_seq_lens[:-1], cu_seq_lens[1:]):
        if end <= start:
            continue
        q, k, v = (x[start:end].transpose(0, 1)[None] for x in (query, key, value))  # (1, H, n, D)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
        out.append(o[0].transpose(0, 1))
    return torch.cat(out, dim=0)


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int | None,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """(T, H, D) flattened tokens -> (T, H, D), causal within each segment; the fused kernel where it applies."""
    fused = (
        VARLEN_ATTN is not None
        and query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and dropout == 0.0
        and (scaling is None or _VARLEN_SCALE)
    )
    if fused:
        cu = cu_seq_lens.to(device=query.device, dtype=torch.int32)
        if max_length is None:
            max_length = int((cu[1:] - cu[:-1]).max())
        extra = dict(_VARLEN_CAUSAL)
        if scaling is not None:
            extra["scale"] = scaling
        return VARLEN_ATTN(query, key, value, cu, cu, max_length, max_length, **extra)
    return segment_attention(query, key, value, [int(x) for x in cu_seq_lens.tolist()], scaling, dropout)


def branch_attention_inputs(branches: list[tuple[int, int, int, int]]) -> dict[str, torch.Tensor]:
    """The `BRANCH_KEYS` tensors for branches given as (prefix start, prefix end, branch start, branch end) flat token
    offsets: branch token j attends to the prefix [prefix start, prefix end) and to branch tokens 0..j.

    `branch_query_index` (B, Q) and `branch_key_index` (B, K) hold flat token positions, padded with 0 to the longest
    branch and key list; `branch_mask` (B, Q, K) says which key each query sees (a padded query sees key 0 only, so
    its softmax stays finite; its output is never used); `branch_positions` (N,) are the N branch tokens' flat positions
    and `branch_slots` (N,) where each one's output lies in the flattened (B x Q) result."""
    queries = [list(range(b0, b1)) for _, _, b0, b1 in branches]
    keys = [list(range(p0, p1)) + list(range(b0, b1)) for p0, p1, b0, b1 in branches]
    width_q, width_k = max(map(len, queries)), max(map(len, keys))
    query_index = torch.zeros(len(branches), width_q, dtype=torch.long)
    key_index = torch.zeros(len(branches), width_k, dtype=torch.long)
    mask = torch.zeros(len(branches), width_q, width_k, dtype=torch.bool)
    mask[:, :, 0] = True
    slots = []
    for i, ((p0, p1, _, _), q, k) in enumerate(zip(branches, queries, keys)):
        query_index[i, : len(q)] = torch.tensor(q)
        key_index[i, : len(k)] = torch.tensor(k)
        prefix = p1 - p0
        mask[i, : len(q), :prefix] = True
        mask[i, : len(q), prefix : prefix + len(q)] = torch.ones(len(q), len(q), dtype=torch.bool).tril()
        slots.extend(range(i * width_q, i * width_q + len(q)))
    return {
        "branch_query_index": query_index,
        "branch_key_index": key_index,
        "branch_mask": mask,
        "branch_positions": torch.tensor([p for q in queries for p in q], dtype=torch.long),
        "branch_slots": torch.tensor(slots, dtype=torch.long),
    }


def branch_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    branch: dict[str, torch.Tensor],
    scaling: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """`out` (T, H, D) with the outputs of the branch tokens replaced by their attention over prefix + own branch.

    Shapes come from the index tensors only (no host reads), so compiled layers trace it with dynamic shapes."""
    q = query[branch["branch_query_index"]].transpose(1, 2)  # (B, H, Q, D)
    k = key[branch["branch_key_index"]].transpose(1, 2)
    v = value[branch["branch_key_index"]].transpose(1, 2)
    mask = branch["branch_mask"][:, None]  # (B, 1, Q, K)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
    o = o.transpose(1, 2).reshape(-1, *out.shape[1:]).index_select(0, branch["branch_slots"])
    return out.index_copy(0, branch["branch_positions"], o.to(out.dtype))


def check_packed(cu_seq_lens_q: torch.Tensor, cu_seq_lens_k: torch.Tensor | None, batch: int, length: int) -> None:
    """Offsets must start at 0, never decrease, end at batch x length, and be the same for queries and keys.

    Their values are read only where they already are on the host. On a GPU, reading them would wait for every kernel
    queued before (the previous step's backward and optimizer), so only their shapes are checked there; training's
    offsets come from `data.packing.PackingCollator`, which builds them on the host from the sample lengths.
    """
    cu, cu_k = cu_seq_lens_q, cu_seq_lens_k
    not_same = "packed rows are self-attention: cu_seq_lens_k must equal cu_seq_lens_q"
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seq_lens_q must be a 1-d tensor of at least 2 offsets, got shape {tuple(cu.shape)}")
    if cu_k is not None and cu_k.shape != cu.shape:
        raise ValueError(not_same)
    if cu.device.type != "cpu":
        return
    if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seq_lens_q must be increasing offsets starting at 0, got {cu.tolist()}")
    if int(cu[-1]) != batch * length:
        raise ValueError(f"cu_seq_lens_q ends at {int(cu[-1])} but the rows hold {batch} x {length} tokens")
    if cu_k is not None and cu_k.device.type == "cpu" and not torch.equal(cu_k, cu):
        raise ValueError(not_same)


def sequence_lengths(cu_seq_lens: torch.Tensor, position_ids: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """(batch, length): for every token, the length of the sequence it belongs to, read as its segment's last position
    + 1: a segment's length where positions restart at 0, the full sequence's for a shared-prompt branch (whose
    positions continue its prompt's)."""
    cu = cu_seq_lens.to(position_ids.device).long()
    sizes = cu[1:] - cu[:-1]
    last = position_ids.reshape(-1).index_select(0, (cu[1:] - 1).clamp(min=0))
    return torch.repeat_interleave(last + 1, sizes).reshape(batch, length)


def packed_position_ids(cu_seq_lens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """(batch, length) positions restarting at 0 at every segment start."""
    sizes = (cu_seq_lens[1:] - cu_seq_lens[:-1]).long()
    starts = torch.repeat_interleave(cu_seq_lens[:-1].long(), sizes)
    return (torch.arange(batch * length, device=cu_seq_lens.device) - starts).reshape(batch, length)


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: (B, H, L, D) q/k/v -> ((B, L, H, D) output, no weights)."""
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    batch, heads, length, _ = query.shape
    if key.shape[2] != length:  # the offsets themselves are checked once per forward (`check_packed`), not per layer
        raise ValueError("packed rows need self-attention over the same tokens (no KV cache)")
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q, k, v = (x.transpose(1, 2).reshape(batch * length, heads, -1) for x in (query, key, value))
    out = varlen_attention(q, k, v, cu_q, kwargs.get("max_length_q"), scaling, dropout)
    if kwargs.get("branch_positions") is not None:  # shared-prompt pairs: the branch tokens also see their prompt
        out = branch_attention(out, q, k, v, {name: kwargs[name] for name in BRANCH_KEYS}, scaling, dropout)
    return out.reshape(batch, length, heads, -1), None


AttentionInterface.register(ATTN_NAME, packed_attention_forward)
AttentionMaskInterface.register(ATTN_NAME, packed_mask)
