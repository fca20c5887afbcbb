"""Synthetic training sets with the token shapes of the recipe's workloads, written as jsonl + image files.

* `docvqa`: one scanned-page-like image per sample at num_crops 16. US-letter pages (aspect 1.29) become 4x4
  crops (2509 image tokens), A4 pages (aspect 1.41) 4x3 crops (1933); 82% letter / 18% A4 with a short question
  and answer gives the recipe's mean of ~2440 tokens.
* `memes`: one picture per sample at num_crops 4, landscape, square and portrait (2x2, 2x1, 1x2, 1x1 crops) with
  captions of varied length: ~300-800 tokens, the hateful-memes-like short workload.

The images are real files, so a benchmark over them includes decoding and the HD transform in data-loader workers.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

WORKLOADS = ("docvqa", "memes")
NUM_CROPS = {"docvqa": 16, "memes": 4}


@dataclass(frozen=True)
class WorkloadFiles:
    name: str
    jsonl: Path
    num_crops: int
    samples: int


def _page(rng: random.Random, width: int, height: int) -> Image.Image:
    """A white page with dark 'text lines' (compresses like a scan; cheap to decode)."""
    img = Image.new("RGB", (width, height), (250, 250, 246))
    draw = ImageDraw.Draw(img)
    y = rng.randint(40, 90)
    while y < height - 60:
        x = rng.randint(40, 80)
        while x < width - 80:
            w = rng.randint(20, 90)
            draw.rectangle([x, y, min(x + w, width - 60), y + 12], fill=(20, 20, 30))
            x += w + rng.randint(8, 16)
        y += rng.randint(22, 40)
    return img


def _picture(rng: random.Random, width: int, height: int) -> Image.Image:
    img = Image.new("RGB", (width, height), tuple(rng.randint(0, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.randint(0, width - 2), rng.randint(0, height - 2)
        x1, y1 = rng.randint(x0 + 1, width), rng.randint(y0 + 1, height)
        draw.ellipse([x0, y0, x1, y1], fill=tuple(rng.randint(0, 255) for _ in range(3)))
    return img


_WORDS = "the a total date invoice name amount of is what which on in this page form table number".split()


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))


def write_workload(name: str, folder: str | Path, samples: int, seed: int = 0) -> WorkloadFiles:
    """Write `samples` conversations of workload `name` under `folder` (train.jsonl + images)."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(samples):
        if name == "docvqa":
            letter = rng.random() < 0.82
            size = (1275, 1650) if letter else (1240, 1754)  # 150 dpi letter / A4
            img, user, answer = _page(rng, *size), f"What is the {_text(rng, 2, 5)}?", _text(rng, 1, 4)
        else:
            size = rng.choice([(800, 600), (672, 672), (900, 450), (450, 800), (330, 330), (700, 500)])
            img = _picture(rng, *size)
            user = f"{_text(rng, 5, 60)}. Is this meme hateful? Answer yes or no."
            answer = rng.choice(["yes", "no"])
        file = f"{name}{i:05d}.png"
        img.save(folder / file)
        lines.append({"id": f"{name}{i}", "conversations": [{"images": [file], "user": user, "assistant": answer}]})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return WorkloadFiles(name, path, NUM_CROPS[name], samples)
