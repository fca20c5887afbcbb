"""What makes a saved model folder serve like its base: the publisher's remote-code files, the base's `auto_map`s, a
generation config that stops where answers end, and a LoRA adapter config that the PEFT of the recipe's era reads.

Every folder a run or `export` writes (`final/`, each checkpoint, export output) passes through `write_serving_files`
after its weights, config and processor files are on disk:

* remote code: the `*.py` modules the base's `auto_map`s name (config.json, preprocessor_config.json,
  tokenizer_config.json) and the modules they import, copied byte for byte when the base folder has them, so
  `AutoModelForCausalLM` / `AutoProcessor` with `trust_remote_code=True` and vLLM load the folder as they load the base;
* `auto_map` in config.json and preprocessor_config.json equal to the base's (Phi-3.5-vision names one
  processing_phi3_v.py for both processor classes, Phi-3-vision-128k also image_processing_phi3_v.py);
* generation_config.json: the base's, its `eos_token_id` extended by `<|end|>` and `<|endoftext|>`, so
  `model.generate(**inputs)` and servers that read the file stop where a fine-tuned answer ends;
* adapter_config.json: keys that PEFT 0.11-0.13 do not know are left out while they hold their default value.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from transformers.dynamic_module_utils import get_relative_import_files

from ..processing.hub import snapshot_origin

#: Files whose `auto_map` may name remote code.
AUTO_MAP_FILES = ("config.json", "preprocessor_config.json", "tokenizer_config.json", "processor_config.json")
#: Files whose `auto_map` a saved folder keeps equal to its base's (the tokenizer files are copied as they are).
MATCHED_AUTO_MAPS = ("config.json", "preprocessor_config.json")
GENERATION_CONFIG = "generation_config.json"
ADAPTER_CONFIG = "adapter_config.json"

#: `LoraConfig` fields (with those of its `PeftConfig` base) of PEFT 0.11.1, the oldest PEFT of the original
#: recipe's era: a key outside this set makes `LoraConfig(**adapter_config)` fail there ("unexpected keyword").
PEFT_0_11_LORA_FIELDS = frozenset(
    {
        "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
        "init_lora_weights", "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config",
        "lora_alpha", "lora_dropout", "megatron_config", "megatron_core", "modules_to_save", "peft_type", "r",
        "rank_pattern", "revision", "target_modules", "task_type", "use_dora", "use_rslora",
    }
)  # fmt: skip
#: Bookkeeping newer PEFT writes and fills in itself when it loads an adapter; PEFT 0.11-0.13 reject it.
PEFT_BOOKKEEPING = ("peft_version",)


# --------------------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any], sort_keys: bool = False) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n", encoding="utf-8")


def _module_files(auto_map: Any) -> list[str]:
    """`processing_phi3_v.Phi3VProcessor` -> `processing_phi3_v.py` for every class an `auto_map` names (values may
    be lists, as AutoTokenizer's [slow, fast]); a reference into another repository (`org/repo--module.Class`) names
    no file of this folder."""
    refs: list[str] = []
    for value in (auto_map or {}).values():
        refs.extend(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str))
    files = [ref.rsplit(".", 1)[0].replace(".", "/") + ".py" for ref in refs if "--" not in ref and "." in ref]
    return list(dict.fromkeys(files))


def named_remote_code(folder: str | Path) -> list[str]:
    """The module files a folder's `auto_map`s name (present or not)."""
    folder = Path(folder)
    names: list[str] = []
    for config_name in AUTO_MAP_FILES:
        data = _read_json(folder / config_name) or {}
        names.extend(_module_files(data.get("auto_map")))
    return list(dict.fromkeys(names))


def remote_code_files(folder: str | Path) -> list[str]:
    """The remote-code files a folder holds: the modules its `auto_map`s name and, recursively, the modules they
    import relatively (Phi-3-vision-128k's modeling file imports image_embedding_phi3_v.py); relative paths."""
    folder = Path(folder)
    found: list[str] = []
    for name in named_remote_code(folder):
        path = folder / name
        if not path.is_file():
            continue
        found.append(name)
        for imported in get_relative_import_files(str(path)):
            if Path(imported).is_file():  # (not resolved: hub-cache files are links into blobs/)
                found.append(Path(os.path.relpath(imported, folder)).as_posix())
    return list(dict.fromkeys(found))


def missing_remote_code(folder: str | Path) -> list[str]:
    """Module files a folder's `auto_map`s name but it does not hold (`trust_remote_code` loading would fail)."""
    folder = Path(folder)
    return [name for name in named_remote_code(folder) if not (folder / name).is_file()]


def remote_code_note(folder: str | Path, shown_as: str | Path | None = None) -> str | None:
    """How to add the remote-code files a folder names but lacks (None when it lacks none); `shown_as`: the name the
    user will know the folder by (an export is written under a temporary name first)."""
    missing = missing_remote_code(folder)
    if not missing:
        return None
    folder = shown_as or folder
    repo = "microsoft/Phi-3-vision-128k-instruct" if "image_processing_phi3_v.py" in missing else (
        "microsoft/Phi-3.5-vision-instruct"
    )  # fmt: skip
    return (
        f"{folder} has no remote-code files ({', '.join(missing)}; its base model had none). It loads with phi3v_tune "
        "(import phi3v_tune, then Phi3VForCausalLM or the Auto classes); for trust_remote_code=True and vLLM add the "
        f"publisher's files: hf download {repo} {' '.join(missing)} --local-dir {folder}"
    )


def copy_remote_code(base: str | Path, folder: str | Path) -> list[str]:
    """Copy the base's remote-code files into `folder` byte for byte; returns their names."""
    base, folder = Path(base), Path(folder)
    names = remote_code_files(base)
    for name in names:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(base / name, target)  # follows hub-cache symlinks: a plain file in the saved folder
    return names


def match_auto_maps(base: str | Path, folder: str | Path) -> None:
    """`auto_map` of config.json and preprocessor_config.json as the base has it (removed where it has none)."""
    base, folder = Path(base), Path(folder)
    for name in MATCHED_AUTO_MAPS:
        theirs, ours = _read_json(base / name), _read_json(folder / name)
        if theirs is None or ours is None or theirs.get("auto_map") == ours.get("auto_map"):
            continue
        if "auto_map" in theirs:
            ours["auto_map"] = theirs["auto_map"]
        else:
            ours.pop("auto_map", None)
        _write_json(folder / name, ours, sort_keys=name == "config.json")


# --------------------------------------------------------------------------------------------------------------------
def serving_generation_config(base: str | Path | None, folder: str | Path, stop_ids: list[int]) -> dict[str, Any]:
    """The base's generation config (else the folder's, else the token ids of its config.json) with every id of
    `stop_ids` added to `eos_token_id`, its other fields kept. `_from_model_config` is dropped: the file no longer
    repeats config.json (transformers would otherwise rebuild it from there, eos 2 only)."""
    folder = Path(folder)
    sources = ([Path(base) / GENERATION_CONFIG] if base is not None else []) + [folder / GENERATION_CONFIG]
    config = next((c for c in map(_read_json, sources) if c is not None), None)
    if config is None:
        model_config = _read_json(folder / "config.json") or (_read_json(Path(base) / "config.json") if base else {})
        keys = ("bos_token_id", "eos_token_id", "pad_token_id")
        config = {k: model_config[k] for k in keys if model_config and model_config.get(k) is not None}
    eos = config.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    config["eos_token_id"] = eos + [i for i in dict.fromkeys(stop_ids) if i not in eos]
    config.pop("_from_model_config", None)
    return config


def _lora_defaults() -> dict[str, Any]:
    """The installed PEFT's `LoraConfig` defaults, as they read in JSON."""
    from peft import LoraConfig

    defaults: dict[str, Any] = {}
    for f in dataclasses.fields(LoraConfig):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        defaults[f.name] = json.loads(json.dumps(value, default=str))
    return defaults


def old_peft_adapter_config(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the adapter config without the keys PEFT 0.11-0.13 lack that hold their default value, the keys kept although
    they lack them). Newer PEFT reads the result as the same `LoraConfig` (an absent key takes its default)."""
    if str(config.get("peft_type", "")).upper() != "LORA":
        return dict(config), []
    defaults = _lora_defaults()
    out: dict[str, Any] = {}
    kept: list[str] = []
    for key, value in config.items():
        if key in PEFT_0_11_LORA_FIELDS:
            out[key] = value
        elif key in PEFT_BOOKKEEPING or (key in defaults and value == defaults[key]):
            continue
        else:
            out[key] = value
            kept.append(key)
    return out, kept


def portable_adapter_base(config: dict[str, Any]) -> dict[str, Any]:
    """An adapter trained on a hub snapshot records the hub id and commit (`revision`), valid on any machine, rather
    than this machine's cache path."""
    origin = snapshot_origin(config.get("base_model_name_or_path") or "")
    if origin is None:
        return config
    return {**config, "base_model_name_or_path": origin[0], "revision": origin[1]}


# --------------------------------------------------------------------------------------------------------------------
def write_serving_files(folder: str | Path, base: str | Path | None, stop_ids: list[int]) -> list[str]:
    """Make a saved model or adapter folder serve like `base` (the folder it was trained from or merged onto; None:
    unknown, so only the generation and adapter configs are written). Returns warnings for the user."""
    folder = Path(folder)
    warnings: list[str] = []
    if base is not None and Path(base).resolve() != folder.resolve():
        copy_remote_code(base, folder)
        match_auto_maps(base, folder)
    generation = serving_generation_config(base, folder, stop_ids)
    _write_json(folder / GENERATION_CONFIG, generation, sort_keys=True)
    adapter = _read_json(folder / ADAPTER_CONFIG)
    if adapter is not None:
        written, _ = old_peft_adapter_config(portable_adapter_base(adapter))
        _write_json(folder / ADAPTER_CONFIG, written, sort_keys=True)
        warnings += old_peft_warnings(folder)
    return warnings


def old_peft_warnings(adapter: str | Path) -> list[str]:
    """A warning naming the settings of an adapter folder that PEFT 0.11-0.13 cannot read (none: empty)."""
    path = Path(adapter) / ADAPTER_CONFIG
    written, kept = old_peft_adapter_config(_read_json(path) or {})
    if not kept:
        return []
    settings = ", ".join(f"{k}={written[k]!r}" for k in kept)
    return [
        f"{path} holds {settings}: PEFT before 0.14 (the original recipe's era) rejects settings it does not know, "
        "so only newer PEFT loads this adapter"
    ]


def loaded_from(model: Any) -> Path | None:
    """The folder a (PEFT-wrapped) model was loaded from (transformers' `name_or_path`), if it is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = getattr(base, "name_or_path", "") or ""
    return Path(name) if name and Path(name).is_dir() else None


def write_serving_files_for(folder: str | Path, model: Any, processor: Any) -> list[str]:
    """`write_serving_files` for a model being trained: its base is the folder it was loaded from, its stop ids the
    processor's (`<|end|>`, `<|endoftext|>`)."""
    return write_serving_files(folder, loaded_from(model), list(getattr(processor, "stop_token_ids", None) or []))
