"""Phi-3.5-vision image processing: image loading, HD transform, normalisation and cropping.

The numbers produced here must match the published Phi-3.5-vision processor bit for bit (resize filter, white
padding, CLIP normalisation, bicubic global view, row-major crops), because the model was trained on exactly this
geometry: a different resize filter, padding colour or crop order would silently shift every image feature the model
sees. The arithmetic (crop size, resize targets, token counts) lives in ``geometry``. Loading (``load_image``) is
stricter than the published code: it fails early, with the file named, on inputs that would otherwise crash a training
run hours later.
"""

from __future__ import annotations

import io
import json
import numbers
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .geometry import (
    CROP_SIZE,
    DEFAULT_MAX_IMAGE_PIXELS,
    EXIF_ORIENTATION_TAG,
    MAX_NUM_CROPS,
    TOKENS_PER_CROP,
    check_num_crops,
    check_size,
    crop_grid,
    hd_size,
    landscape_geometry,
    num_image_tokens,
    oriented_size,
)

# CROP_SIZE, DEFAULT_MAX_IMAGE_PIXELS, MAX_NUM_CROPS, hd_size and num_image_tokens are defined in `geometry` and
# remain importable from here, where the published processor's users look for them.
from .hub import is_hub_id, resolve_model_source

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CROP_SIZE",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "MAX_NUM_CROPS",
    "PREPROCESSOR_CONFIG_NAME",
    "Phi3VImageProcessor",
    "hd_size",
    "hd_transform",
    "header_size",
    "load_image",
    "num_image_tokens",
]

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
#: The `auto_map` a processor made from scratch writes (Phi-3-vision-128k's file set; Phi-3.5-vision keeps both classes
#: in processing_phi3_v.py). One loaded from a folder writes back that folder's `auto_map`, whatever it says.
PUBLISHED_AUTO_MAP = {
    "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
    "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor",
}
PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"

ImageInput = Image.Image | np.ndarray | str | os.PathLike | bytes | bytearray | memoryview

_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
#: Keys of the published preprocessor_config.json (and its processor's arguments) that change nothing here.
_PUBLISHED_CONFIG_KEYS = {
    "auto_map",
    "do_convert_rgb",
    "image_processor_type",
    "processor_class",
    "feature_extractor_type",
}


def hd_transform(image: Image.Image, num_crops: int = MAX_NUM_CROPS) -> Image.Image:
    """Resize an RGB PIL image (bilinear) and pad its height with white to multiples of 336, as the published code does.

    Portrait images are transposed first and back at the end (not merely resized with swapped sizes) because Pillow's
    separable resampler rounds between its horizontal and vertical passes; only the same pass order gives equal bytes.
    """
    num_crops = check_num_crops(num_crops)
    width, height = check_size(*image.size)
    transposed = width < height
    if transposed:
        image = image.transpose(Image.Transpose.TRANSPOSE)
        width, height = height, width
    new_w, new_h, padded_h, top = landscape_geometry(width, height, num_crops)
    # torchvision's resize on a PIL image is exactly PIL's resize with this filter (no reducing_gap), including the
    # no-op when the size already matches.
    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    if padded_h != new_h:
        padded = Image.new(resized.mode, (new_w, padded_h), (255, 255, 255))
        padded.paste(resized, (0, top))
    else:
        padded = resized
    if transposed:
        padded = padded.transpose(Image.Transpose.TRANSPOSE)
    return padded


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """Map 16/32-bit and float greyscale to 8 bits by value range.

    Pillow's own conversion clips these to 255, which turns a typical 16-bit scan into a white page. I;16 modes are
    scaled by 1/257; mode I is treated as 16-bit when it exceeds 255; mode F as [0, 1] when it stays within it.
    """
    raw = np.asarray(img)
    arr = raw.astype(np.float64)
    if img.mode.startswith("I;16"):
        arr = arr / 257.0
    elif img.mode == "I":
        if arr.size and arr.max() > 255:
            arr = arr / 257.0
    elif arr.size and np.nanmax(np.abs(arr)) <= 1.0:  # mode F
        arr = arr * 255.0
    arr = np.nan_to_num(arr, nan=0.0)
    transparent = img.info.get("transparency")
    if isinstance(transparent, numbers.Number):  # tRNS grey value: those pixels are transparent -> white background
        arr[raw == transparent] = 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any mode to RGB as transformers' ``convert_to_rgb`` (which the published processor calls) does: an alpha
    band ("A"; not the premultiplied "a" of RGBa/La) or a transparency key is composited onto white, everything else
    is Pillow's conversion. One difference on purpose: 16/32-bit and float greyscale are scaled, not clipped."""
    if img.mode in _HIGH_DEPTH_MODES:
        img = _high_depth_to_l(img)
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


def _describe(image: Any, source: str) -> str:
    if isinstance(image, (str, os.PathLike)):
        return f"{source} '{os.fspath(image)}'"
    return source


def allow_pixels(max_image_pixels: int | None) -> None:
    """Let Pillow open images up to ``max_image_pixels`` (our check then refuses larger ones first): Pillow refuses
    anything above twice its own ``Image.MAX_IMAGE_PIXELS`` when opening, which a larger limit asked for here would
    otherwise never reach. Raises Pillow's process-wide limit, never lowers it."""
    current = Image.MAX_IMAGE_PIXELS
    if max_image_pixels is not None and current is not None and max_image_pixels > current:
        Image.MAX_IMAGE_PIXELS = max_image_pixels


def load_image(
    image: ImageInput,
    source: str = "image",
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    apply_exif_orientation: bool = False,
) -> Image.Image:
    """Open/decode an image fully and return it as an RGB PIL image, or raise ``ValueError`` naming ``source``.

    Decoding everything here (``load()``) means a truncated or corrupt file fails at this line with its name in the
    message, not deep inside a data-loader worker. The current frame of an animation is used (the first, for a file).
    ``max_image_pixels`` rejects decompression bombs before decoding (``None`` disables this check; Pillow's own hard
    limit, ``PIL.Image.MAX_IMAGE_PIXELS * 2``, still applies; a limit above Pillow's is honoured, see
    ``allow_pixels``). ``apply_exif_orientation=True`` rotates photos as a
    viewer shows them; off by default, as the published processor ignores the EXIF tag (and so does inference with
    it), and a model should be trained on images as it will be shown them. A numpy array (H x W, or H x W x 3/4 of
    uint8) is taken as ``PIL.Image.fromarray`` reads it.
    """
    what = _describe(image, source)
    if isinstance(image, np.ndarray):
        try:
            image = Image.fromarray(image)
        except Exception as err:
            raise ValueError(
                f"{what}: cannot read an array of shape {image.shape} and dtype {image.dtype} as an image "
                f"(expected H x W or H x W x 3/4 uint8) ({type(err).__name__}: {err})"
            ) from err
    if isinstance(image, Image.Image):
        return _finish(image, what, max_image_pixels, apply_exif_orientation)

    if isinstance(image, (str, os.PathLike)):
        path = Path(os.fspath(image))
        if not path.exists():
            raise ValueError(f"{what}: file not found")
        if not path.is_file():
            raise ValueError(f"{what}: not a regular file")
        opener: Any = path
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ValueError(f"{what}: empty bytes, not an image")
        opener = io.BytesIO(data)
    else:
        raise TypeError(f"{source}: expected a PIL image, a numpy array, a path or bytes, got {type(image).__name__}")

    allow_pixels(max_image_pixels)
    try:
        with warnings.catch_warnings():
            # Our own limit governs. Escalate Pillow's bomb warning only when our limit is at least as strict as
            # Pillow's warning threshold; otherwise the caller has accepted such sizes and the warning is noise.
            pil_limit = Image.MAX_IMAGE_PIXELS
            strict = max_image_pixels is not None and pil_limit is not None and max_image_pixels <= pil_limit
            warnings.simplefilter("error" if strict else "ignore", Image.DecompressionBombWarning)
            opened = Image.open(opener)
    except FileNotFoundError as err:
        raise ValueError(f"{what}: file not found") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{what}: refused as a possible decompression bomb ({err})") from err
    except Exception as err:  # Pillow raises many types for undecodable data
        raise ValueError(f"{what}: cannot identify or read image ({type(err).__name__}: {err})") from err

    with opened:
        return _finish(opened, what, max_image_pixels, apply_exif_orientation)


def _finish(img: Image.Image, what: str, max_image_pixels: int | None, apply_exif_orientation: bool) -> Image.Image:
    """Validate the size, decode, orient and convert; the returned image never shares a file handle with the input."""
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ValueError(f"{what}: image has zero size ({width}x{height})")
    if max_image_pixels is not None and width * height > max_image_pixels:
        raise ValueError(
            f"{what}: {width}x{height} = {width * height} pixels exceeds max_image_pixels={max_image_pixels} "
            "(possible decompression bomb; raise max_image_pixels or set it to None to accept it)"
        )
    try:
        img.load()
    except Exception as err:
        raise ValueError(f"{what}: corrupt or truncated image data ({type(err).__name__}: {err})") from err
    try:
        out = ImageOps.exif_transpose(img) if apply_exif_orientation else img.copy()
    except Exception:
        out = img.copy()  # broken EXIF must not make an otherwise good image unusable
    try:
        rgb = _to_rgb(out)
    except Exception as err:
        raise ValueError(f"{what}: cannot convert mode {out.mode!r} to RGB ({type(err).__name__}: {err})") from err
    return rgb if rgb is not img else img.copy()


def _exif_orientation(img: Image.Image) -> int:
    """The image's EXIF orientation value (1, upright, when it has none or its EXIF cannot be read)."""
    try:
        return img.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # broken EXIF: the image is used as stored, as in `load_image`
        return 1


def header_size(
    image: Image.Image | str | os.PathLike | bytes, apply_exif_orientation: bool = False
) -> tuple[int, int]:
    """(width, height) that ``load_image`` would return, read from the file header without decoding pixels (for
    planning token counts); ``apply_exif_orientation``: as rotated by its EXIF tag, as ``load_image`` rotates it."""
    if isinstance(image, Image.Image):
        w, h = image.size
        return oriented_size(w, h, _exif_orientation(image)) if apply_exif_orientation else (w, h)
    src: Any = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image
    try:
        with Image.open(src) as img:
            w, h = img.size
            return oriented_size(w, h, _exif_orientation(img)) if apply_exif_orientation else (w, h)
    except FileNotFoundError as err:
        raise ValueError(f"image '{image}': file not found") from err
    except Exception as err:
        raise ValueError(f"image '{image if not isinstance(image, bytes) else 'bytes'}': unreadable ({err})") from err


# --------------------------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------------------------


#: Arguments `AutoProcessor` / `AutoImageProcessor.from_pretrained` hand to a registered class besides the folder.
AUTO_CLASS_KWARGS = ("_from_auto", "_from_pipeline", "trust_remote_code")


class Phi3VImageProcessor:
    """Turns images into the (global view + 336x336 crops) tensors and token counts Phi-3.5-vision expects.

    Per image: HD transform (``hd_transform``), to [0, 1] float32, CLIP normalisation, a bicubic 336x336 global view of
    the normalised padded image, then its row-major 336x336 tiles, zero-padded to ``num_crops + 1`` crops.

    Quirk kept on purpose (it is what the published processor does): with ``num_crops=1`` the scale is always 1, so
    every image becomes 336x336 and yields 2 crops (the bicubic global view and one tile with nearly the same content)
    and 313 tokens.
    """

    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    apply_exif_orientation: bool = False

    def __init__(
        self,
        num_crops: int = MAX_NUM_CROPS,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        num_img_tokens: int = TOKENS_PER_CROP,
        *,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        apply_exif_orientation: bool = False,
        **published: Any,
    ) -> None:
        """``**published``: the other keys of a published ``preprocessor_config.json`` (``processor_class``, ...);
        any other name is a ``TypeError`` (a misspelt ``num_crop=4`` must not silently give 16 crops)."""
        unknown = sorted(set(published) - _PUBLISHED_CONFIG_KEYS)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected argument(s): {', '.join(unknown)}")
        self.num_crops = check_num_crops(num_crops)
        self.image_mean = self._check_triplet("image_mean", image_mean)
        self.image_std = self._check_triplet("image_std", image_std)
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")
        if isinstance(num_img_tokens, bool) or num_img_tokens != TOKENS_PER_CROP:
            # Fixed by the vision tower (24x24 patches, 2x2 merge); the published processor ignores the setting too.
            raise ValueError(f"num_img_tokens must be {TOKENS_PER_CROP} for Phi-3(.5)-vision, got {num_img_tokens!r}")
        self.num_img_tokens = TOKENS_PER_CROP
        self.max_image_pixels = max_image_pixels
        self.apply_exif_orientation = bool(apply_exif_orientation)
        # the remote-code classes the folder this came from names (None: it names none); kept as it was
        self.auto_map = published.get("auto_map", dict(PUBLISHED_AUTO_MAP))
        self._mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)

    @staticmethod
    def _check_triplet(name: str, values: Sequence[float]) -> list[float]:
        try:
            out = [float(v) for v in values]
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be 3 numbers, got {values!r}") from err
        if len(out) != 3:
            raise ValueError(f"{name} must be 3 numbers (RGB), got {values!r}")
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_crops={self.num_crops}, image_mean={self.image_mean}, "
            f"image_std={self.image_std}, num_img_tokens={self.num_img_tokens})"
        )

    # ---------------------------------------------------------------- config I/O

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        **overrides: Any,
    ) -> Phi3VImageProcessor:
        """Build from a checkpoint folder's ``preprocessor_config.json`` (defaults if absent) or a hub id's;
        ``overrides`` win.

        ``max_image_pixels`` is a loading limit of this run (None: no limit), never read from or written to the
        folder: the published format has no such key. The bookkeeping arguments transformers' Auto classes pass
        (``AUTO_CLASS_KWARGS``) are ignored."""
        overrides = {k: v for k, v in overrides.items() if k not in AUTO_CLASS_KWARGS}
        path = Path(folder)
        if not path.exists() and is_hub_id(str(folder)):
            path = resolve_model_source(str(folder))
        if path.is_dir():
            path = path / PREPROCESSOR_CONFIG_NAME
        kwargs: dict[str, Any] = {}
        if path.is_file():
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"cannot read {path}: {err}") from err
            if not isinstance(config, dict):
                raise ValueError(f"{path}: expected a JSON object")
            for key in ("num_crops", "image_mean", "image_std", "num_img_tokens", "apply_exif_orientation"):
                if key in config:
                    kwargs[key] = config[key]
            kwargs["auto_map"] = config.get("auto_map")  # written back as the folder has it (or not at all)
        kwargs.update(overrides)
        return cls(max_image_pixels=max_image_pixels, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Config keys in the published format, so the publisher's remote code can still read a saved folder (it
        passes an extra key such as ``apply_exif_orientation``, written only when on, to its ``**kwargs``)."""
        out: dict[str, Any] = {
            "num_crops": self.num_crops,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "num_img_tokens": self.num_img_tokens,
            "image_processor_type": "Phi3VImageProcessor",
            "processor_class": "Phi3VProcessor",
        }
        if self.auto_map is not None:
            out["auto_map"] = dict(self.auto_map)
        if self.apply_exif_orientation:
            out["apply_exif_orientation"] = True
        return out

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``preprocessor_config.json`` into ``folder`` (created if needed) and return its path."""
        out_dir = Path(folder)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / PREPROCESSOR_CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    # ---------------------------------------------------------------- helpers

    def load_image(self, image: ImageInput, source: str = "image") -> Image.Image:
        """``load_image`` with this processor's ``max_image_pixels`` and EXIF setting."""
        return load_image(image, source, self.max_image_pixels, self.apply_exif_orientation)

    def hd_size(self, width: int, height: int) -> tuple[int, int]:
        """Padded (height, width) for this processor's ``num_crops``."""
        return hd_size(width, height, self.num_crops)

    def num_tokens_for_size(self, width: int, height: int) -> int:
        """Token count for an original image of ``width`` x ``height`` (header-only, no decoding)."""
        return num_image_tokens(*self.hd_size(width, height))

    def calc_num_image_tokens_from_image_size(self, width: int, height: int) -> int:
        """The published processor's name for ``num_tokens_for_size``."""
        return self.num_tokens_for_size(width, height)

    def calc_num_image_tokens(self, images: ImageInput | Sequence[ImageInput]) -> list[int]:
        """Token count of each image (the published processor's method; reads the images, computes no pixels)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        sizes = [self.load_image(image, source=f"image {i}").size for i, image in enumerate(images)]
        return [self.num_tokens_for_size(w, h) for w, h in sizes]

    def _crops_into(self, image: Image.Image, out: torch.Tensor) -> tuple[int, int, int]:
        """Write the global view and the tiles of one RGB image into `out` (its crop slots, in order); returns
        (crops written, H, W). Writing in place (one strided copy per tile grid, no concatenation) spares a copy of
        every crop: this runs in the data-loader workers and must keep up with the GPU."""
        padded = hd_transform(image, self.num_crops)
        width, height = padded.size
        x = torch.from_numpy(np.array(padded, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        x = x.sub(self._mean).div(self._std)
        out[0] = torch.nn.functional.interpolate(
            x[None], size=(CROP_SIZE, CROP_SIZE), mode="bicubic", align_corners=False
        )[0]
        h, w = crop_grid(height, width)
        tiles = out[1 : 1 + h * w].view(h, w, 3, CROP_SIZE, CROP_SIZE)
        tiles.copy_(x.view(3, h, CROP_SIZE, w, CROP_SIZE).permute(1, 3, 0, 2, 4))
        return 1 + h * w, height, width

    # ---------------------------------------------------------------- main entry

    def __call__(
        self, images: ImageInput | Sequence[ImageInput] | None, return_tensors: str | None = "pt"
    ) -> dict[str, Any]:
        """Process a list of images (or one image) into ``pixel_values``, ``image_sizes`` and ``num_img_tokens``.

        pixel_values: float32 (num_images, num_crops + 1, 3, 336, 336); image_sizes: int64 (num_images, 2) holding
        [H, W] of each padded image; num_img_tokens: list of ints. Unused crop slots are exactly zero.
        `return_tensors`: "pt" (default; None too) or "np" (numpy arrays).
        """
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        if images is None:
            images = []
        elif isinstance(images, (Image.Image, np.ndarray, str, os.PathLike, bytes, bytearray, memoryview)):
            images = [images]
        images = list(images)

        n_slots = self.num_crops + 1
        pixel_values = torch.zeros((len(images), n_slots, 3, CROP_SIZE, CROP_SIZE), dtype=torch.float32)
        image_sizes = torch.zeros((len(images), 2), dtype=torch.long)
        tokens: list[int] = []
        for i, image in enumerate(images):
            rgb = self.load_image(image, source=f"image {i}")
            _, height, width = self._crops_into(rgb, pixel_values[i])
            image_sizes[i, 0], image_sizes[i, 1] = height, width
            tokens.append(num_image_tokens(height, width))
        if return_tensors == "np":
            return {"pixel_values": pixel_values.numpy(), "image_sizes": image_sizes.numpy(), "num_img_tokens": tokens}
        return {"pixel_values": pixel_values, "image_sizes": image_sizes, "num_img_tokens": tokens}

    preprocess = __call__
