"""Image geometry of Phi-3(.5)-vision: crop size, crop counts, the HD resize arithmetic, token counts, image tags,
the EXIF orientations that swap an image's sides and the default pixel limit.

The one home of these facts: the pixel path (``processing.image``), the model (``model.vision``), data planning and
the command line all read them from here. Pure Python on purpose (no torch, numpy or Pillow), so that code which only
needs a number, such as ``--help`` or length planning from image headers, imports nothing heavy.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

__all__ = [
    "CROP_SIZE",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "EXIF_ORIENTATION_TAG",
    "IMAGE_TAG",
    "MAX_NUM_CROPS",
    "MIN_NUM_CROPS",
    "SIDE_SWAPPING_ORIENTATIONS",
    "TOKENS_PER_CROP",
    "TOKENS_PER_ROW",
    "TRAIN_NUM_CROPS",
    "check_num_crops",
    "check_size",
    "crop_grid",
    "hd_size",
    "image_tag",
    "landscape_geometry",
    "num_crops_used",
    "num_image_tokens",
    "oriented_size",
]

CROP_SIZE = 336  # CLIP ViT-L/14 input resolution: every crop, and every side of a padded image, is a multiple of it
TOKENS_PER_CROP = 144  # 24x24 patches merged 2x2 -> 12x12
TOKENS_PER_ROW = 12  # sqrt(TOKENS_PER_CROP): one separator token per row of 12
MIN_NUM_CROPS = 1
#: The most crops the model was trained with; the published processor's default, and the most training accepts.
MAX_NUM_CROPS = 16
#: Crop counts training accepts (flags and config), 1..16.
TRAIN_NUM_CROPS = range(MIN_NUM_CROPS, MAX_NUM_CROPS + 1)
#: Images with more pixels than this are refused as possible decompression bombs unless the limit is raised
#: (Pillow's historical error threshold, 2 * 89478485).
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970

#: ``<|image_k|>``: the tag that places image k (numbered from 1) in a prompt; group 1 is k.
IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")

#: The EXIF tag that says how a photo is to be rotated for viewing (``PIL.ExifTags.Base.Orientation``).
EXIF_ORIENTATION_TAG = 0x0112
#: Orientation values whose correction transposes the image (5: transpose, 6: rotate 270, 7: transverse,
#: 8: rotate 90, as ``PIL.ImageOps.exif_transpose`` applies them): width and height swap. 1-4 keep the size.
SIDE_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


def image_tag(k: int) -> str:
    """The tag of image ``k``: ``<|image_k|>``."""
    return f"<|image_{k}|>"


def oriented_size(width: int, height: int, orientation: Any) -> tuple[int, int]:
    """(width, height) of an image once its EXIF ``orientation`` value is applied (any unknown value: unchanged)."""
    return (height, width) if orientation in SIDE_SWAPPING_ORIENTATIONS else (width, height)


def check_num_crops(num_crops: Any) -> int:
    """An integer >= 1. The model was trained with at most 16 crops (the recipe refuses more); like the published
    processor, larger values are accepted here (longer sequences, untested by the publisher); training refuses them."""
    if isinstance(num_crops, bool) or not isinstance(num_crops, numbers.Integral):
        raise ValueError(
            f"num_crops must be an integer >= {MIN_NUM_CROPS} (the model was trained with "
            f"{MIN_NUM_CROPS}..{MAX_NUM_CROPS}), got {num_crops!r}"
        )
    if int(num_crops) < MIN_NUM_CROPS:
        raise ValueError(
            f"num_crops must be >= {MIN_NUM_CROPS} (the model was trained with {MIN_NUM_CROPS}..{MAX_NUM_CROPS}), "
            f"got {num_crops}"
        )
    return int(num_crops)


def check_size(width: Any, height: Any) -> tuple[int, int]:
    """(width, height) as ints, or a ``ValueError`` when either is not a positive integer."""
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(f"image {name} must be a positive integer, got {value!r}")
    return int(width), int(height)


def landscape_geometry(width: int, height: int, num_crops: int) -> tuple[int, int, int, int]:
    """HD-transform geometry of a landscape (width >= height) image.

    Returns (new_w, new_h, padded_h, top): the bilinear resize target, the padded height (a multiple of 336) and the
    number of white rows added at the top. The float expressions mirror the published code on purpose, so that
    rounding at the edges (e.g. ``s / ratio`` landing just above an integer) gives the same scale.
    """
    ratio = width / height
    scale = 1
    while (scale + 1) * math.ceil((scale + 1) / ratio) <= num_crops:
        scale += 1
    new_w = int(scale * CROP_SIZE)
    # The published code crashes when an extreme aspect ratio rounds the height to 0; keep one row instead.
    new_h = max(1, int(new_w / ratio))
    padded_h = int(math.ceil(new_h / CROP_SIZE) * CROP_SIZE)
    top = int((padded_h - new_h) / 2)
    return new_w, new_h, padded_h, top


def hd_size(width: int, height: int, num_crops: int = MAX_NUM_CROPS) -> tuple[int, int]:
    """Predict the padded (height, width) of an image of ``width`` x ``height`` without touching pixels.

    Lets data pipelines compute token counts (for length bucketing, packing, truncation) from image headers alone.
    """
    width, height = check_size(width, height)
    num_crops = check_num_crops(num_crops)
    if width < height:
        new_w, _, padded_h, _ = landscape_geometry(height, width, num_crops)
        return new_w, padded_h
    new_w, _, padded_h, _ = landscape_geometry(width, height, num_crops)
    return padded_h, new_w


def crop_grid(padded_h: int, padded_w: int) -> tuple[int, int]:
    """(rows, columns) of 336x336 sub-images of a padded image; an image uses 1 + rows * columns crops (the global
    view first). No checks: this runs per image in the model's forward pass, on sizes the processor produced."""
    return int(padded_h) // CROP_SIZE, int(padded_w) // CROP_SIZE


def num_crops_used(padded_h: int, padded_w: int) -> int:
    """Crops a padded image fills: its global view and its rows x columns sub-images (the rest of the
    ``num_crops + 1`` slots is zero padding that never runs through CLIP)."""
    rows, columns = crop_grid(padded_h, padded_w)
    return 1 + rows * columns


def num_image_tokens(padded_h: int, padded_w: int) -> int:
    """Number of ``<image>`` placeholder tokens the model consumes for one padded image of ``padded_h`` x ``padded_w``.

    (h*w + 1) * 144 crop tokens (sub-images + global view), one ``glb_GN`` separator, and one ``sub_GN`` per row of 12
    tokens: h*12 rows of the sub-image grid plus 12 rows of the global view, i.e. (h + 1) * 12.
    """
    if padded_h <= 0 or padded_w <= 0 or padded_h % CROP_SIZE or padded_w % CROP_SIZE:
        raise ValueError(f"padded size must be positive multiples of {CROP_SIZE}, got {padded_h}x{padded_w}")
    h, w = crop_grid(padded_h, padded_w)
    return (h * w + 1) * TOKENS_PER_CROP + 1 + (h + 1) * TOKENS_PER_ROW
