"""Starting phi3v-tune in subprocesses from tests: a CPU-only environment, the torchrun prefix, tiny-model flags."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from phi3v_tune.train.distributed import free_port

REPO = Path(__file__).resolve().parents[1]

#: Train the generated tiny model on the CPU, quietly, without data-loader workers or loggers.
TINY_CPU_FLAGS = [
    "--model", "tiny", "--num-crops", "1", "--num-workers", "0", "--report-to", "none", "--no-progress", "--cpu",
]  # fmt: skip


def cpu_env() -> dict[str, str]:
    """This interpreter's environment for CPU-only child processes (gloo; also on a GPU machine), one thread each,
    this checkout's sources first, and no fault injection inherited."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PHI3V_FAULT_INJECT", None)
    return env


_PORTS: dict[int, int] = {}


def named_port(name: int) -> int:
    """A port free right now, the same one for every use of `name` in this test process (the agents of one emulated
    multi-node job share it): fixed numbers collide when two test runs share a machine."""
    if name not in _PORTS:
        _PORTS[name] = free_port()
    return _PORTS[name]


def torchrun(nproc: int, port: int, *launcher_args: str) -> list[str]:
    """`python -m torch.distributed.run` with `nproc` processes on the free port named `port` (see `named_port`; plus
    e.g. --nnodes/--node_rank), ready for `-m phi3v_tune ...`."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(named_port(port)), *launcher_args]  # fmt: skip
