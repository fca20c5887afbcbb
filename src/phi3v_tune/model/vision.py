"""Image features -> language-model token embeddings, in the published model's layout.

CLIP features of every real crop, 2x2 merge, the HD layout with learnable separators (`sub_GN` after every row,
`glb_GN` between the sub-image grid and the global view, order "sub_glb"), then the MLP projector.

Two things make this fast by construction:
* only real crops go through CLIP (`image_sizes` says how many each image has; zero-padding crops never run);
* only the encoder layers up to the feature layer run (published: 23 of 24) and `post_layernorm` never does; the
  unused weights stay in the module (so checkpoints keep every published key) but are frozen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import CLIPVisionModel

from ..processing.geometry import CROP_SIZE, crop_grid, num_crops_used
from .configuration import Phi3VConfig

ImageSizes = torch.Tensor | Sequence[Sequence[int]]  # (num_images, 2) of (height, width) after the HD transform


def size_list(image_sizes: ImageSizes) -> list[list[int]]:
    """(h, w) per image as Python ints (a GPU tensor is read back once; a list or CPU tensor costs nothing)."""
    if torch.is_tensor(image_sizes):
        return image_sizes.reshape(-1, 2).tolist()
    return [[int(h), int(w)] for h, w in image_sizes]


class CLIPVisionTower(nn.Module):
    """Holds the CLIP model under the attribute name the published checkpoint uses (`img_processor.vision_model`)."""

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        self.vision_model = CLIPVisionModel(config.vision_config)


def merge_2x2(features: torch.Tensor, grid: int) -> torch.Tensor:
    """(n, grid*grid, C) patch features -> (n, grid/2, grid/2, 4C), channel order (dy, dx) = 00, 01, 10, 11."""
    n, _, c = features.shape
    half = grid // 2
    x = features.reshape(n, half, 2, half, 2, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, half, half, 4 * c)


class Phi3VImageEmbedding(nn.Module):
    """The `model.vision_embed_tokens` module: CLIP tower, separators and projector."""

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        vcfg = config.vision_config
        self.img_processor = CLIPVisionTower(config)
        dim = vcfg.hidden_size * 4
        self.image_dim_out = vcfg.hidden_size
        self.num_layers_used = config.num_vision_layers_used
        self.patch_grid = vcfg.image_size // vcfg.patch_size
        if self.patch_grid % 2:
            raise ValueError(f"CLIP patch grid {self.patch_grid} must be even for the 2x2 merge")
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, dim))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.img_projection = nn.Sequential(
            nn.Linear(dim, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )
        self.freeze_unused()

    # ----------------------------------------------------------------------------------------------------------------
    def unused_parameters(self) -> list[nn.Parameter]:
        """CLIP weights after the feature layer: kept in checkpoints, never computed, never trained."""
        vm = self.img_processor.vision_model
        params = list(vm.post_layernorm.parameters())
        for layer in vm.encoder.layers[self.num_layers_used :]:
            params.extend(layer.parameters())
        return params

    def freeze_unused(self) -> None:
        for p in self.unused_parameters():
            p.requires_grad_(False)

    # ----------------------------------------------------------------------------------------------------------------
    def clip_features(self, crops: torch.Tensor) -> torch.Tensor:
        """(n, 3, 336, 336) -> (n, grid*grid, C): hidden states after the feature layer, CLS dropped."""
        vm = self.img_processor.vision_model
        hidden = vm.embeddings(crops.to(vm.embeddings.patch_embedding.weight.dtype))
        hidden = vm.pre_layrnorm(hidden)
        for layer in vm.encoder.layers[: self.num_layers_used]:
            out = layer(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden[:, 1:]

    @staticmethod
    def crops_per_image(image_sizes: ImageSizes) -> list[int]:
        """1 global view + (H/336)*(W/336) sub-crops per image; the rest of the N+1 slots are padding."""
        return [num_crops_used(h, w) for h, w in size_list(image_sizes)]

    def dummy_forward(self, device: torch.device) -> torch.Tensor:
        """The features of one black 336x336 image (global view + one sub-crop), for batches without images that
        must still run every vision weight (see `Phi3VModel.vision_on_this_step`)."""
        pixels = torch.zeros(1, 2, 3, CROP_SIZE, CROP_SIZE, device=device)
        sizes = torch.tensor([[CROP_SIZE, CROP_SIZE]])  # read on the host (crop counts): no GPU round trip
        return self(pixels, sizes)

    def forward(self, pixel_values: torch.Tensor, image_sizes: ImageSizes) -> torch.Tensor:
        """(num_images, N+1, 3, 336, 336), (num_images, 2) -> (sum of image tokens, hidden), images in order.

        `image_sizes` is only read on the host: a CPU tensor or a list of (h, w) spares a GPU read per call."""
        image_sizes = size_list(image_sizes)
        counts = self.crops_per_image(image_sizes)
        if pixel_values.dim() == 4:  # a single image without the image axis
            pixel_values = pixel_values[None]
        if any(c > pixel_values.shape[1] for c in counts):
            raise ValueError(
                f"image_sizes {image_sizes} need up to {max(counts)} crops but pixel_values has "
                f"{pixel_values.shape[1]} per image: process images and sizes with the same num_crops"
            )
        # Only real crops go through CLIP, all images in one batch.
        crops = torch.cat([pixel_values[i, :c] for i, c in enumerate(counts)], dim=0)
        feats = merge_2x2(self.clip_features(crops), self.patch_grid)  # (n_crops, s, s, 4C)
        s = feats.shape[1]
        dim = feats.shape[-1]
        sub_gn = self.sub_GN.to(feats.dtype).reshape(1, 1, dim)
        glb_gn = self.glb_GN.to(feats.dtype).reshape(1, dim)
        pieces = []
        start = 0
        for (h, w), c in zip(image_sizes, counts):
            gh, gw = crop_grid(h, w)
            glb, sub = feats[start], feats[start + 1 : start + c]
            start += c
            sub = sub.reshape(gh, gw, s, s, dim).permute(0, 2, 1, 3, 4).reshape(gh * s, gw * s, dim)
            sub = torch.cat([sub, sub_gn.expand(gh * s, 1, dim)], dim=1).reshape(-1, dim)
            glb = torch.cat([glb, sub_gn.expand(s, 1, dim)], dim=1).reshape(-1, dim)
            pieces.extend([sub, glb_gn, glb])
        tokens = torch.cat(pieces, dim=0)
        # the separators' dtype is the compute dtype (a quantized projector would report uint8 storage)
        return self.img_projection(tokens.to(self.glb_GN.dtype))
