"""How a record becomes a sample: the settings that travel together from the run's configuration to every example.

One ``SampleLayout`` is made once from the settings (``--max-length``, ``--multi-turn``, ``--video-frames``) and passed
to whatever checks, plans or builds samples, so that validation, length planning, training examples and evaluation
questions always agree. Light on purpose (no torch, no image library): the command line reads ``MULTI_TURN`` here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .video import DEFAULT_VIDEO_FRAMES

#: How a multi-turn record is laid out: "conversation" (one conversation, images numbered 1..n across it, every answer
#: learned) or "recipe" (the original recipe's layout: every turn its own prompt, images numbered from 1 per turn).
MULTI_TURN = ("conversation", "recipe")


@dataclass(frozen=True)
class SampleLayout:
    """``max_length``: longest sample in tokens (None: no limit; only text after the last image is ever cut).
    ``multi_turn``: one of ``MULTI_TURN``. ``video_frames``: frames sampled from each video (they count as the
    turn's images, after its own)."""

    max_length: int | None = None
    multi_turn: str = "conversation"
    video_frames: int = DEFAULT_VIDEO_FRAMES

    def __post_init__(self) -> None:
        if self.multi_turn not in MULTI_TURN:
            raise ValueError(f"multi_turn must be one of {', '.join(MULTI_TURN)}, got {self.multi_turn!r}")
        if self.video_frames < 1:
            raise ValueError(f"frames per video must be >= 1, got {self.video_frames}")

    @property
    def per_turn_tags(self) -> bool:
        """Image tags are numbered from 1 in every turn (the recipe's layout), not across the conversation."""
        return self.multi_turn == "recipe"


#: The layout of a sample built with no settings: no length limit, one conversation, the default frames per video.
DEFAULT_LAYOUT = SampleLayout()
