"""The data layer: read the user's data (conversations jsonl, ``datasets`` tables) into ``Record``s, check it, and
build model inputs from it (``build_example`` with a ``SampleLayout``).

The names below are loaded from their modules on first use (PEP 562 ``__getattr__``), not when the package is
imported: ``data.layout`` and ``data.video`` hold settings that the command line reads to build its ``--help``, and
importing them must not load torch, which ``build_example`` and the collators need.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the module (relative to this package) that defines it.
_EXPORTS: dict[str, str] = {
    "DEFAULT_VIDEO_FRAMES": ".video",
    "IMAGE_TAG": "..processing.geometry",
    "MULTI_TURN": ".layout",
    "Collator": ".collate",
    "DataError": ".schema",
    "ImageRef": ".schema",
    "PathResolver": ".sources",
    "Problem": ".schema",
    "Record": ".schema",
    "SampleLayout": ".layout",
    "SampleRefused": ".examples",
    "Turn": ".schema",
    "ValidationReport": ".validate",
    "build_example": ".examples",
    "check_image": ".validate",
    "check_image_tags": ".validate",
    "format_problems": ".schema",
    "load_hf_dataset": ".sources",
    "load_image": ".sources",
    "load_records": ".sources",
    "parse_conversation": ".sources",
    "read_hf_dataset": ".sources",
    "read_json": ".sources",
    "read_jsonl": ".sources",
    "sort_problems": ".schema",
    "validate_path": ".validate",
    "validate_records": ".validate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` and keep the value here (later lookups are plain attributes)."""
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
