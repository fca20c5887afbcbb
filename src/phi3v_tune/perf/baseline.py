"""The plain Hugging Face build the speed figures are compared with (our own script of it, run in the same process).

What an engineer gets by composing transformers' pieces directly: `Phi3ForCausalLM` + `CLIPVisionModel` (all 24
layers, features from `hidden_states[-2]`, every one of the 17 crop slots), a 2x2 merge, separators and the MLP
projector, bf16 weights, `sdpa`, the LM's own loss (full-vocab logits at every position), batch 1, a fused AdamW
step whose states are bf16 like the weights. LoRA r64 is PEFT on the LM linears; QLoRA = bitsandbytes nf4 LM
linears + the same LoRA. Activation checkpointing is transformers' non-reentrant one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPVisionModel, Phi3Config, Phi3ForCausalLM

from ..model.configuration import Phi3VConfig
from ..model.loss import IGNORE_INDEX
from ..processing.geometry import CROP_SIZE

LM_LINEARS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


class PlainPhi3V(nn.Module):
    def __init__(self, cfg: Phi3VConfig):
        super().__init__()
        keys = (
            "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads "
            "max_position_embeddings original_max_position_embeddings rms_norm_eps pad_token_id"
        ).split()
        lm_cfg = Phi3Config(
            **{k: getattr(cfg, k) for k in keys}, rope_parameters=dict(cfg.rope_parameters), tie_word_embeddings=False
        )
        lm_cfg._attn_implementation = "sdpa"
        cfg.vision_config._attn_implementation = "sdpa"
        self.clip = CLIPVisionModel(cfg.vision_config)
        dim = cfg.vision_config.hidden_size * 4
        self.glb = nn.Parameter(torch.zeros(1, dim))
        self.sub = nn.Parameter(torch.zeros(1, dim))
        self.proj = nn.Sequential(
            nn.Linear(dim, cfg.hidden_size), nn.GELU(), nn.Linear(cfg.hidden_size, cfg.hidden_size)
        )
        self.lm = Phi3ForCausalLM(lm_cfg)

    def image_tokens(self, pixel_values: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """(crops, 3, 336, 336) -> (n_tokens, hidden): CLIP on every crop slot, merge, separators, projector."""
        feats = self.clip(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        n, p, c = feats.shape
        g = int(p**0.5)
        feats = feats.reshape(n, g // 2, 2, g // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n * p // 4, 4 * c)
        seps = n_tokens - feats.shape[0]
        tokens = torch.cat([feats, self.sub.expand(max(seps - 1, 0), -1), self.glb], dim=0)[:n_tokens]
        return self.proj(tokens)

    def forward(self, pixel_values, input_ids, image_tokens: int, labels):
        img = self.image_tokens(pixel_values, image_tokens)
        txt = self.lm.get_input_embeddings()(input_ids[:, image_tokens:])
        embeds = torch.cat([img[None].to(txt.dtype), txt], dim=1)
        return self.lm(inputs_embeds=embeds, labels=labels).loss


def _quantize_lm_linears(lm: nn.Module) -> None:
    """Swap the decoder's linears for bitsandbytes nf4 ones (what `load_in_4bit` does), weights quantized on GPU."""
    import bitsandbytes as bnb

    for module in list(lm.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name in LM_LINEARS:
                q = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"
                )
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                setattr(module, child_name, q.cuda())


@dataclass
class PlainSetup:
    model: nn.Module
    optimizer: torch.optim.Optimizer


def build_plain(
    cfg: Phi3VConfig, method: str, checkpointing: bool, lora_rank: int = 64, device: str = "cuda"
) -> PlainSetup:
    """The plain model in bf16 on `device`, set up for `method`, with its fused AdamW."""
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = PlainPhi3V(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    if method == "qlora":
        _quantize_lm_linears(model.lm)
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        model.requires_grad_(False)
        model.lm = get_peft_model(
            model.lm, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=LM_LINEARS)
        )
    elif method == "freeze-vision":
        model.clip.requires_grad_(False)
    if checkpointing:
        kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
        model.lm.gradient_checkpointing_enable(**kwargs)
        if method == "full":
            model.clip.gradient_checkpointing_enable(**kwargs)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return PlainSetup(model, torch.optim.AdamW(params, lr=1e-5, fused=True))


def plain_step(
    setup: PlainSetup, crops: int, tokens: int, image_tokens: int, answer_tokens: int = 10, device: str = "cuda"
) -> torch.Tensor:
    """One training step on a random sample of this shape (inputs made on the device: no data loading). Returns the
    loss as a device tensor: reading it here would stall the host at every step, which a training loop need not."""
    vocab = setup.model.lm.get_input_embeddings().num_embeddings
    pixel_values = torch.randn(crops, 3, CROP_SIZE, CROP_SIZE, device=device, dtype=torch.bfloat16)
    input_ids = torch.randint(0, vocab, (1, tokens), device=device)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -answer_tokens:] = input_ids[:, -answer_tokens:]
    loss = setup.model(pixel_values, input_ids, image_tokens, labels)
    loss.backward()
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return loss.detach()
