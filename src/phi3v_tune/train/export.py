"""`phi3v-tune export` (alias `merge`): a run's model -> a folder that serves like the published one.

The source is a run folder (its `final/`), `final/`, a checkpoint, a LoRA adapter (merged onto the base it records,
or `--base`), a model folder or a hub id. The output holds the weights in the published layout and dtype (sharded
safetensors with an index), the processor and tokenizer files as the base had them, the publisher's remote-code files
and `auto_map`s, a generation config that stops where answers end, the run's `train_config.yaml` and a model card.
It is written into a temporary sibling folder and renamed into place at the end: a failure on the way (a full disk)
leaves no folder that looks complete, and an existing folder is only replaced with `overwrite`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from huggingface_hub import HfApi

from ..model.loading import ModelSource, load_for_inference, load_processor, locate
from ..model.serving_files import old_peft_warnings, remote_code_files, remote_code_note, write_serving_files
from ..processing.hub import snapshot_origin
from .checkpoints import is_complete
from .model_card import VLLM_FLAGS, CardFacts, model_card, run_evaluation

DTYPES = ("bfloat16", "float16", "float32")
TRAIN_CONFIG = "train_config.yaml"


@dataclass
class ExportResult:
    folder: Path
    source: ModelSource
    shards: int
    warnings: list[str] = field(default_factory=list)
    pushed_to: str | None = None


def run_model_folder(path: str | Path) -> Path | str:
    """A run's output folder stands for its `final/` model; anything else is taken as it is."""
    path = Path(path)
    final = path / "final"
    has_model = any((path / n).is_file() for n in ("config.json", "adapter_config.json"))
    return final if not has_model and final.is_dir() and is_complete(final) else path


def check_target(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse to replace an existing folder without `overwrite`, and always refuse to replace the source."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out} already exists; pass --overwrite to replace it")
    here, there = out.resolve(), source.resolve()
    if here == there or here in there.parents:
        raise ValueError(f"--out {out} holds the model being exported ({source}); choose another folder")


def export_model(
    model: str | Path,
    out: str | Path,
    *,
    base: str | None = None,
    revision: str | None = None,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    push_to_hub: str | None = None,
    private: bool = False,
) -> ExportResult:
    """Write the serving folder `out` for `model` (see the module docstring); push it to the hub repo `push_to_hub`
    when given."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    name = run_model_folder(model) if Path(model).exists() else model
    source = locate(name, base, revision)
    check_target(out, source.folder, overwrite)
    merged = load_for_inference(source, dtype=torch.float32)  # merged in fp32, then rounded once
    merged = merged.to(getattr(torch, dtype))
    processor = load_processor(source)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        processor.save_pretrained(tmp)
        settings = {}
        if (source.folder / TRAIN_CONFIG).is_file():  # how it was trained (eval/predict read --video-frames there)
            shutil.copyfile(source.folder / TRAIN_CONFIG, tmp / TRAIN_CONFIG)
            settings = yaml.safe_load((tmp / TRAIN_CONFIG).read_text()) or {}
        warnings = write_serving_files(tmp, source.weights_base, processor.stop_token_ids)
        if source.adapter:  # the adapter as trained, should it be shipped too
            warnings += old_peft_warnings(source.folder)
        shards = len(list(tmp.glob("*.safetensors")))
        facts = CardFacts(
            name=push_to_hub or str(out),
            base_model=_hub_id(source),
            dtype=dtype,
            shards=shards,
            settings=settings,
            evaluation=run_evaluation(source.folder),
            remote_code=remote_code_files(tmp),
            remote_code_note=remote_code_note(tmp, shown_as=out),
        )
        (tmp / "README.md").write_text(model_card(facts), encoding="utf-8")
        _move_into_place(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise OSError(
                f"could not write {out} ({err.strerror or err}); nothing was written there (an existing folder is "
                "left as it was)"
            ) from err
        raise
    result = ExportResult(out, source, shards, warnings)
    if push_to_hub:
        result.pushed_to = upload(out, push_to_hub, private)
    return result


def _hub_id(source: ModelSource) -> str | None:
    """The base model's hub id, when the weights came from a hub snapshot."""
    origin = snapshot_origin(source.weights_base)
    return origin[0] if origin else None


def _move_into_place(tmp: Path, out: Path) -> None:
    """`tmp` becomes `out`; an existing `out` is set aside first and removed once the new one is in place."""
    old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old.exists():
            os.replace(old, out)  # the folder that was there, back under its name
        raise
    shutil.rmtree(old, ignore_errors=True)


def upload(folder: Path, repo_id: str, private: bool = False) -> str:
    """Create the hub model repository if needed and upload the folder; returns the commit URL."""
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=str(folder),
        commit_message=f"Upload {folder.name} (exported with phi3v-tune)",
    )
    return str(getattr(commit, "commit_url", commit))


def report(result: ExportResult) -> str:
    """What `phi3v-tune export` prints."""
    kind = "LoRA adapter merged onto its base" if result.source.adapter else "model"
    lines = [f"exported {result.source.folder} ({kind}) to {result.folder}: {result.shards} safetensors file(s)"]
    files = remote_code_files(result.folder)
    note = remote_code_note(result.folder)
    lines.append(
        f"  remote code: {', '.join(files)}" if files else f"  note: {note}" if note else "  remote code: none"
    )
    lines += [f"  warning: {w}" for w in result.warnings]
    if result.pushed_to:
        lines.append(f"  uploaded: {result.pushed_to}")
    lines.append(f"  serve: vllm serve {result.folder} {VLLM_FLAGS}")
    return "\n".join(lines)
