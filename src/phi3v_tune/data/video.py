"""Video -> frames with PyAV: the frame indices of the original recipe, decoded correctly even with a wrong header."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

#: Frames sampled from each video: the original recipe's UCF-101 setting, and the default everywhere here.
RECIPE_FRAMES = 8


def frame_indices(total: int, num_frames: int, distinct: bool = False) -> list[int]:
    """`arange(0, total, total / num_frames).astype(int)`: the recipe's sampling. A video shorter than `num_frames`
    repeats indices; `distinct=True` keeps each frame once, as the recipe's converter decodes them (fewer frames)."""
    if total <= 0:
        return []
    indices = [int(i) for i in np.arange(0, total, total / num_frames).astype(int)][:num_frames]
    return list(dict.fromkeys(indices)) if distinct else indices


def _decode_all(path: Path) -> list[Image.Image]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [frame.to_image().convert("RGB") for frame in container.decode(stream)]


def sample_frames(path: str | Path, num_frames: int = RECIPE_FRAMES, distinct: bool = False) -> list[Image.Image]:
    """Decode `num_frames` RGB frames at the recipe's indices (not resized); `distinct`: see `frame_indices`.

    The whole stream is decoded once and the frame count taken from what was decoded, so videos whose header
    frame count is missing or wrong still give the right frames.
    """
    path = Path(path)
    try:
        frames = _decode_all(path)
    except Exception as err:  # PyAV raises many types for unreadable files
        raise ValueError(f"video '{path}': cannot decode ({type(err).__name__}: {err})") from err
    if not frames:
        raise ValueError(f"video '{path}': no frames could be decoded")
    return [frames[i] for i in frame_indices(len(frames), num_frames, distinct)]


def count_frames(path: str | Path) -> int:
    """Decode the whole stream and count its frames without keeping them (what `validate` needs: a long clip's
    frames as RGB images would take gigabytes)."""
    import av

    path = Path(path)
    try:
        with av.open(str(path)) as container:
            count = sum(1 for _ in container.decode(container.streams.video[0]))
    except Exception as err:  # PyAV raises many types for unreadable files
        raise ValueError(f"video '{path}': cannot decode ({type(err).__name__}: {err})") from err
    if not count:
        raise ValueError(f"video '{path}': no frames could be decoded")
    return count


@lru_cache(maxsize=32)
def cached_frames(path: str, num_frames: int, mtime: float) -> tuple[Image.Image, ...]:
    """Per-process cache of sampled frames (keyed by modification time, so an edited file is decoded again)."""
    return tuple(sample_frames(path, num_frames))


def video_frames(path: str | Path, num_frames: int = RECIPE_FRAMES) -> list[Image.Image]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"video '{p}': file not found")
    return list(cached_frames(str(p), num_frames, p.stat().st_mtime))
