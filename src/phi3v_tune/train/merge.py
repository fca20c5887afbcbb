"""`phi3v-tune merge`: base + LoRA adapter -> one full checkpoint in the published layout (bf16 by default)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..model.modeling import Phi3VForCausalLM
from ..processing.processor import Phi3VProcessor
from .checkpoints import write_marker


def adapter_base(adapter: str | Path) -> str:
    adapter = Path(adapter)
    recorded = adapter / "base_model.txt"
    if recorded.is_file():
        return recorded.read_text().strip()
    import json

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter}: the adapter does not record its base model; pass --base")
    return base


def load_for_inference(
    model_dir: str | Path, base: str | None = None, dtype: torch.dtype = torch.float32, merge: bool = True, **kwargs
) -> Phi3VForCausalLM:
    """A full checkpoint, or base + LoRA adapter (merged unless `merge=False`)."""
    from ..config import check_model_path, is_hub_id

    if not Path(model_dir).is_dir() and is_hub_id(str(model_dir)):
        return load_hub_model(str(model_dir), dtype=dtype, **kwargs)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir}: no such folder (expected a model folder, a LoRA adapter folder or a hub id)")
    if (model_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        if base is None:
            base = adapter_base(model_dir)
            try:
                check_model_path(base, f"the base model that {model_dir} records,")
            except ValueError as err:
                raise ValueError(f"{err}; pass --base") from None
        base_model = Phi3VForCausalLM.from_pretrained(base, dtype=dtype, **kwargs)
        peft_model = PeftModel.from_pretrained(base_model, str(model_dir))
        return peft_model.merge_and_unload() if merge else peft_model
    return Phi3VForCausalLM.from_pretrained(str(model_dir), dtype=dtype, **kwargs)


def load_hub_model(name: str, dtype: torch.dtype, **kwargs) -> Phi3VForCausalLM:
    """A published model by hub id (downloaded once into the Hugging Face cache)."""
    try:
        return Phi3VForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    except OSError as err:
        raise ValueError(
            f"{name}: no such local folder, and it could not be loaded from the Hugging Face hub ({err}); pass a "
            "local model folder"
        ) from None


def merge_adapter(adapter: str | Path, out: str | Path, base: str | None = None, dtype: str = "bfloat16") -> Path:
    adapter, out = Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").is_file():
        raise ValueError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
    merged = load_for_inference(adapter, base=base, dtype=torch.float32)  # (checks the recorded base is there)
    base = base or adapter_base(adapter)
    merged = merged.to(getattr(torch, dtype))
    merged.save_pretrained(out, max_shard_size="5GB")
    source = adapter if (adapter / "tokenizer.json").is_file() else Path(base)
    Phi3VProcessor.from_pretrained(source).save_pretrained(out)
    if (adapter / "train_config.yaml").is_file():  # how it was trained (eval/predict read --video-frames from it)
        shutil.copyfile(adapter / "train_config.yaml", out / "train_config.yaml")
    write_marker(out, 0)
    return out
