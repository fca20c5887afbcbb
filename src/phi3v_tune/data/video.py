"""Video -> frames with PyAV: the frame indices of the original recipe, decoded correctly even with a wrong header.

Importing this module loads neither PyAV nor an image library (the default frame count is read by ``--help`` and the
data layer's settings); PyAV, an optional decoder, is imported when the first video is opened.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

#: Frames sampled from each video: the original recipe's UCF-101 setting, and the default everywhere here.
DEFAULT_VIDEO_FRAMES = 8


def frame_indices(total: int, video_frames: int, distinct: bool = False) -> list[int]:
    """`numpy.arange(0, total, total / video_frames).astype(int)`: the recipe's sampling (computed with the same
    float64 steps, ``i * step`` truncated). A video shorter than `video_frames` repeats indices; `distinct=True` keeps
    each frame once, as the recipe's converter decodes them (fewer frames)."""
    if video_frames < 1:
        raise ValueError(f"frames per video must be >= 1, got {video_frames}")
    if total <= 0:
        return []
    step = total / video_frames
    indices = [int(i * step) for i in range(math.ceil(total / step))][:video_frames]
    return list(dict.fromkeys(indices)) if distinct else indices


def _open(path: Path):
    """PyAV container of a local file. The path is made absolute: FFmpeg would read a relative name with a colon
    (`take:2.avi`) as a protocol (`take:`)."""
    import av  # optional heavy decoder: loaded with the first video, not with this module

    return av.open(os.path.abspath(path))


def _decode(path: Path, keep: set[int]) -> tuple[int, dict[int, Image.Image]]:
    """Decode the whole stream: how many frames it has, and the frames at `keep` as RGB images (only those are
    converted and held, so memory stays at a few frames however long the clip)."""
    kept: dict[int, Image.Image] = {}
    count = 0
    try:  # PyAV raises many types for unreadable files
        container = _open(path)
    except Exception as err:
        raise ValueError(f"video '{path}': cannot decode ({type(err).__name__}: {err})") from err
    with container:
        if not container.streams.video:
            raise ValueError(f"video '{path}': no video stream (audio only?)")
        try:
            for count, frame in enumerate(container.decode(container.streams.video[0]), start=1):
                if count - 1 in keep:
                    kept[count - 1] = frame.to_image().convert("RGB")
        except Exception as err:
            raise ValueError(f"video '{path}': cannot decode ({type(err).__name__}: {err})") from err
    if not count:
        raise ValueError(f"video '{path}': no frames could be decoded")
    return count, kept


def sample_frames(
    path: str | Path, video_frames: int = DEFAULT_VIDEO_FRAMES, distinct: bool = False
) -> list[Image.Image]:
    """Decode `video_frames` RGB frames at the recipe's indices (not resized); `distinct`: see `frame_indices`.

    The frame count is taken by decoding (`count_frames`), so videos whose header frame count is missing or wrong
    still give the right frames; a second pass keeps only the sampled frames.
    """
    path = Path(path)
    wanted = frame_indices(count_frames(path), video_frames, distinct)
    _, kept = _decode(path, set(wanted))
    missing = sorted(set(wanted) - set(kept))
    if missing:
        raise ValueError(f"video '{path}': frames {missing} could not be decoded again (the file changed?)")
    return [kept[i] for i in wanted]


def count_frames(path: str | Path) -> int:
    """Decode the whole stream and count its frames without keeping them (a long clip's frames as RGB images would
    fill the memory). Cached per file and modification time: training decodes a clip every epoch."""
    path = Path(path)
    try:
        mtime = path.stat().st_mtime
    except OSError:
        mtime = None
    return _cached_count(os.path.abspath(path), mtime) if mtime is not None else _decode(path, set())[0]


@lru_cache(maxsize=4096)
def _cached_count(path: str, mtime: float) -> int:
    return _decode(Path(path), set())[0]


@lru_cache(maxsize=32)
def cached_frames(path: str, video_frames: int, mtime: float) -> tuple[Image.Image, ...]:
    """Per-process cache of sampled frames (keyed by modification time, so an edited file is decoded again)."""
    return tuple(sample_frames(path, video_frames))


def load_video_frames(path: str | Path, video_frames: int = DEFAULT_VIDEO_FRAMES) -> list[Image.Image]:
    """The `video_frames` sampled frames of a video file (decoded once per process and file version)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"video '{p}': file not found")
    return list(cached_frames(str(p), video_frames, p.stat().st_mtime))
