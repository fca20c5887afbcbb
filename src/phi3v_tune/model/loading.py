"""What a user passes as `--model` / `--base` -> local folders and loaded objects: a model folder, a LoRA adapter
folder (with the base it records, or `--base`), or a hub id (resolved once to its local snapshot)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig

from ..processing.hub import ADAPTER_CONFIG, check_model_path, is_hub_id, resolve_model_source, snapshot_origin
from ..processing.processor import Phi3VProcessor
from .modeling import Phi3VForCausalLM

__all__ = [
    "ModelSource",
    "adapter_base",
    "check_model_path",
    "is_adapter",
    "is_hub_id",
    "load_for_inference",
    "load_processor",
    "locate",
    "resolve_model_source",
]

#: Written beside a LoRA adapter by `train`: the base model it was trained on (a folder, or `hub-id@commit`).
BASE_RECORD = "base_model.txt"


def is_adapter(folder: str | Path) -> bool:
    """A LoRA adapter folder (adapter weights, no full model of its own)."""
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def base_record(base_folder: str | Path) -> str:
    """What an adapter records as its base: `hub-id@commit` for a hub snapshot (valid on any machine), else the
    folder's absolute path."""
    origin = snapshot_origin(base_folder)
    return f"{origin[0]}@{origin[1]}" if origin else str(Path(base_folder).resolve())


def adapter_base(adapter: str | Path) -> str:
    """The base model an adapter records: `base_model.txt` (written by train), else `adapter_config.json`'s
    `base_model_name_or_path` (with `@revision` when it records one)."""
    adapter = Path(adapter)
    recorded = adapter / BASE_RECORD
    if recorded.is_file():
        return recorded.read_text().strip()
    cfg = json.loads((adapter / ADAPTER_CONFIG).read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter}: the adapter does not record its base model; pass --base")
    return f"{base}@{cfg['revision']}" if cfg.get("revision") and is_hub_id(base) else base


def _split_revision(record: str) -> tuple[str, str | None]:
    """`org/name@rev` -> (org/name, rev) for a hub id; anything else as it is."""
    name, at, rev = record.rpartition("@")
    return (name, rev) if at and rev and is_hub_id(name) else (record, None)


@dataclass(frozen=True)
class ModelSource:
    """Local folders behind a `--model` (and `--base`): `folder` is the model or adapter; `base` the adapter's base."""

    folder: Path
    base: Path | None = None

    @property
    def adapter(self) -> bool:
        return self.base is not None

    @property
    def processor_folder(self) -> Path:
        """Where the tokenizer and image-processor settings are: the folder itself (train saves them with every model
        and adapter), else the adapter's base."""
        if (self.folder / "tokenizer.json").is_file() or self.base is None:
            return self.folder
        return self.base

    @property
    def weights_base(self) -> Path:
        """The folder whose published files (remote code, generation config, config `auto_map`) a model saved from
        this source keeps: the adapter's base, else the model folder."""
        return self.base if self.base is not None else self.folder


def locate(model: str | Path, base: str | None = None, revision: str | None = None) -> ModelSource:
    """Resolve `model` (a model folder, an adapter folder or a hub id) and an adapter's base, each once.

    `revision` applies to the hub id given: `model`, or for an adapter `base` (or the base the adapter records, which
    otherwise brings its own recorded commit)."""
    name = str(model)
    folder = resolve_model_source(name, revision if is_hub_id(name) else None)
    if not (folder / "config.json").is_file() and not (folder / ADAPTER_CONFIG).is_file():
        raise ValueError(
            f"{name}: not a model folder (no config.json) nor a LoRA adapter folder (no {ADAPTER_CONFIG}); for a "
            "run's output folder, pass its final/, best/ or a checkpoint-N/ inside it"
        )
    if not is_adapter(folder):
        if base is not None:
            raise ValueError(f"--base {base}: {name} is a full model, not a LoRA adapter (drop --base)")
        return ModelSource(folder)
    if base is None:
        recorded, recorded_revision = _split_revision(adapter_base(folder))
        revision = revision or recorded_revision
        moved = snapshot_origin(recorded)  # a hub snapshot recorded on another machine (or a cleared cache)
        if moved and not Path(recorded).exists():
            recorded, revision = moved[0], revision or moved[1]
        try:
            check_model_path(recorded, f"the base model that {folder} records,")
            return ModelSource(folder, resolve_model_source(recorded, revision if is_hub_id(recorded) else None))
        except ValueError as err:
            raise ValueError(f"{err}; pass --base") from None
    return ModelSource(folder, resolve_model_source(base, revision if is_hub_id(base) else None))


def load_for_inference(
    model: str | Path | ModelSource,
    base: str | None = None,
    dtype: torch.dtype = torch.float32,
    merge: bool = True,
    revision: str | None = None,
    **kwargs,
) -> Phi3VForCausalLM:
    """A full checkpoint, or base + LoRA adapter (merged unless `merge=False`), from folders or hub ids."""
    source = model if isinstance(model, ModelSource) else locate(model, base, revision)
    if not source.adapter:
        return Phi3VForCausalLM.from_pretrained(str(source.folder), dtype=dtype, **kwargs)
    from peft import PeftModel

    base_model = Phi3VForCausalLM.from_pretrained(str(source.base), dtype=dtype, **kwargs)
    if (source.folder / "generation_config.json").is_file():  # train writes the stop ids the answers end with
        base_model.generation_config = GenerationConfig.from_pretrained(str(source.folder))
    peft_model = PeftModel.from_pretrained(base_model, str(source.folder))
    return peft_model.merge_and_unload() if merge else peft_model


def load_processor(source: ModelSource, **kwargs) -> Phi3VProcessor:
    """The processor that goes with a model or adapter (`num_crops`, `apply_exif_orientation` override)."""
    return Phi3VProcessor.from_pretrained(source.processor_folder, **kwargs)
