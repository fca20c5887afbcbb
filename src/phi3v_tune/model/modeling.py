"""Phi-3.5-vision on transformers' native Phi-3 language model and CLIP vision tower (no remote code).

Module tree and parameter names mirror the published checkpoint:
`model.embed_tokens`, `model.layers.*` (transformers' `Phi3DecoderLayer`), `model.norm`,
`model.vision_embed_tokens.*` (CLIP + separators + projector), `lm_head`.

The su-RoPE short/long factor set, as the published model: ONE set per forward pass, from its total key length
(cache + padded input length): short while <= `original_max_position_embeddings`, long beyond. So in a padded batch
whose longest row passes 4096 tokens every row takes the long set. Our training and evaluation instead run with
`rope_per_sample(model)`: each sample takes the set of its own length, so a padded batch computes exactly what each of
its samples computes alone (what the recipe computes at batch size 1), whatever it is batched with. Positions come
from the attention mask either way (the same logits at real tokens: RoPE is relative). Packed rows (`cu_seq_lens_q`,
see `data.packing`) are always per sample: positions restart per sample, the factor set is chosen per sample from its
length, and attention stays inside each sample (`packed_attention`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import Phi3ForCausalLM, Phi3Model
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.phi3.modeling_phi3 import Phi3PreTrainedModel

from ..processing.geometry import num_image_tokens
from ..processing.hub import is_hub_id, resolve_model_source
from .configuration import Phi3VConfig
from .loss import DEFAULT_CHUNK, IGNORE_INDEX, chunked_lm_loss
from .packed_attention import ATTN_NAME, check_packed, packed_position_ids, packed_rows, sequence_lengths
from .preference import TokenLogpsOutput, chunked_token_logps
from .vision import ImageSizes, Phi3VImageEmbedding, size_list

# transformers renamed the cache argument (`past_key_values` -> `cache`) during 5.x; speak whichever this one uses.
CACHE_ARG = "cache" if "cache" in inspect.signature(Phi3ForCausalLM.forward).parameters else "past_key_values"


class Phi3VSuScaledRotaryEmbedding(nn.Module):
    """su / longrope RoPE with the factor set chosen from the total key length.

    transformers' `longrope` picks one set for the whole batch from `max(position_ids) + 1`; the published model picks
    it from the key length (cache + padded input). Both agree for a single unpadded sequence. The model sets
    `use_long` (one Python bool for the batch; with `per_sample` a bool per row, or per token for packed rows) right
    before the language model runs. `per_sample` (see `rope_per_sample`) makes a padded batch behave like its samples
    run one by one.
    """

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        self.config = config
        short, long, self.original_max, self.attention_scaling = self.compute(config)
        self.register_buffer("short_inv_freq", short, persistent=False)
        self.register_buffer("long_inv_freq", long, persistent=False)
        self.use_long: torch.Tensor | bool | None = None
        self.per_sample = False

    @staticmethod
    def compute(config: Phi3VConfig) -> tuple[torch.Tensor, torch.Tensor, int | None, float]:
        """(short inv_freq, long inv_freq, switch length or None, cos/sin scaling) from the config."""
        rope = config.rope_parameters
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
        base = float(rope["rope_theta"])
        exponent = torch.arange(0, dim, 2, dtype=torch.float32) / dim
        if rope.get("rope_type") == "longrope":
            short = torch.tensor(rope["short_factor"], dtype=torch.float32)
            long = torch.tensor(rope["long_factor"], dtype=torch.float32)
            original_max = int(config.original_max_position_embeddings)
            scale = config.max_position_embeddings / original_max
            scaling = math.sqrt(1 + math.log(scale) / math.log(original_max)) if scale > 1 else 1.0
        else:
            short = long = torch.ones(dim // 2)
            original_max, scaling = None, 1.0
        return 1.0 / (short * base**exponent), 1.0 / (long * base**exponent), original_max, scaling

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the (non-persistent) frequencies: loading creates them empty, they are not in checkpoints."""
        short, long, _, _ = self.compute(self.config)
        if self.short_inv_freq.is_meta:
            self.short_inv_freq = short
            self.long_inv_freq = long
        else:
            self.short_inv_freq.copy_(short)
            self.long_inv_freq.copy_(long)

    def _apply(self, fn, recurse: bool = True):
        """Device moves apply; dtype casts do not: a whole-model `.bfloat16()` (DeepSpeed's engine does one) would
        round the frequencies for good (cos at position 4095 off by up to 2), so they are rebuilt in fp32."""
        super()._apply(fn, recurse)
        if self.short_inv_freq.dtype != torch.float32 and not self.short_inv_freq.is_meta:
            short, long, _, _ = self.compute(self.config)
            self.short_inv_freq = short.to(self.short_inv_freq.device)
            self.long_inv_freq = long.to(self.long_inv_freq.device)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = position_ids.float()[..., None]  # (B, L, 1)
        use_long = self.use_long
        if use_long is None and self.original_max is not None:
            # the language model called on its own (`model.model(...)`), not through Phi3VForCausalLM, which sets the
            # flag: the key length is the last position + 1 (per row with `per_sample`: positions count real tokens)
            last = position_ids.amax(-1) if self.per_sample else position_ids.amax()
            use_long = last + 1 > self.original_max
        if isinstance(use_long, bool):  # one set for the whole batch, known on the host: no select on the GPU
            inv_freq = self.long_inv_freq if use_long and self.original_max is not None else self.short_inv_freq
            freqs = pos * inv_freq.float()
        else:
            freqs = pos * self.short_inv_freq.float()
        if self.original_max is not None and isinstance(use_long, torch.Tensor):
            use_long = use_long.to(device=pos.device)
            while use_long.dim() < pos.dim():
                use_long = use_long[..., None]
            freqs = torch.where(use_long, pos * self.long_inv_freq.float(), freqs)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def _rotaries(model: nn.Module) -> list[Phi3VSuScaledRotaryEmbedding]:
    """The model's su-RoPE modules, found inside PEFT, DDP, DeepSpeed or compile wrappers."""
    return [m for m in model.modules() if isinstance(m, Phi3VSuScaledRotaryEmbedding)]


@contextmanager
def rope_per_sample(model: nn.Module, on: bool = True) -> Iterator[None]:
    """Within the block, every sample of a padded batch takes the su-RoPE factor set of its own length (instead of the
    published one set per forward pass from the padded length): batching then never changes a sample's result."""
    rotaries = _rotaries(model)
    before = [r.per_sample for r in rotaries]
    set_rope_per_sample(model, on)
    try:
        yield
    finally:
        for r, b in zip(rotaries, before):
            r.per_sample = b


def set_rope_per_sample(model: nn.Module, on: bool = True) -> None:
    """`rope_per_sample` for the model's lifetime (training runs)."""
    for r in _rotaries(model):
        r.per_sample = on


def _mask_positions(mask: torch.Tensor, length: int) -> torch.Tensor:
    """Positions of the last `length` columns counted over each row's real tokens (a 2-D attention mask, with the
    cache's columns first): padding never shifts a sample's positions."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]


class Phi3VPreTrainedModel(Phi3PreTrainedModel):
    config_class = Phi3VConfig
    config: Phi3VConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]
    # Some re-saved checkpoints carry an alias of the word embeddings under the vision module: accept, never require.
    _keys_to_ignore_on_load_unexpected = [r"(^|\.)vision_embed_tokens\.wte\.weight$"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Phi3VImageEmbedding):
            nn.init.normal_(module.glb_GN, std=self.config.initializer_range)
            nn.init.normal_(module.sub_GN, std=self.config.initializer_range)
        elif isinstance(module, Phi3VSuScaledRotaryEmbedding):
            module.reset_buffers()

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether any layer recomputes its forward in backward. transformers 5 deprecates this name (with a warning
        at every read) in favour of `is_activation_checkpointing`, but PEFT still reads it when it wraps a model:
        answered here without the warning."""
        return any(getattr(m, "gradient_checkpointing", False) is True for m in self.modules())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loader, then re-freeze the stored-but-unused CLIP tail (loading replaces parameters) and
        rebuild the RoPE tables (non-persistent buffers are never trusted after loading), for the base model and the
        causal LM alike. A hub id is first resolved to its local snapshot (`revision`, `cache_dir`, `token`,
        `local_files_only` as transformers takes them), so weights, config and generation config come from one commit."""
        source = pretrained_model_name_or_path
        if isinstance(source, str) and is_hub_id(source):
            hub = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
            source = str(resolve_model_source(source, **hub))
        out = super().from_pretrained(source, *args, **kwargs)
        model = out[0] if isinstance(out, tuple) else out
        for module in model.modules():
            if isinstance(module, Phi3VImageEmbedding):
                module.freeze_unused()
            elif isinstance(module, Phi3VSuScaledRotaryEmbedding):
                module.reset_buffers()
        return out


def _starts(counts: list[int]) -> list[int]:
    """Offsets of consecutive groups of the given sizes."""
    return [sum(counts[:i]) for i in range(len(counts))]


def _pass_set(kwargs: dict[str, Any], **flags: Any) -> None:
    """Forward the published positional flags that were given (transformers' defaults apply to the others)."""
    kwargs.update({k: v for k, v in flags.items() if v is not None})


def _drop_wte_alias(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Some re-saved checkpoints (and the publisher's module's own `state_dict()`) carry `vision_embed_tokens.wte`, an
    alias of the word embeddings: accept it in a strict `load_state_dict` too, never require it."""
    state_dict.pop(prefix + "wte.weight", None)


def hook_token_embeddings(model: nn.Module) -> None:
    """`enable_input_require_grads` for Phi3V: the language model's token embeddings only.

    transformers (5.x) hooks the input embeddings of every pretrained submodule, here also the CLIP tower's patch
    embedding. Its output then requires grad, so autograd records all 23 CLIP layers and runs their backward (and,
    when they are checkpointed, their recompute) in every step of lora, qlora and freeze-vision with activation
    checkpointing, though no CLIP weight trains and nothing reads that gradient. Where CLIP weights do train (full,
    --lora-vision), autograd records CLIP from those weights on, without any hook. Checkpointing is non-reentrant
    throughout, so even the token-embedding hook is only kept for transformers' and PEFT's expectations.
    """

    def make_output_require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        output.requires_grad_(True)

    model.disable_input_require_grads()
    handle = model.get_input_embeddings().register_forward_hook(make_output_require_grad)
    model._require_grads_hooks = [handle]
    model._require_grads_hook = handle  # the single-hook name older transformers and PEFT read


def repeat_image_features(features: torch.Tensor, image_sizes: ImageSizes, image_index: list[int]) -> torch.Tensor:
    """Per-image blocks of `features` (the vision tower's output, images in order) laid out as `image_index` names
    them, repeats allowed: one gather, so the gradient of a repeated image sums its uses."""
    counts = [num_image_tokens(int(h), int(w)) for h, w in size_list(image_sizes)]
    if sum(counts) != features.shape[0]:
        raise ValueError(f"{len(counts)} images give {sum(counts)} tokens but the features hold {features.shape[0]}")
    if any(not 0 <= i < len(counts) for i in image_index):
        raise ValueError(f"image_index {image_index} names images outside 0..{len(counts) - 1}")
    starts = _starts(counts)
    rows = [r for i in image_index for r in range(starts[i], starts[i] + counts[i])]
    return features.index_select(0, torch.tensor(rows, dtype=torch.long).to(features.device, non_blocking=True))


class Phi3VModel(Phi3VPreTrainedModel, Phi3Model):
    """Phi-3 decoder stack plus `vision_embed_tokens`; image tokens replace the text embeddings at ids < 0."""

    config_class = Phi3VConfig

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.vision_embed_tokens = Phi3VImageEmbedding(config)
        self.rotary_emb = Phi3VSuScaledRotaryEmbedding(config)
        self.vision_embed_tokens.register_load_state_dict_pre_hook(_drop_wte_alias)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: ImageSizes | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        *,
        image_token_count: int | None = None,
        image_index: list[int] | None = None,
        **kwargs,
    ):
        """The published base model's call (same argument order): `input_ids` may hold image positions (ids `-k`)
        filled from `pixel_values`/`image_sizes` (`image_index`: see `embed`); returns the last hidden states (and the
        cache)."""
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_sizes, image_token_count, image_index)
        if past_key_values is not None:
            kwargs[CACHE_ARG] = past_key_values
        if (
            position_ids is None
            and self.rotary_emb.per_sample
            and attention_mask is not None
            and attention_mask.dim() == 2
        ):
            # per sample: positions count each row's real tokens, so the rotary picks each row's set by its length
            position_ids = _mask_positions(attention_mask, inputs_embeds.shape[1])
        _pass_set(
            kwargs,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )
        return super().forward(
            input_ids=None,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )

    def enable_input_require_grads(self) -> None:
        hook_token_embeddings(self)

    def vision_on_this_step(self, has_images: bool, device: torch.device) -> bool:
        """Whether this forward runs the vision tower: on its images, or, for a batch without any, on one dummy crop.

        Distributed engines expect every rank to take part in the same collectives and gradient reductions. Under DDP
        with `find_unused_parameters=False`, a rank whose batch has no image would leave the vision weights without
        gradients (error at the next step); under ZeRO-3 / FSDP each layer's forward gathers its shards from every
        rank, so a rank skipping CLIP while another runs it hangs - frozen weights included, and in evaluation too
        (generation with `synced_gpus`). So: always while training under torch.distributed; in evaluation with
        sharded vision weights, whenever any rank has images (one small all-reduce decides: the decode steps of
        generation, where no rank has any, skip the tower everywhere); otherwise only for images.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return has_images
        if self.training:
            return True
        if not self.vision_sharded():
            return has_images
        flag = torch.tensor([int(has_images)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def vision_sharded(self) -> bool:
        """The vision weights are sharded over ranks: ZeRO-3 partitioned parameters carry `ds_id`; FSDP2 shards the
        CLIP layers (inside the root's forward the tower's own weights are already gathered into plain Parameters,
        so the mark is a sharded layer, not a DTensor weight)."""
        first = next(self.vision_embed_tokens.parameters(), None)
        if first is None:
            return False
        if hasattr(first, "ds_id"):
            return True
        layers = self.vision_embed_tokens.img_processor.vision_model.encoder.layers
        return isinstance(first, DTensor) or any(isinstance(m, FSDPModule) for m in (self.vision_embed_tokens, *layers))

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_sizes: ImageSizes | None,
        image_token_count: int | None = None,
        image_index: list[int] | None = None,
    ) -> torch.Tensor:
        """Text embeddings with image features scattered into the `-k` positions, in order of appearance.

        `image_token_count` (the number of ids < 0, counted by the collator on the host) spares two reads of a GPU
        value per step, each of which would stall the host until the GPU catches up.

        `image_index` (host list): which image of `pixel_values` fills each image block, in order of appearance across
        the batch. The vision tower runs once per image of `pixel_values`, and an image named twice feeds its features
        to both blocks (preference pairs: one image set, two answers; see `model.preference`). Default: every image
        once, in order.
        """
        image_mask = input_ids < 0
        embeds = self.embed_tokens(input_ids.clamp(min=0))
        known = image_token_count is not None and pixel_values is not None
        has_images = image_token_count > 0 if known else bool(image_mask.any())
        run_vision = self.vision_on_this_step(has_images, input_ids.device)
        if not has_images:
            if run_vision:
                # zero-valued, but in the graph: every vision weight takes part in forward and backward
                dummy = self.vision_embed_tokens.dummy_forward(input_ids.device).float().sum()  # fp32: no fp16 inf
                return embeds + (0.0 * dummy).to(embeds.dtype)
            return embeds
        if pixel_values is None or image_sizes is None:
            raise ValueError("input_ids hold image positions (ids < 0) but no pixel_values/image_sizes were given")
        features = self.vision_embed_tokens(pixel_values, image_sizes).to(embeds.dtype)
        if image_index is not None:
            features = repeat_image_features(features, image_sizes, image_index)
        n_positions = int(image_token_count) if known else int(image_mask.sum())
        if features.shape[0] != n_positions:
            raise ValueError(
                f"input_ids hold {n_positions} image positions but the {len(size_list(image_sizes))} images give "
                f"{features.shape[0]} tokens: the prompt and images do not belong together (same num_crops?)"
            )
        embeds = embeds.masked_scatter(image_mask[..., None], features)
        if self.config.embd_pdrop and self.training:  # the published image embedding's dropout (0.0 as published)
            embeds = nn.functional.dropout(embeds, p=self.config.embd_pdrop, training=True)
        return embeds


class Phi3VForCausalLM(Phi3VPreTrainedModel, Phi3ForCausalLM):
    """Phi-3.5-vision for causal LM: `forward(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds,
    pixel_values, image_sizes, labels, use_cache)`, the published model's argument order."""

    _tied_weights_keys = {}
    loss_chunk_size: int = DEFAULT_CHUNK  # labelled positions per lm_head + cross-entropy chunk (model/loss.py)

    def __init__(self, config: Phi3VConfig):
        Phi3PreTrainedModel.__init__(self, config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def enable_input_require_grads(self) -> None:
        hook_token_embeddings(self)

    # ----------------------------------------------------------------------------------------------------------------
    def unused_parameters(self) -> list[nn.Parameter]:
        """Stored in the checkpoint but never part of the computation (CLIP layers after the feature layer)."""
        return self.model.vision_embed_tokens.unused_parameters()

    def freeze_unused(self) -> None:
        self.model.vision_embed_tokens.freeze_unused()

    # ----------------------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: ImageSizes | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        *,
        logits_to_keep: int | torch.Tensor = 0,
        cache=None,
        rope_use_long: torch.Tensor | None = None,
        image_token_count: int | None = None,
        return_logits: bool | None = None,
        image_index: list[int] | None = None,
        return_token_logps: bool = False,
        **kwargs,
    ):
        """Padded rows (`attention_mask`; rows of equal length need none) or packed rows (`cu_seq_lens_q`/`_k`,
        `max_length_q`/`_k`, `position_ids` restarting per sample, optional `rope_use_long` per-token su-RoPE flags;
        see `data.packing`). `image_token_count`: optional host-side count of the ids < 0; `image_index`: which image
        fills each image block (see `Phi3VModel.embed`).
        Logits are float32, as the published model returns them. With `labels` the loss path runs (chunked, building
        no KV cache unless `use_cache=True` is asked for); it returns the logits too unless `return_logits=False`
        (default: in eval mode only; training never reads them, and a document's full-vocabulary logits are sequence
        length x 32064 floats). With `labels` and `return_token_logps=True` it returns, instead of the loss, each
        labelled position's log-probability (`TokenLogpsOutput`, see `model.preference`)."""
        _pass_set(
            kwargs,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=return_dict,
        )
        past = cache if cache is not None else past_key_values
        if labels is not None and use_cache is None:
            use_cache = False  # training / evaluation loss: a cache would only cost time (and recompile --compile)
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (or inputs_embeds)")
            inputs_embeds = self.model.embed(input_ids, pixel_values, image_sizes, image_token_count, image_index)
        batch, length = inputs_embeds.shape[:2]
        past_len = past.get_seq_length() if past is not None else 0
        rotary = self.model.rotary_emb
        mask2d = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if mask2d is not None:
            if position_ids is None:
                position_ids = _mask_positions(mask2d, length)
        # the published rule: one factor set from the total key length (a host-side choice); per sample on request
        key_lengths = mask2d.sum(-1) if mask2d is not None and rotary.per_sample else past_len + length
        cu_seq_lens = kwargs.get("cu_seq_lens_q")
        packed = cu_seq_lens is not None
        if kwargs.get("branch_positions") is not None:  # shared-prompt pairs (model/packed_attention.py)
            if not packed or self.config._attn_implementation != ATTN_NAME:
                raise ValueError(
                    f"shared-prompt branches need packed rows (cu_seq_lens_q) and the {ATTN_NAME!r} attention, "
                    f"not {self.config._attn_implementation!r}"
                )
        if packed:  # several samples per row: positions restart and the factor set is chosen per sample
            if attention_mask is not None or past is not None:
                raise ValueError("packed rows (cu_seq_lens_q) take no attention_mask and no cache")
            check_packed(cu_seq_lens, kwargs.get("cu_seq_lens_k"), batch, length)
            if position_ids is None:
                position_ids = packed_position_ids(cu_seq_lens.to(inputs_embeds.device), batch, length)
            if rotary.original_max is not None:
                if rope_use_long is None:  # a sample's length: its last position + 1 (a branch continues its prompt)
                    rope_use_long = sequence_lengths(cu_seq_lens, position_ids, batch, length) > rotary.original_max
                rotary.use_long = rope_use_long.reshape(batch, length)
            use_cache = False
        elif rotary.original_max is not None:
            rotary.use_long = key_lengths > rotary.original_max
        skip_mask = packed_rows() if packed and self.config._attn_implementation == ATTN_NAME else nullcontext()
        try:
            lm_kwargs = {CACHE_ARG: past} if past is not None else {}
            with skip_mask:
                if labels is not None and return_token_logps:  # preference tuning: per-token log-probabilities
                    return self.token_logps_forward(
                        labels,
                        attention_mask=attention_mask,
                        position_ids=position_ids,
                        inputs_embeds=inputs_embeds,
                        use_cache=use_cache,
                        **lm_kwargs,
                        **kwargs,
                    )
                if labels is not None:  # training / eval loss: no full-vocabulary logits (model/loss.py)
                    return self.loss_forward(
                        labels,
                        logits_to_keep,
                        return_logits=not self.training if return_logits is None else return_logits,
                        attention_mask=attention_mask,
                        position_ids=position_ids,
                        inputs_embeds=inputs_embeds,
                        use_cache=use_cache,
                        **lm_kwargs,
                        **kwargs,
                    )
                out = super().forward(
                    input_ids=None,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    inputs_embeds=inputs_embeds,
                    labels=labels,
                    use_cache=use_cache,
                    logits_to_keep=logits_to_keep,
                    **lm_kwargs,
                    **kwargs,
                )
                if isinstance(out, tuple):  # return_dict=False: logits first (no labels here)
                    return (out[0].float(), *out[1:])
                if out.logits is not None:
                    out.logits = out.logits.float()
                return out
        finally:
            rotary.use_long = None

    def loss_forward(
        self, labels: torch.Tensor, logits_to_keep: int | torch.Tensor = 0, return_logits: bool = False, **kwargs
    ) -> CausalLMOutputWithPast:
        """Base model, then the chunked loss on labelled positions only; `logits` (float32, every kept position) only
        with `return_logits` (training never reads them).

        Loss arguments (`num_items_in_batch`, `shift_labels`, `ignore_index`) are taken out of `kwargs`; everything else
        (attention and packing arguments included) goes to the base model untouched.
        """
        loss_args = {k: kwargs.pop(k) for k in ("num_items_in_batch", "shift_labels", "ignore_index") if k in kwargs}
        return_dict = kwargs.pop("return_dict", None)
        outputs = self.model(input_ids=None, **kwargs)
        loss = chunked_lm_loss(
            outputs.last_hidden_state,
            self.lm_head,
            labels,
            logits_to_keep=logits_to_keep,
            chunk_size=self.loss_chunk_size,
            **loss_args,
        )
        logits = None
        if return_logits:
            hidden = outputs.last_hidden_state
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep, :]).float()
        result = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_ARG: getattr(outputs, CACHE_ARG, None)},
        )
        return result.to_tuple() if return_dict is False else result

    def token_logps_forward(self, labels: torch.Tensor, **kwargs) -> TokenLogpsOutput:
        """Base model, then each labelled position's log-probability of its (shifted) label, chunked like the loss
        (`model.preference.chunked_token_logps`); `ignore_index` is taken out of `kwargs`, the rest goes to the base
        model untouched."""
        ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
        if kwargs.pop("shift_labels", None) is not None:
            raise ValueError("return_token_logps takes labels (shifted inside), not shift_labels")
        for name in ("num_items_in_batch", "return_dict"):  # no normaliser, no tuple: per-token values as they are
            kwargs.pop(name, None)
        outputs = self.model(input_ids=None, **kwargs)
        logps = chunked_token_logps(
            outputs.last_hidden_state, self.lm_head, labels, chunk_size=self.loss_chunk_size, ignore_index=ignore_index
        )
        return TokenLogpsOutput(token_logps=logps, hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    # ----------------------------------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(
        self, input_ids, *args, pixel_values=None, image_sizes=None, inputs_embeds=None, **kwargs
    ):
        """Vision inputs only go in while the cache is empty; re-run everything when the length passes 4096 tokens.

        The published model computes every position with the long factors once the (padded) length exceeds
        `original_max_position_embeddings`, so the cached (short-factor) keys are dropped at that step; with
        `rope_per_sample`, whenever one more sample's own length passes it. `inputs_embeds` (the prompt's, images
        already in them) are used at the first step, and again, followed by the generated tokens' embeddings, when
        the cache is dropped.
        """
        past = kwargs.get(CACHE_ARG)
        mask = kwargs.get("attention_mask")
        limit = self.model.rotary_emb.original_max
        past_len = past.get_seq_length() if past is not None else 0
        # generate() keeps only the tokens it produced in `input_ids` when it starts from embeddings
        from_embeds = inputs_embeds is not None and past_len > 0 and input_ids.shape[1] <= past_len
        dropped = False
        if past_len > 0 and limit is not None:
            if mask is not None and self.model.rotary_emb.per_sample:  # a sample's own length crosses the limit
                before, now = mask[:, :past_len].sum(-1), mask.sum(-1)
            else:  # the published rule: the padded length crosses it
                total = input_ids.shape[1] + (inputs_embeds.shape[1] if from_embeds else 0)
                before, now = torch.tensor([past_len]), torch.tensor([total])
            if bool(((now > limit) & (before <= limit)).any()):
                kwargs[CACHE_ARG] = None
                dropped = True
                if "next_sequence_length" in kwargs:
                    kwargs["next_sequence_length"] = None
        inputs = super().prepare_inputs_for_generation(input_ids, *args, inputs_embeds=inputs_embeds, **kwargs)
        if dropped and from_embeds:
            new = self.get_input_embeddings()(input_ids).to(inputs_embeds.dtype)
            inputs["inputs_embeds"] = full = torch.cat([inputs_embeds, new], dim=1)
            inputs["input_ids"] = inputs["position_ids"] = None  # positions: from the mask, else 0..n-1
            if inputs.get("cache_position") is not None:  # older transformers
                inputs["cache_position"] = torch.arange(full.shape[1], device=full.device)
        cache_now = inputs.get(CACHE_ARG)
        if cache_now is None or cache_now.get_seq_length() == 0:
            inputs["pixel_values"] = pixel_values
            inputs["image_sizes"] = image_sizes
        return inputs

    def _expand_inputs_for_generation(
        self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None, **kw
    ):
        """Beam search / `num_return_sequences`: every row is repeated `expand_size` times, so its images must be too,
        as a group (`[a, b, a, b]` for a row with images a and b): images fill the image positions in order of
        appearance across the batch, while transformers repeats each image on its own (`[a, a, b, b]`)."""
        pixel_values, image_sizes = kw.pop("pixel_values", None), kw.pop("image_sizes", None)
        count = kw.pop("image_token_count", None)
        if expand_size != 1 and pixel_values is not None and input_ids is not None:
            per_row = [int(torch.unique(row[row < 0]).numel()) for row in input_ids]
            if sum(per_row) != pixel_values.shape[0]:
                raise ValueError(f"input_ids hold {sum(per_row)} image(s) but pixel_values has {pixel_values.shape[0]}")
            order = torch.cat(
                [torch.arange(start, start + n).repeat(expand_size) for start, n in zip(_starts(per_row), per_row)]
            ).to(pixel_values.device)
            pixel_values = pixel_values[order]
            image_sizes = image_sizes[order.to(image_sizes.device)] if image_sizes is not None else None
        input_ids, kw = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **kw)
        kw["pixel_values"], kw["image_sizes"] = pixel_values, image_sizes
        if count is not None:
            kw["image_token_count"] = count * expand_size
        return input_ids, kw
