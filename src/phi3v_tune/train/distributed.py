"""What multi-GPU training needs beyond the Trainer: consolidated final weights from ZeRO-3 / FSDP shards, a clear
stop when a partitioned DeepSpeed checkpoint is resumed on another number of GPUs, and per-rank peak memory."""

from __future__ import annotations

import gc
import json
import os
import re
import socket
from pathlib import Path
from typing import Any

import torch

# ZeRO writes one optimizer partition per data-parallel rank (`bf16_` prefix: the bf16 ZeRO-1 optimizer)
ZERO_PARTITION = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
# names that wrappers (DDP, torch.compile, FSDP1, checkpoint_wrapper) put into state-dict keys
_WRAPPER_PARTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a process group's store on one machine)."""

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# --------------------------------------------------------------------------------------------------------------------
def zero_partitions(checkpoint: str | Path) -> int | None:
    """How many ZeRO partitions (= data-parallel ranks) a Trainer checkpoint's DeepSpeed state was saved with;
    None when the folder holds no DeepSpeed state (plain DDP / single-device checkpoints: full optimizer state)."""
    folder = Path(checkpoint)
    latest = folder / "latest"  # DeepSpeed's tag file: the name of the global_stepN folder
    tags = [folder / latest.read_text().strip()] if latest.is_file() else sorted(folder.glob("global_step*"))
    for tag in tags:
        if not tag.is_dir() or tag.name.endswith("_universal"):
            continue
        ranks = {int(m.group(1)) for f in tag.iterdir() if (m := ZERO_PARTITION.match(f.name))}
        if ranks:
            return max(ranks) + 1
    return None


def saved_world_size(checkpoint: str | Path) -> int | None:
    """The number of ranks a Trainer checkpoint was written by: ZeRO partitions, else one RNG state per rank."""
    zero = zero_partitions(checkpoint)
    if zero is not None:
        return zero
    folder = Path(checkpoint)
    per_rank = list(folder.glob("rng_state_*.pth"))
    if per_rank:
        return len(per_rank)
    return 1 if (folder / "rng_state.pth").is_file() else None


def _loads_universal(deepspeed_config: str | dict | None) -> bool:
    if not deepspeed_config:
        return False
    if isinstance(deepspeed_config, (str, Path)):
        try:
            deepspeed_config = json.loads(Path(deepspeed_config).read_text())
        except (OSError, ValueError):
            return False
    return bool(deepspeed_config.get("checkpoint", {}).get("load_universal", False))


def check_resume_world_size(checkpoint: str | Path, world_size: int, deepspeed_config: str | dict | None) -> str | None:
    """Stop before training when a ZeRO checkpoint is resumed on a different number of GPUs; a note (or None) when
    a full-state checkpoint is.

    ZeRO splits the optimizer state (and, stage 3, the weights) into one file per rank; DeepSpeed cannot load N
    partitions into M ranks and fails deep inside its loader. Plain DDP checkpoints hold the full optimizer state
    and resume on any number of GPUs (the global batch stays --batch-size; only the data order from there on differs
    from an uninterrupted run).
    """
    saved = zero_partitions(checkpoint)
    if saved is None:
        before = saved_world_size(checkpoint)
        if before is not None and before != world_size:
            return (
                f"resuming on {world_size} process(es) a checkpoint written by {before}: the global batch and the "
                "schedule are unchanged, the sample order from here on differs from an uninterrupted run"
            )
        return None
    if saved == world_size:
        return None
    folder = Path(checkpoint)
    if (folder / "latest_universal").is_file() and _loads_universal(deepspeed_config):
        return None  # a universal checkpoint (ds_to_universal.py) loads on any number of ranks
    tag = (folder / "latest").read_text().strip() if (folder / "latest").is_file() else "global_stepN"
    raise RuntimeError(
        f"--resume {folder}: this DeepSpeed ZeRO checkpoint was saved by {saved} GPU(s) (one optimizer partition "
        f"per GPU in {folder / tag}), but this run has {world_size}. ZeRO cannot load partitions into a different "
        f"number of ranks. Either resume with {saved} GPU(s) (e.g. torchrun --nproc_per_node {saved} per node), or "
        f"convert it once to a universal checkpoint:\n"
        f"  python -m deepspeed.checkpoint.ds_to_universal --input_folder {folder / tag} "
        f"--output_folder {folder / (tag + '_universal')}\n"
        f"(it writes {folder / 'latest_universal'}) and add "
        '"checkpoint": {"load_universal": true} to the DeepSpeed config used for resuming.'
    )


# --------------------------------------------------------------------------------------------------------------------
def clean_key(key: str) -> str:
    """A state-dict key without wrapper names, i.e. the model's own (published) parameter name."""
    for part in _WRAPPER_PARTS:
        key = key.replace(part, "")
    return key[len("module.") :] if key.startswith("module.") else key


def gathered_state_dict(trainer) -> dict[str, torch.Tensor] | None:
    """The full model state on rank 0 (None elsewhere), keys as the model names them.

    Under ZeRO-3 and FSDP the weights are sharded: gathering is a collective, so every rank must call this. ZeRO-3
    needs `stage3_gather_16bit_weights_on_model_save` (our configs set it). Elsewhere every rank holds the full
    weights and rank 0 reads its own (no extra copy on the GPU).
    """
    acc = trainer.accelerator
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    state: dict[str, Any] | None
    if plugin is not None and plugin.zero_stage == 3:
        try:
            state = acc.get_state_dict(trainer.model_wrapped)
        except ValueError as err:
            raise ValueError(
                f"ZeRO-3 final model: {err} (configs/deepspeed/zero3.json and zero3_offload.json set it)"
            ) from err
    elif getattr(trainer, "is_fsdp_enabled", False):
        state = acc.get_state_dict(trainer.model)
    elif trainer.is_world_process_zero():
        state = acc.unwrap_model(trainer.model).state_dict()
    else:
        state = None
    if not trainer.is_world_process_zero():
        return None
    return {clean_key(k): v for k, v in (state or {}).items()}


def check_complete(state: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Every weight of the model is in the gathered state (else the saved checkpoint would silently miss some)."""
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(state))
    if missing:
        raise RuntimeError(
            f"the gathered final state misses {len(missing)} weight(s), e.g. {missing[:3]}; not writing an "
            "incomplete model (the checkpoint-N folders hold the full training state)"
        )


# --------------------------------------------------------------------------------------------------------------------
def peak_memory_per_rank(on_gpu: bool) -> list[float] | None:
    """Peak GPU memory allocated by PyTorch on each rank (GiB, rank order); None on CPU.

    A collective under torch.distributed: `on_gpu` must be the same on every rank (the run's device choice).
    """
    if not on_gpu:
        return None
    mine = round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_initialized() else 0.0
    if not is_distributed():
        return [mine]
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, mine)
    return [float(p) for p in parts]


# --------------------------------------------------------------------------------------------------------------------
def single_process_engine(deepspeed: str | None) -> None:
    """`phi3v-tune train --deepspeed ...` started without a launcher: DeepSpeed would look for MPI to learn its
    rank (and fail without mpi4py); give it the one-process group torchrun would have given."""
    if not deepspeed or "WORLD_SIZE" in os.environ:
        return
    mpi_or_slurm = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")  # launchers DeepSpeed finds ranks from
    if any(int(os.environ.get(key, "1") or 1) > 1 for key in mpi_or_slurm):
        return
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**defaults, "MASTER_PORT": str(free_port())}.items():  # the process group's store
        os.environ.setdefault(key, value)


def leave_process_group(trainer) -> None:
    """End a distributed run for good while the interpreter is fully alive: a last barrier (every rank waits for
    rank 0's writes), release the DDP wrapper / DeepSpeed engine, then destroy the process group.

    `destroy_process_group()` only unregisters the group: the DDP wrapper (its `process_group` and C++ reducer)
    still owns the ProcessGroupGloo, so gloo's worker and socket threads were still running when the interpreter
    shut down, and the group was torn down (or not) in whatever order finalization reached it while the peer exited
    at the same time; now and then a rank aborted at exit ("terminate called without an active exception").
    The wrappers go first: DeepSpeed's engine.destroy() (called by accelerate's free_memory) still talks to the
    group, and once nothing else holds the group, destroying it frees it (and joins its threads) right there.
    """
    if not is_distributed():
        return
    trainer.accelerator.wait_for_everyone()
    trainer.model_wrapped = trainer.model  # the DDP wrapper or DeepSpeed engine
    trainer.accelerator.free_memory()  # its list of prepared models holds the wrapper too; destroys a DS engine
    gc.collect()  # the Trainer and its callbacks form reference cycles
    torch.distributed.destroy_process_group()
    gc.collect()
