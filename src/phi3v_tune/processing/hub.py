"""Where a model's files are: a local folder as it is, or a Hugging Face hub id resolved once to a local snapshot.

Everything that reads a model folder (tokenizer, image-processor settings, config, weights, remote-code files) reads
the one folder this returns, so a hub id behaves exactly like the folder a user downloaded. The lowest layer that reads
model folders owns it: the processor and the model both resolve through here.

Resolution honours the hub's own settings (`HF_HOME` / `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `HF_ENDPOINT`, `HF_TOKEN`).
The hub is asked once, with a short timeout, which commit the revision names; without an answer (no network, offline
mode) the cached snapshot is used, and with no cached snapshot either, one error says so at once. huggingface_hub's
own first call has no timeout, so without this probe a host that drops packets could hang for minutes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

#: Files of other model formats that a hub repository may hold beside the safetensors weights; never needed here.
IGNORED_IN_SNAPSHOTS = ["*.onnx", "*.onnx_data", "onnx/*", "*.gguf", "*.h5", "*.msgpack", "*.tflite", "*.ot"]
#: Seconds to wait for the hub to say which commit a revision names (HF_HUB_ETAG_TIMEOUT overrides it).
PROBE_TIMEOUT_S = 5.0
_SNAPSHOT = re.compile(r"^models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_hub_id(model: str) -> bool:
    """An "org/name" that is no local path: nothing there, no leading / . ~, at most one slash, and no local
    folder named like the org (`run/final` with a `run/` folder here is a mistyped path, not a hub id)."""
    path = Path(model).expanduser()
    local = path.exists() or model.startswith(("/", ".", "~")) or model.count("/") > 1
    local = local or ("/" in model and path.parent.is_dir())
    # `tiny` / `tiny:N` name the generated test model; a hub repository name never holds ":"
    return not local and model != "tiny" and ":" not in model


#: A LoRA adapter folder's config (PEFT's file name).
ADAPTER_CONFIG = "adapter_config.json"


def check_model_path(model: str, flag: str) -> None:
    """A model given as a local path must be a model folder (not missing, not a LoRA adapter to train on top of);
    hub ids ("org/name") and "tiny" pass (nothing is downloaded here)."""
    path = Path(model).expanduser()
    if model == "tiny" or model.startswith("tiny:") or is_hub_id(model):
        return
    if not path.is_dir():
        raise ValueError(f"{flag} {model}: no such folder (expected a model folder with config.json, or a hub id)")
    if (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        raise ValueError(
            f"{flag} {model} is a LoRA adapter, not a model: merge it first (phi3v-tune export --model {model} --out "
            "DIR) and train from DIR, or train from its base model"
        )


def snapshot_origin(folder: str | Path) -> tuple[str, str] | None:
    """(hub id, commit) of a folder in the hub cache layout (`.../models--org--name/snapshots/<commit>`), else None:
    what a run that started from a hub id records as its base, so the record travels to other machines."""
    folder = Path(folder)
    if folder.parent.name != "snapshots" or not _COMMIT.match(folder.name):
        return None
    match = _SNAPSHOT.match(folder.parent.parent.name)
    return (f"{match['org']}/{match['name']}", folder.name) if match else None


def resolve_model_source(
    name: str | os.PathLike,
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local folder holding `name`: a local folder as it is; a hub id downloaded once (or found in the cache) as
    a whole snapshot at `revision` (a branch, tag or commit; default: the default branch). Raises ValueError, naming
    `name` and what to do, when it is neither."""
    path = Path(name).expanduser()
    text = str(name)
    if path.exists():
        if revision is not None:
            raise ValueError(f"{text} is a local folder: --revision applies to hub ids only")
        return path
    if not is_hub_id(text):
        raise ValueError(f"{text}: no such folder (expected a model folder, a LoRA adapter folder or a hub id)")
    offline = local_files_only or constants.HF_HUB_OFFLINE
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "local_files_only was asked for"
    kwargs = dict(revision=revision, cache_dir=cache_dir, token=token, ignore_patterns=IGNORED_IN_SNAPSHOTS)
    if not offline:
        reachable, why = _ask_hub(text, revision, token)
        if reachable:
            return Path(snapshot_download(text, **kwargs))
    try:
        return Path(snapshot_download(text, local_files_only=True, **kwargs))
    except Exception:  # noqa: BLE001 - any failure here means: not (completely) in the cache
        cache = Path(cache_dir) if cache_dir else Path(constants.HF_HUB_CACHE)
        at = f" at revision {revision}" if revision else ""
        raise ValueError(
            f"{text}: no such local folder, and it could not be loaded from the Hugging Face hub ({why}; the cache "
            f"{cache} holds no complete snapshot of it{at}). Run once with a network (HF_HUB_OFFLINE unset), set "
            "HF_HOME to the cache that holds it, or pass a local model folder"
        ) from None


def _ask_hub(name: str, revision: str | None, token: str | bool | None) -> tuple[bool, str]:
    """(True, "") when the hub answers for `name`; (False, why) when it cannot be reached. A missing repository or
    revision is an error of its own (the cache is not a fallback for a misspelt name)."""
    timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or PROBE_TIMEOUT_S)
    try:
        HfApi(token=token).repo_info(name, revision=revision, timeout=timeout)
    except GatedRepoError:
        raise ValueError(
            f"{name}: a gated model on the Hugging Face hub; accept its terms on the model page and log in "
            "(hf auth login, or set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ValueError(f"{name}: the hub has no revision {revision!r} of it (check --revision)") from None
    except RepositoryNotFoundError:
        raise ValueError(
            f"{name}: no such local folder, and no such model on the Hugging Face hub (check the spelling; a private "
            "model needs hf auth login or HF_TOKEN)"
        ) from None
    except Exception as err:  # noqa: BLE001 - no network, a proxy, a timeout, hub downtime: the cache may still help
        return False, f"the hub could not be reached: {type(err).__name__}: {err}"
    return True, ""
