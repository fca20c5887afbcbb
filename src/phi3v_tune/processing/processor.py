"""`Phi3VProcessor`: prompt text + images -> model inputs, exactly as the published processor, but batched.

The prompt is split at the `<|image_k|>` tags; each text chunk is tokenized with a leading `<s>` (so a `<s>` follows
every image); image k becomes `num_tokens(k)` copies of the id `-k`. Unlike the published processor, several
prompts can be processed at once with left or right padding, and mistakes raise an `ImageTagError` that says what is
wrong (a `ValueError`, and an `AssertionError` as the published processor's bare assertions are).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import BatchFeature

from .geometry import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_TAG, MAX_NUM_CROPS, image_tag
from .hub import is_hub_id, resolve_model_source
from .image import Phi3VImageProcessor
from .tokenizer import load_tokenizer, stop_token_ids

#: A model folder's tokenizer files, copied as they are when a processor loaded from it is saved.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


class ImageTagError(ValueError, AssertionError):
    """Image tags that do not match the images. Also an ``AssertionError``: what the published processor raises, so
    code written against it keeps catching the same thing."""


def image_tag_order(text: str, source: str = "prompt") -> list[int]:
    """The image numbers in order of appearance; checks they are exactly 1..n, each used once."""
    order = [int(m) for m in IMAGE_TAG.findall(text)]
    seen: set[int] = set()
    for k in order:
        if k in seen:
            raise ImageTagError(f"{source}: image tag {image_tag(k)} appears more than once")
        seen.add(k)
    if sorted(order) != list(range(1, len(order) + 1)):
        raise ImageTagError(
            f"{source}: image tags must be numbered 1..n without gaps, got {', '.join(image_tag(k) for k in order)}"
        )
    return order


class Phi3VProcessor:
    """Tokenizer + image processor of Phi-3(.5)-vision.

    `processor(text=prompt_or_prompts, images=images, padding=True, padding_side="left")` returns `input_ids`
    (image positions hold `-k` for image k), `attention_mask` (from lengths: the real `<|endoftext|>`, which is also
    the pad id, stays visible), `pixel_values` (num_images, num_crops+1, 3, 336, 336) and `image_sizes`.
    """

    def __init__(self, tokenizer, image_processor: Phi3VImageProcessor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    # ----------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        num_crops: int | None = None,
        apply_exif_orientation: bool | None = None,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        revision: str | None = None,
        **image_kwargs,
    ) -> Phi3VProcessor:
        """Load from a model folder (tokenizer files + `preprocessor_config.json`) or a hub id (its snapshot at
        `revision`); `num_crops` and `apply_exif_orientation` override the folder's when given (None: as the folder
        says). `max_image_pixels`: images with more pixels are refused (None: no limit); a setting of this run, never
        saved with the folder."""
        folder = resolve_model_source(folder, revision) if is_hub_id(str(folder)) else folder
        if num_crops is not None:
            image_kwargs["num_crops"] = num_crops
        if apply_exif_orientation is not None:
            image_kwargs["apply_exif_orientation"] = apply_exif_orientation
        image_processor = Phi3VImageProcessor.from_pretrained(  # checks num_crops first
            folder, max_image_pixels=max_image_pixels, **image_kwargs
        )
        return cls(load_tokenizer(folder), image_processor)

    @classmethod
    def from_tokenizer(
        cls, tokenizer, num_crops: int = MAX_NUM_CROPS, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    ) -> Phi3VProcessor:
        return cls(tokenizer, Phi3VImageProcessor(num_crops=num_crops, max_image_pixels=max_image_pixels))

    def save_pretrained(self, folder: str | Path) -> None:
        """Tokenizer files and `preprocessor_config.json`. A tokenizer loaded from a folder keeps that folder's files
        as they were (the published `tokenizer_config.json` names `LlamaTokenizer` and holds the chat template,
        which older transformers, the publisher's code among them, read; transformers 5 would write its own
        `TokenizersBackend` class name, which they cannot load). The tokenizer is never changed by training."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        source = Path(self.tokenizer.name_or_path or "")
        originals = {}
        if source.is_dir() and (source / "tokenizer_config.json").is_file():
            originals = {n: (source / n).read_bytes() for n in TOKENIZER_FILES if (source / n).is_file()}
        self.tokenizer.save_pretrained(str(folder))
        for name, data in originals.items():
            (folder / name).write_bytes(data)
        if originals:
            config_file = folder / "tokenizer_config.json"
            config = json.loads(config_file.read_text(encoding="utf-8"))
            if not config.get("chat_template") and self.tokenizer.chat_template:  # added at loading: keep it
                config["chat_template"] = self.tokenizer.chat_template
                config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        self.image_processor.save_pretrained(folder)

    # ----------------------------------------------------------------------------------------------------------------
    @property
    def num_crops(self) -> int:
        return self.image_processor.num_crops

    @property
    def stop_token_ids(self) -> list[int]:
        return stop_token_ids(self.tokenizer)

    def calc_num_image_tokens(self, images: Any) -> list[int]:
        """Token count of each image (the published processor's method)."""
        return self.image_processor.calc_num_image_tokens(images)

    def calc_num_image_tokens_from_image_size(self, width: int, height: int) -> int:
        """Token count of a `width` x `height` image (the published processor's method)."""
        return self.image_processor.calc_num_image_tokens_from_image_size(width, height)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def tokenize_text(self, text: str) -> list[int]:
        """One text chunk with its leading `<s>` (the published processor's rule)."""
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if not ids or ids[0] != bos:  # a tokenizer without a bos post-processor
            ids = [bos, *ids]
        return ids

    def prompt_ids(
        self,
        text: str,
        num_tokens: Sequence[int] | dict[int, int],
        source: str = "prompt",
        leading_bos: bool = True,
        check_tags: bool = True,
    ) -> list[int]:
        """Token ids of one prompt; `num_tokens[k-1]` (or `num_tokens[k]` for a dict) is the token count of image k.

        `leading_bos=False` continues a conversation (no `<s>` before the first chunk); a `<s>` still follows every
        image. `check_tags=False` skips the 1..n rule, for one turn of a conversation numbered across turns.
        """
        order = image_tag_order(text, source) if check_tags else [int(m) for m in IMAGE_TAG.findall(text)]
        counts = num_tokens if isinstance(num_tokens, dict) else {k + 1: n for k, n in enumerate(num_tokens)}
        if check_tags and len(order) != len(counts):
            raise ImageTagError(
                f"{source}: the prompt has {len(order)} image tag(s) but {len(counts)} image(s) were given"
            )
        chunks = IMAGE_TAG.split(text)[::2]  # split() also returns the captured numbers at odd positions
        ids: list[int] = []
        for i, chunk in enumerate(chunks):
            if i == 0 and not leading_bos:
                ids.extend(self.tokenizer(chunk, add_special_tokens=False)["input_ids"] if chunk else [])
            else:
                ids.extend(self.tokenize_text(chunk))
            if i < len(order):
                k = order[i]
                if k not in counts:
                    raise ImageTagError(f"{source}: image tag {image_tag(k)} has no image")
                ids.extend([-k] * counts[k])
        return ids

    # ----------------------------------------------------------------------------------------------------------------
    def __call__(
        self,
        text: str | Sequence[str],
        images: Any = None,
        padding: bool | str = False,
        truncation: bool | None = None,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
        padding_side: str | None = None,
        **_: Any,
    ) -> BatchFeature:
        """Process one prompt or a batch.

        `images`: for one prompt, a list of its images (or one image); for a batch, either one list per prompt or a
        flat list consumed prompt by prompt (each prompt takes as many images as it has tags).
        Images are PIL images, numpy arrays, paths or bytes. `truncation` with `max_length` shortens text-only
        prompts as the tokenizer would (the published processor hands those to it); prompts with images are never
        cut, as in the published processor (a warning says so), since a cut image is no input the model can read.
        `return_tensors`: "pt" (default; None too) or "np".
        """
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        texts = [text] if isinstance(text, str) else list(text)
        per_prompt = self._split_images(texts, images)
        flat = [img for imgs in per_prompt for img in imgs]
        processed = self.image_processor(flat) if flat else None
        sizes = processed["num_img_tokens"] if processed else []
        rows: list[list[int]] = []
        order_all: list[int] = []
        start = 0
        for b, (prompt, imgs) in enumerate(zip(texts, per_prompt)):
            source = f"prompt {b}" if len(texts) > 1 else "prompt"
            counts = sizes[start : start + len(imgs)]
            rows.append(self.prompt_ids(prompt, counts, source))
            # the model fills image positions in order of appearance: store the images in that order too
            order_all.extend(start + k - 1 for k in image_tag_order(prompt, source))
            start += len(imgs)
        if truncation and max_length is not None and any(len(r) > max_length for r in rows):
            if flat:
                warnings.warn(
                    "truncation is not applied to prompts with images (the published processor does not either)",
                    stacklevel=2,
                )
            else:
                left = getattr(self.tokenizer, "truncation_side", "right") == "left"
                rows = [r[len(r) - max_length :] if left else r[:max_length] for r in rows]
        if len(texts) > 1 and not padding and len({len(r) for r in rows}) > 1:
            raise ValueError("prompts of different lengths need padding=True")
        out = self.pad(rows, padding_side=padding_side)
        if processed is not None:
            index = torch.tensor(order_all, dtype=torch.long)
            out["pixel_values"] = processed["pixel_values"][index]
            out["image_sizes"] = processed["image_sizes"][index]
        if return_tensors == "np":
            return BatchFeature({k: v.numpy() for k, v in out.items()}, tensor_type=None)
        return BatchFeature(out, tensor_type=None)

    def _split_images(self, texts: list[str], images: Any) -> list[list[Any]]:
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        needed = [len(image_tag_order(t, f"prompt {b}" if len(texts) > 1 else "prompt")) for b, t in enumerate(texts)]
        if images and all(isinstance(x, (list, tuple)) for x in images):
            if len(images) != len(texts):
                raise ValueError(f"got {len(images)} image lists for {len(texts)} prompts")
            groups = [list(x) for x in images]
        else:
            if len(images) != sum(needed):
                where = "the prompt has" if len(texts) == 1 else "the prompts have"
                raise ImageTagError(f"{where} {sum(needed)} image tag(s) but {len(images)} image(s) were given")
            groups, start = [], 0
            for n in needed:
                groups.append(list(images[start : start + n]))
                start += n
        for b, (n, g) in enumerate(zip(needed, groups)):
            if n != len(g):
                raise ImageTagError(f"prompt {b} has {n} image tag(s) but {len(g)} image(s) were given")
        return groups

    def pad(self, rows: list[list[int]], padding_side: str | None = None) -> dict[str, torch.Tensor]:
        """Pad id rows to one length; the attention mask comes from the lengths, never from `ids != pad`."""
        side = padding_side or getattr(self.tokenizer, "padding_side", "right") or "right"
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        width = max((len(r) for r in rows), default=0)
        pad_id = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r)
            sl = slice(width - n, width) if side == "left" else slice(0, n)
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
        return {"input_ids": ids, "attention_mask": mask}

    # ----------------------------------------------------------------------------------------------------------------
    def batch_decode(self, ids, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kwargs)

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """Generated ids -> text: what transformers' `pipeline("image-text-to-text")` calls on a processor. Image
        positions (ids < 0, in the prompt part of the sequences) hold no text and are left out."""
        rows = generated_outputs.tolist() if hasattr(generated_outputs, "tolist") else generated_outputs
        rows = [[i for i in row if i >= 0] for row in rows]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens, **kwargs)
