"""Multi-GPU benchmark: every distributed strategy at 1, 2 and 4 GPUs on a full-size random Phi-3.5-vision.

Writes a bf16 random-weight checkpoint once (published layout) and synthetic DocVQA-shape data (one document image
per sample -> num_crops 16 -> 4x4 crops, ~2.5k tokens), then for each setting and GPU count launches
`torchrun --nproc_per_node G -m phi3v_tune train ...` (FSDP2 through `accelerate launch`), batch 1 per GPU
(--per-device N: N documents packed into one row), activation checkpointing, a few steps. Per run: images/s
(images / time over the logged windows after the warm-up, the loss logged every --log-every steps so the GPU is
waited for only then, as in real training; one image per sample),
peak GiB per GPU (`peak_gpu_memory_gib_per_rank` in metrics.json), first/last loss. Every run has its own time
limit and its failure is a table row, not the end of the benchmark. The table is printed and appended to --out.

`--two-node` also emulates 2 nodes x 2 GPUs on one 4-GPU host (two torchrun agents, --nnodes 2 --node_rank 0/1,
--master_addr 127.0.0.1) and compares its loss curve with the 1-node 4-GPU run of the same setting (same seed, data).

DeepSpeed settings need deepspeed importable (see README: installed from /work/main/.whl with DS_BUILD_OPS=0).

Usage: python benchmarks/bench_multigpu.py [--gpus 1,2,4] [--settings full-zero2,...] [--steps 16] [--two-node]
       [--parallel] [--per-device 2] [--train-args '--checkpointing-layers 24']
       python benchmarks/bench_multigpu.py --dry-run     # print the commands only
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# setting -> (method, extra train flags, launcher)
SETTINGS: dict[str, tuple[str, list[str], str]] = {
    "full-zero2": ("full", ["--deepspeed", str(REPO / "configs/deepspeed/zero2.json")], "torchrun"),
    "full-zero3": ("full", ["--deepspeed", str(REPO / "configs/deepspeed/zero3.json")], "torchrun"),
    "full-zero3-offload": ("full", ["--deepspeed", str(REPO / "configs/deepspeed/zero3_offload.json")], "torchrun"),
    "full-fsdp2": ("full", [], "accelerate"),
    "freeze-vision-ddp": ("freeze-vision", [], "torchrun"),
    "lora-ddp": ("lora", [], "torchrun"),
    "qlora-ddp": ("qlora", [], "torchrun"),
}
DEFAULT_SETTINGS = "full-zero2,full-zero3,full-fsdp2,freeze-vision-ddp,lora-ddp,qlora-ddp"


@dataclass
class Run:
    setting: str
    gpus: int
    command: list[str]
    output_dir: Path
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RunOptions:
    """What every run of one benchmark shares besides its setting and GPU count."""

    steps: int = 16
    log_every: int = 4  # log (and so wait for the GPU) every N steps, as --log-every
    per_device: int = 1  # documents per GPU per step, packed into one row when more than 1
    train_args: tuple[str, ...] = ()  # extra `phi3v-tune train` flags, after the setting's own


def train_flags(setting: str, model: Path, data: Path, out: Path, gpus: int, opts: RunOptions) -> list[str]:
    """The `phi3v-tune train` flags of a run: global batch = GPUs x per_device, no accumulation, then the setting's
    flags and the extra ones."""
    method, extra, _ = SETTINGS[setting]
    return [
        "--model", str(model), "--data", str(data), "--method", method, "--bf16", "--num-crops", "16",
        "--gradient-checkpointing", "--batch-size", str(gpus * opts.per_device),
        "--batch-size-per-device", str(opts.per_device), "--max-steps", str(opts.steps), "--warmup-steps", "0",
        "--learning-rate", "1e-5", "--logging-steps", str(opts.log_every), "--no-save-checkpoints",
        "--report-to", "none", "--no-progress", "--num-workers", "2", "--seed", "0", "--output-dir", str(out),
        *extra, *opts.train_args,
    ]  # fmt: skip


def build_run(
    setting: str, gpus: int, model: Path, data: Path, work: Path, port: int, opts: RunOptions = RunOptions()
) -> Run:
    """One run of `setting` on `gpus` GPUs of this host."""
    out = work / f"run-{setting}-{gpus}gpu"
    flags = train_flags(setting, model, data, out, gpus, opts)
    if SETTINGS[setting][2] == "accelerate":
        head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "configs/accelerate/fsdp2.yaml"), "--num_processes", str(gpus),
                "--main_process_port", str(port)]  # fmt: skip
    else:
        head = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(gpus),
            "--master_port",
            str(port),
        ]
    env = {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus))}
    return Run(setting, gpus, [*head, "-m", "phi3v_tune", "train", *flags], out, env)


def two_node_runs(
    setting: str, model: Path, data: Path, work: Path, port: int, opts: RunOptions = RunOptions()
) -> list[Run]:
    """Two torchrun agents on one host, 2 GPUs each, as node 0 and node 1 of a 2-node job (shared output folder)."""
    out = work / f"run-{setting}-2x2node"
    flags = train_flags(setting, model, data, out, 4, opts)
    runs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "phi3v_tune", "train", *flags]  # fmt: skip
        runs.append(Run(setting, 4, cmd, out, {"CUDA_VISIBLE_DEVICES": f"{2 * node},{2 * node + 1}"}))
    return runs


# --------------------------------------------------------------------------------------------------------------------
def read_result(out: Path, warmup: int) -> dict[str, Any]:
    """images/s, peak GiB per GPU and the loss curve of a finished run folder (metrics.json's log history; the
    newest checkpoint's trainer_state.json for runs that predate it).

    `warmup` counts optimizer steps; logs at or before it are left out. Every logged window holds the same number
    of steps (and images), so the run's rate, total images / total time, is the harmonic mean of the window rates."""
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
    history = metrics.get("log_history")
    if history is None:
        states = sorted(out.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
        if not states:
            raise FileNotFoundError(f"{out}: no metrics.json log history and no checkpoint-*/trainer_state.json")
        history = json.loads(states[-1].read_text())["log_history"]
    logs = [h for h in history if "loss" in h]
    timed = [h for i, h in enumerate(logs) if h.get("step", i + 1) > warmup]
    rates = [h["train_samples_per_second"] for h in timed if h.get("train_samples_per_second")]
    peaks = metrics.get("peak_gpu_memory_gib_per_rank") or []
    return {
        "img_per_s": round(statistics.harmonic_mean(rates), 3) if rates else None,
        "rates": rates,  # every timed window's rate: how noisy the figure is
        "peak_gib": round(max(peaks), 2) if peaks else None,
        "losses": [h["loss"] for h in logs],
        "steps": len(logs),
    }


def compare_losses(a: list[float], b: list[float]) -> float | None:
    """Largest per-step difference between two loss curves (None when they have no steps in common)."""
    pairs = list(zip(a, b))
    return max(abs(x - y) for x, y in pairs) if pairs else None


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| setting | GPUs | img/s | img/s per GPU | peak GiB/GPU | first loss | last loss | wall s | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = r.get("img_per_s")
        per = round(rate / r["gpus"], 3) if rate else None
        losses = r.get("losses") or [None]
        cells = [r["setting"], r["gpus"], rate, per, r.get("peak_gib"), losses[0], losses[-1], r.get("wall_s"),
                 r.get("status", "")]  # fmt: skip
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
def launch(runs: list[Run], timeout: float, log: Path) -> None:
    """Start the run(s) together (several for the multi-node emulation), wait, raise on failure or timeout."""
    log.parent.mkdir(parents=True, exist_ok=True)
    procs = []
    with open(log, "w") as fh:
        for run in runs:
            env = {**os.environ, **run.env, "PYTHONPATH": os.pathsep.join(
                [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
            procs.append(subprocess.Popen(run.command, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                          start_new_session=True))  # fmt: skip
        deadline = time.time() + timeout
        try:
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, 9)  # the launcher and its workers (a session of their own)
            raise TimeoutError(f"over {timeout:.0f} s") from None
    codes = [p.returncode for p in procs]
    if any(codes):
        text = log.read_text(errors="replace")
        errors = [line for line in text.splitlines() if "Error" in line or "error:" in line][-3:]
        raise RuntimeError(f"exit codes {codes}; log {log}; {' / '.join(errors)} ...{text[-800:]}")


def execute(runs: list[Run], timeout: float, warmup: int, keep: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"setting": runs[0].setting, "gpus": runs[0].gpus}
    t = time.time()
    try:
        launch(runs, timeout, runs[0].output_dir.with_suffix(".log"))
        row.update(read_result(runs[0].output_dir, warmup), status="ok")
    except TimeoutError as err:
        if (runs[0].output_dir / "metrics.json").is_file():  # training and its metrics finished; the exit did not
            row.update(read_result(runs[0].output_dir, warmup), status=f"ok; the processes did not exit: {err}")
        else:
            row["status"] = f"FAILED: TimeoutError: {err}"
    except Exception as err:  # one failed setting is a row of the table, the rest still run
        row["status"] = f"FAILED: {type(err).__name__}: {str(err)[-300:]}".replace("\n", " ").replace("|", "/")
    row["wall_s"] = round(time.time() - t, 1)
    logs_dir = os.environ.get("PHI3V_BENCH_LOGS")
    if logs_dir:  # keep every run's log (the run folders go)
        Path(logs_dir).mkdir(parents=True, exist_ok=True)
        log = runs[0].output_dir.with_suffix(".log")
        if log.is_file():
            shutil.copy(log, Path(logs_dir) / log.name)
    if not keep:
        shutil.rmtree(runs[0].output_dir, ignore_errors=True)  # a full run's checkpoint is tens of GB
    print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    return row


def gpus_of(run: Run) -> int:
    """GPUs one launcher of a run uses (its CUDA_VISIBLE_DEVICES)."""
    return len(run.env["CUDA_VISIBLE_DEVICES"].split(","))


def device_count(runs: list[Run]) -> int:
    """GPUs a plan item occupies (the two agents of the 2-node emulation count 2 each)."""
    return sum(gpus_of(r) for r in runs)


def assign(runs: list[Run], ids: list[int]) -> list[Run]:
    """The same runs on the given physical GPU ids (in order, each run taking as many as it had)."""
    out, i = [], 0
    for r in runs:
        n = gpus_of(r)
        out.append(Run(r.setting, r.gpus, r.command, r.output_dir,
                       {**r.env, "CUDA_VISIBLE_DEVICES": ",".join(str(x) for x in ids[i:i + n])}))  # fmt: skip
        i += n
    return out


def run_parallel(plan: list[list[Run]], total: int, job) -> list[dict[str, Any]]:
    """Run plan items side by side on disjoint GPUs of this host (in plan order, smaller ones filling gaps);
    `job(runs)` returns an item's row. Rows come back in plan order."""
    import threading

    free = list(range(total))
    cond = threading.Condition()
    rows: list[dict[str, Any] | None] = [None] * len(plan)
    pending = list(range(len(plan)))
    too_big = [i for i in pending if device_count(plan[i]) > total]
    if too_big:
        raise ValueError(f"runs need more than the {total} GPUs here: {[plan[i][0].setting for i in too_big]}")

    def work(i: int, ids: list[int]) -> None:
        try:
            rows[i] = job(assign(plan[i], ids))
        finally:
            with cond:
                free.extend(ids)
                cond.notify_all()

    threads = []
    with cond:
        while pending:
            started = False
            for i in list(pending):
                n = device_count(plan[i])
                if n <= len(free):
                    ids, free[:] = sorted(free)[:n], sorted(free)[n:]
                    pending.remove(i)
                    t = threading.Thread(target=work, args=(i, ids), daemon=True)
                    t.start()
                    threads.append(t)
                    started = True
            if pending and not started:
                cond.wait()
    for t in threads:
        t.join()
    return [r for r in rows if r is not None]


def prepare(model_dir: Path, work: Path, samples: int) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_train_check import build_checkpoint, write_data

    if not (model_dir / "config.json").is_file():
        build_checkpoint(model_dir)
    data = work / "data" / "train.jsonl"
    if not data.is_file():
        data = write_data(work / "data", samples)
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="1,2,4", help="GPU counts to run each setting on")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS, help=f"comma list of {', '.join(SETTINGS)}")
    ap.add_argument(
        "--runs",
        default=None,
        help="explicit SETTING:GPUS list instead of --settings x --gpus, e.g. lora-ddp:1,full-zero2:4",
    )
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps per run, warm-up included")
    ap.add_argument("--warmup", type=int, default=4, help="optimizer steps left out of img/s (compile, allocator)")
    ap.add_argument(
        "--log-every",
        type=int,
        default=4,
        help="log (and so wait for the GPU) every N steps; img/s is measured over these windows. 1 makes every "
        "step start from an empty GPU queue, which slows host-bound runs (qlora) unlike real training",
    )
    ap.add_argument(
        "--timeout", type=float, default=900, help="seconds per run (compile adds ~1 min to the first step)"
    )
    ap.add_argument("--work", default="/tmp/phi3v-multigpu", help="folder for the data and the run folders")
    ap.add_argument("--model-dir", default="/dev/shm/phi3v-random", help="random checkpoint (written if missing)")
    ap.add_argument(
        "--out", default=str(REPO / "benchmarks" / "multigpu_results.md"), help="markdown file the table is appended to"
    )
    ap.add_argument("--port", type=int, default=29710, help="first rendezvous port (one per run)")
    ap.add_argument("--two-node", action="store_true", help="also emulate 2 nodes x 2 GPUs (needs 4 GPUs)")
    ap.add_argument("--two-node-setting", default="lora-ddp", help="the setting --two-node emulates")
    ap.add_argument("--keep", action="store_true", help="keep the run folders")
    ap.add_argument(
        "--parallel",
        action="store_true",
        help="run settings side by side on disjoint GPUs of this host (e.g. four 1-GPU runs at once) to save time",
    )
    ap.add_argument(
        "--per-device",
        type=int,
        default=1,
        help="documents per GPU per step (more than 1: packed into one row, as training does by default)",
    )
    ap.add_argument(
        "--train-args",
        default="",
        help="extra phi3v-tune train flags for every run, one quoted string, e.g. '--checkpointing-layers 24'",
    )
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = ap.parse_args(argv)
    work, model = Path(args.work), Path(args.model_dir)
    settings = [s for s in args.settings.split(",") if s]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        ap.error(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    if args.log_every < 1 or args.warmup % args.log_every or args.steps % args.log_every:
        ap.error("--warmup and --steps must be multiples of --log-every (whole timed windows)")
    if args.steps <= args.warmup:
        ap.error("--steps must be more than --warmup")
    gpus = [int(g) for g in args.gpus.split(",")]
    data = work / "data" / "train.jsonl"
    pairs = [(s, g) for s in settings for g in gpus]
    if args.runs:
        pairs = [(r.split(":")[0], int(r.split(":")[1])) for r in args.runs.split(",")]
        unknown = [s for s, _ in pairs if s not in SETTINGS]
        if unknown:
            ap.error(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    gpus = sorted({g for _, g in pairs} | ({4} if args.two_node else set()))
    opts = RunOptions(args.steps, args.log_every, args.per_device, tuple(shlex.split(args.train_args)))
    plan = [[build_run(s, g, model, data, work, args.port + i, opts)] for i, (s, g) in enumerate(pairs)]
    if args.two_node:
        plan.append([build_run(args.two_node_setting, 4, model, data, work, args.port + 90, opts)])
        plan.append(two_node_runs(args.two_node_setting, model, data, work, args.port + 91, opts))
    if args.dry_run:
        for runs in plan:
            for run in runs:
                env = " ".join(f"{k}={v}" for k, v in run.env.items())
                print(env, " ".join(run.command))
        return 0

    import torch

    data = prepare(model, work, samples=max(gpus) * args.per_device * args.steps + 8)

    def job(runs: list[Run]) -> dict[str, Any]:
        row = execute(runs, args.timeout, args.warmup, keep=args.keep)
        print("ROW", json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
        return row

    if args.parallel:
        rows = run_parallel(plan, torch.cuda.device_count(), job)
    else:
        rows = [job(runs) for runs in plan]
    text = table(rows)
    if args.two_node:
        one, two = rows[-2], rows[-1]
        two["setting"] += " (2 nodes x 2)"
        diff = compare_losses(one.get("losses") or [], two.get("losses") or [])
        text = (
            table(rows) + f"\n\n2-node emulation vs 1 node x 4 GPUs ({args.two_node_setting}): largest per-step loss "
        )
        text += f"difference {diff} over {min(len(one.get('losses') or []), len(two.get('losses') or []))} steps\n"
        text += f"losses 1x4: {one.get('losses')}\nlosses 2x2: {two.get('losses')}"
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    header = (f"\n## bench_multigpu {time.strftime('%Y-%m-%d %H:%M')}, {torch.cuda.device_count()} x {card}, "
              f"torch {torch.__version__}\n`python benchmarks/bench_multigpu.py {' '.join(argv or sys.argv[1:])}`; "
              f"batch {args.per_device} per GPU, num_crops 16 (4x4 crops, ~2.5k tokens), activation checkpointing, "
              f"bf16{(', ' + args.train_args) if args.train_args else ''}, "
              f"{args.steps} steps, img/s = images / time over the {args.log_every}-step windows after {args.warmup} "
              f"warm-up steps"
              f"{'; runs side by side on disjoint GPUs (--parallel)' if args.parallel else ''}\n\n")  # fmt: skip
    print(header + text, flush=True)
    with open(args.out, "a", encoding="utf-8") as f:
        f.write(header + text + "\n")
    return 0 if all(str(r.get("status", "")).startswith("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
