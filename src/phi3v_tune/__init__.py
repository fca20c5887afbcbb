"""phi3v-tune: fine-tune Phi-3.5-vision / Phi-3-vision on your own images, multi-image prompts and videos."""

from __future__ import annotations

__version__ = "0.1.0"

from .model.auto import register_auto_classes
from .model.configuration import Phi3VConfig
from .model.modeling import Phi3VForCausalLM
from .processing.image import Phi3VImageProcessor
from .processing.processor import Phi3VProcessor

register_auto_classes()

__all__ = ["Phi3VConfig", "Phi3VForCausalLM", "Phi3VImageProcessor", "Phi3VProcessor", "__version__"]
