"""`Phi3VConfig`: the published `phi3_v` config.json, read and written unchanged.

The language-model fields are transformers' `Phi3Config` fields (so the native `Phi3Model` can be built from it);
the vision fields (`img_processor`, `embd_layer`) are kept as the published dicts, and the CLIP tower's sizes live in
`vision_config` (a `CLIPVisionConfig`; default: CLIP ViT-L/14 at 336 px as published, so the published config, which
has no `vision_config`, builds the real tower).
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import CLIPVisionConfig, Phi3Config

from ..processing.geometry import CROP_SIZE, TOKENS_PER_CROP

#: CLIP ViT-L/14-336, the tower of the published checkpoint (`img_processor.model_name`).
CLIP_VIT_L_336: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": CROP_SIZE,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

DEFAULT_IMG_PROCESSOR: dict[str, Any] = {
    "image_dim_out": 1024,
    "model_name": "openai/clip-vit-large-patch14-336",
    "name": "clip_vision_model",
    "num_img_tokens": TOKENS_PER_CROP,
}

DEFAULT_EMBD_LAYER: dict[str, Any] = {
    "embedding_cls": "image",
    "hd_transform_order": "sub_glb",
    "projection_cls": "mlp",
    "use_hd_transform": True,
    "with_learnable_separator": True,
}


@strict
class Phi3VConfig(Phi3Config):
    """Configuration of Phi-3-vision / Phi-3.5-vision (`model_type: phi3_v`).

    Reads the publisher's `config.json` as it is (`rope_scaling: {type: "su", ...}`, `img_processor`, `embd_layer`)
    and writes it back in the same form, so a checkpoint saved here still loads in the publisher's code and vLLM.
    """

    model_type = "phi3_v"
    sub_configs = {"vision_config": CLIPVisionConfig}

    img_processor: dict | None = None
    embd_layer: dict | None = None
    vision_config: dict | CLIPVisionConfig | None = None

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Phi3VConfig:
        """`torch_dtype` (the published file's name, which saved folders keep for the publisher's code) read as
        `dtype`: transformers 5 warns on every load that sets the old name."""
        config_dict = dict(config_dict)
        legacy = config_dict.pop("torch_dtype", None)
        if legacy is not None:
            config_dict.setdefault("dtype", legacy)
        return super().from_dict(config_dict, **kwargs)

    def __post_init__(self, **kwargs):
        self.img_processor = {**DEFAULT_IMG_PROCESSOR, **(self.img_processor or {})}
        self.embd_layer = {**DEFAULT_EMBD_LAYER, **(self.embd_layer or {})}
        if self.vision_config is None:
            self.vision_config = CLIPVisionConfig(**CLIP_VIT_L_336)
        elif isinstance(self.vision_config, dict):
            self.vision_config = CLIPVisionConfig(**{**CLIP_VIT_L_336, **self.vision_config})
        super().__post_init__(**kwargs)

    def convert_rope_params_to_dict(self, default_theta: int | float = 10_000.0, ignore_keys=None, **kwargs):
        """Accept the published `rope_scaling: {type: "su"}` (transformers calls it `longrope`)."""
        kwargs = super().convert_rope_params_to_dict(default_theta=default_theta, ignore_keys=ignore_keys, **kwargs)
        if self.rope_parameters.get("rope_type") == "longrope":
            self.rope_parameters["original_max_position_embeddings"] = self.original_max_position_embeddings
            self.rope_parameters.setdefault(
                "factor", self.max_position_embeddings / self.original_max_position_embeddings
            )
        return kwargs

    # ----------------------------------------------------------------------------------------------------------------
    @property
    def feature_layer(self) -> int:
        """Index into CLIP's hidden states whose features feed the projector (published: -2)."""
        return int(self.img_processor.get("layer_idx", -2))

    @property
    def num_vision_layers_used(self) -> int:
        """How many CLIP encoder layers must run to produce the feature layer (23 of 24 as published)."""
        n = self.vision_config.num_hidden_layers
        idx = self.feature_layer
        used = n + 1 + idx if idx < 0 else idx
        if not 0 <= used <= n:
            raise ValueError(f"img_processor.layer_idx={idx} is out of range for a {n}-layer vision tower")
        return used

    @property
    def long_rope(self) -> bool:
        return self.rope_parameters.get("rope_type") == "longrope"

    @property
    def rope_switch_length(self) -> int | None:
        """The length past which su-RoPE takes its long factors (None without longrope)."""
        return self.original_max_position_embeddings if self.long_rope else None

    def to_dict(self) -> dict[str, Any]:
        """Write the publisher's field names (`rope_scaling` type `su`, `rope_theta`) instead of `rope_parameters`."""
        out = super().to_dict()
        rope = dict(out.pop("rope_parameters", None) or self.rope_parameters or {})
        out["rope_theta"] = rope.get("rope_theta", 10_000.0)
        if rope.get("rope_type") == "longrope":
            out["rope_scaling"] = {
                "long_factor": list(rope["long_factor"]),
                "short_factor": list(rope["short_factor"]),
                "type": "su",
            }
        else:
            out["rope_scaling"] = None
        if _same_tower(out.get("vision_config"), _DEFAULT_TOWER):
            del out["vision_config"]  # the published tower: left implicit, as the published config.json does
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """What config.json holds (save_pretrained writes the diff): also `torch_dtype`, the name the publisher's
        code (transformers 4.x) reads. Added here, after the diff, not in `to_dict`: the diff reads every key back as
        an attribute, and reading `torch_dtype` makes transformers 5 warn on every load."""
        out = super().to_diff_dict()
        if out.get("dtype") is not None:
            out["torch_dtype"] = out["dtype"]
        return out


#: Keys of a tower's config that say nothing about its shape.
_TOWER_BOOKKEEPING = {"dtype", "torch_dtype", "_name_or_path", "transformers_version", "id2label", "label2id"}
_DEFAULT_TOWER = CLIPVisionConfig(**CLIP_VIT_L_336).to_dict()


def _same_tower(a: Any, b: dict[str, Any]) -> bool:
    if not isinstance(a, dict):
        return False
    keys = (set(a) | set(b)) - _TOWER_BOOKKEEPING
    return all(a.get(k) == b.get(k) for k in keys)
