"""The data layer: read the user's data (conversations jsonl, ``datasets`` tables) into ``Record``s and check it."""

from __future__ import annotations

from .schema import DataError, ImageRef, Problem, Record, Turn, format_problems, sort_problems
from .sources import (
    PathResolver,
    load_hf_dataset,
    load_image,
    load_records,
    parse_conversation,
    read_hf_dataset,
    read_json,
    read_jsonl,
)
from .validate import IMAGE_TAG, ValidationReport, check_image, check_image_tags, validate_path, validate_records

__all__ = [
    "IMAGE_TAG",
    "DataError",
    "ImageRef",
    "PathResolver",
    "Problem",
    "Record",
    "Turn",
    "ValidationReport",
    "check_image",
    "check_image_tags",
    "format_problems",
    "load_hf_dataset",
    "load_image",
    "load_records",
    "parse_conversation",
    "read_hf_dataset",
    "read_json",
    "read_jsonl",
    "sort_problems",
    "validate_path",
    "validate_records",
]
