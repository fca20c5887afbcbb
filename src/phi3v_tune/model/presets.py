"""The published Phi-3.5-vision configuration, shipped with the package (for random-weight benchmarks and tests)."""

from __future__ import annotations

import json
from importlib import resources

from .configuration import Phi3VConfig


def phi35_vision_config(**overrides) -> Phi3VConfig:
    """`config.json` of microsoft/Phi-3.5-vision-instruct (without its remote-code `auto_map`)."""
    raw = json.loads(resources.files(__package__).joinpath("phi35v_config.json").read_text())
    raw.pop("auto_map", None)
    raw.pop("_name_or_path", None)
    raw.update(overrides)
    return Phi3VConfig.from_dict(raw)
