"""Registers `phi3_v` with transformers' Auto classes, so code written against them (`AutoConfig`,
`AutoModelForCausalLM`, `AutoModel`, `AutoProcessor`, evaluation harnesses, the HF pipelines)
loads a published or saved folder with this package's classes and no remote code, once `phi3v_tune` is imported (a
folder whose `auto_map` names remote-code files it lacks then loads too, without the trust_remote_code question)."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

from ..processing.processor import Phi3VProcessor
from .configuration import Phi3VConfig
from .modeling import Phi3VForCausalLM, Phi3VModel


def register_auto_classes() -> None:
    """Idempotent: importing the package twice, or after another registration of the same classes, is fine."""
    AutoConfig.register(Phi3VConfig.model_type, Phi3VConfig, exist_ok=True)
    AutoModel.register(Phi3VConfig, Phi3VModel, exist_ok=True)
    AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)
    AutoProcessor.register(Phi3VConfig, Phi3VProcessor, exist_ok=True)
