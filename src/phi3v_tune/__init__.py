"""phi3v-tune: fine-tune Phi-3.5-vision / Phi-3-vision on your own images, multi-image prompts and videos.

Importing the package registers `phi3_v` with transformers' Auto classes (`AutoConfig`, `AutoModelForCausalLM`,
`AutoModel`), so they load a published or saved folder with this package's model and no remote code. The public names
below load on first use. The `phi3v-tune` command line defers the registration until a command runs, so that
`phi3v-tune --help` does not wait for torch and transformers.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_PUBLIC = {
    "Phi3VConfig": "phi3v_tune.model.configuration",
    "Phi3VForCausalLM": "phi3v_tune.model.modeling",
    "Phi3VModel": "phi3v_tune.model.modeling",
    "Phi3VImageProcessor": "phi3v_tune.processing.image",
    "Phi3VProcessor": "phi3v_tune.processing.processor",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'phi3v_tune' has no attribute {name!r}")


def _started_as_command_line() -> bool:
    """This process is the `phi3v-tune` console script (which registers the Auto classes before any command)."""
    main = sys.modules.get("__main__")
    return Path(getattr(main, "__file__", None) or "").name == "phi3v-tune"


if not _started_as_command_line():
    from .model.auto import register_auto_classes

    register_auto_classes()
