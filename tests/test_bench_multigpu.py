"""benchmarks/bench_multigpu.py on a CPU: the commands it would launch and how it reads a finished run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_multigpu", REPO / "benchmarks" / "bench_multigpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_multigpu"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_commands_per_strategy_and_two_node_emulation(tmp_path):
    bench = _bench()
    m, d = Path("/m"), Path("/d/train.jsonl")
    zero3 = bench.build_run("full-zero3", 2, m, d, tmp_path, 29700, bench.RunOptions(8))
    cmd = " ".join(zero3.command)
    assert "torch.distributed.run --nproc_per_node 2 --master_port 29700 -m phi3v_tune train" in cmd
    assert "configs/deepspeed/zero3.json" in cmd and "--batch-size 2 --batch-size-per-device 1" in cmd
    assert "--gradient-checkpointing" in cmd and zero3.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    fsdp = " ".join(bench.build_run("full-fsdp2", 4, m, d, tmp_path, 29701, bench.RunOptions(8)).command)
    assert "accelerate.commands.launch --config_file" in fsdp and "fsdp2.yaml --num_processes 4" in fsdp
    assert "--method qlora" in " ".join(
        bench.build_run("qlora-ddp", 1, m, d, tmp_path, 29702, bench.RunOptions(8)).command
    )
    nodes = bench.two_node_runs("lora-ddp", m, d, tmp_path, 29790, bench.RunOptions(8))
    assert [r.env["CUDA_VISIBLE_DEVICES"] for r in nodes] == ["0,1", "2,3"]
    for rank, run in enumerate(nodes):
        text = " ".join(run.command)
        assert f"--nnodes 2 --nproc_per_node 2 --node_rank {rank} --master_addr 127.0.0.1 --master_port 29790" in text
        assert "--batch-size 4 " in text and run.output_dir == nodes[0].output_dir


def test_dry_run_prints_every_command(capsys, tmp_path):
    bench = _bench()
    assert bench.main(["--dry-run", "--gpus", "1,2", "--two-node", "--work", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 * 2 + 1 + 2  # settings x GPU counts, the 1x4 reference, the two node agents


def test_reads_rate_peak_and_losses_of_a_run(tmp_path):
    bench = _bench()
    ck = tmp_path / "checkpoint-5"
    ck.mkdir()
    history = [{"loss": 3.0 - 0.1 * i, "train_samples_per_second": r} for i, r in enumerate([0.5, 1.0, 2.0, 2.2, 2.1])]
    (ck / "trainer_state.json").write_text(json.dumps({"log_history": [*history, {"train_runtime": 9.0}]}))
    (tmp_path / "metrics.json").write_text(json.dumps({"peak_gpu_memory_gib_per_rank": [40.1, 41.256]}))
    got = bench.read_result(tmp_path, warmup=2)
    assert got["img_per_s"] == 2.097 and got["peak_gib"] == 41.26 and got["steps"] == 5
    assert bench.compare_losses(got["losses"], [x + 0.01 for x in got["losses"]]) < 0.011
    row = {"setting": "lora-ddp", "gpus": 2, "status": "ok", "wall_s": 3.0, **got}
    text = bench.table([row, {"setting": "full-zero3", "gpus": 4, "status": "FAILED: x"}])
    assert "| lora-ddp | 2 | 2.097 | 1.048 | 41.26 | 3.0 |" in text and "| full-zero3 | 4 |" in text


def test_reads_a_run_without_checkpoints_from_metrics_json(tmp_path):
    """Benchmark runs use --no-save-checkpoints: the log history comes from metrics.json."""
    bench = _bench()
    history = [{"loss": 2.0, "train_samples_per_second": r} for r in [0.5, 1.0, 3.0, 3.2]]
    metrics = {"log_history": [*history, {"train_runtime": 4.0}], "peak_gpu_memory_gib_per_rank": [20.0, 21.5]}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    got = bench.read_result(tmp_path, warmup=2)
    assert got["img_per_s"] == 3.097 and got["peak_gib"] == 21.5 and got["steps"] == 4
    with pytest.raises(FileNotFoundError, match="no metrics.json log history"):
        bench.read_result(tmp_path / "missing", warmup=0)


def test_parallel_runs_share_the_host_on_disjoint_gpus(tmp_path):
    """--parallel: items start as soon as enough GPUs are free, never two on one GPU, rows in plan order."""
    import threading
    import time

    bench = _bench()
    m, d = Path("/m"), Path("/d/train.jsonl")
    plan = [[bench.build_run("full-zero2", 2, m, d, tmp_path, 29700, bench.RunOptions(4))],
            [bench.build_run("lora-ddp", 1, m, d, tmp_path, 29701, bench.RunOptions(4))],
            [bench.build_run("qlora-ddp", 1, m, d, tmp_path, 29702, bench.RunOptions(4))],
            [bench.build_run("lora-ddp", 4, m, d, tmp_path, 29703, bench.RunOptions(4))],
            bench.two_node_runs("lora-ddp", m, d, tmp_path, 29704, bench.RunOptions(4))]  # fmt: skip
    busy: set[int] = set()
    lock = threading.Lock()
    seen = []

    def job(runs):
        ids = [int(x) for r in runs for x in r.env["CUDA_VISIBLE_DEVICES"].split(",")]
        with lock:
            assert not busy & set(ids), (busy, ids)
            busy.update(ids)
            seen.append((runs[0].setting, runs[0].gpus, sorted(ids), time.time()))
        time.sleep(0.2)
        with lock:
            busy.difference_update(ids)
        return {"setting": runs[0].setting, "gpus": runs[0].gpus, "ids": ids}

    rows = bench.run_parallel(plan, 4, job)
    assert [(r["setting"], r["gpus"]) for r in rows] == [
        ("full-zero2", 2), ("lora-ddp", 1), ("qlora-ddp", 1), ("lora-ddp", 4), ("lora-ddp", 4)]  # fmt: skip
    assert sorted(rows[-1]["ids"]) == [0, 1, 2, 3] and len(rows[-1]["ids"]) == 4
    starts = {(s, g): t for s, g, _, t in seen}
    assert abs(starts[("full-zero2", 2)] - starts[("qlora-ddp", 1)]) < 0.1  # the first three ran together
    with pytest.raises(ValueError, match="more than the 2 GPUs"):
        bench.run_parallel(plan, 2, job)


def test_windowed_rate_skips_warmup_steps_and_weights_windows_by_time(tmp_path):
    """--log-every 4: logs at steps 4, 8, 12; warm-up 4 leaves two windows whose images / time is the rate."""
    bench = _bench()
    history = [{"loss": 2.0, "step": s, "train_samples_per_second": r} for s, r in [(4, 0.2), (8, 2.0), (12, 4.0)]]
    (tmp_path / "metrics.json").write_text(json.dumps({"log_history": history}))
    got = bench.read_result(tmp_path, warmup=4)
    assert got["rates"] == [2.0, 4.0] and got["img_per_s"] == 2.667  # 8 images in 2 s + 1 s
    cmd = " ".join(
        bench.build_run("qlora-ddp", 2, Path("/m"), Path("/d"), tmp_path, 29700, bench.RunOptions(16, 4)).command
    )
    assert "--max-steps 16 " in cmd and "--logging-steps 4 " in cmd
    with pytest.raises(SystemExit):
        bench.main(["--dry-run", "--steps", "10", "--log-every", "4"])


def test_a_run_that_trained_but_did_not_exit_keeps_its_figures(tmp_path, monkeypatch):
    """A run killed at its time limit after writing metrics.json (stuck at exit) is reported, and says so."""
    bench = _bench()
    run = bench.build_run("qlora-ddp", 2, Path("/m"), Path("/d"), tmp_path, 29700, bench.RunOptions(8, 4))
    run.output_dir.mkdir(parents=True)
    history = [{"loss": 2.0, "step": s, "train_samples_per_second": 4.0} for s in (4, 8)]
    (run.output_dir / "metrics.json").write_text(json.dumps({"log_history": history}))

    def timed_out(*a, **k):
        raise TimeoutError("over 180 s")

    monkeypatch.setattr(bench, "launch", timed_out)
    row = bench.execute([run], timeout=180, warmup=4, keep=True)
    assert row["img_per_s"] == 4.0 and row["status"] == "ok; the processes did not exit: over 180 s"
    (run.output_dir / "metrics.json").unlink()
    assert bench.execute([run], 180, 4, keep=True)["status"] == "FAILED: TimeoutError: over 180 s"


def test_documents_per_gpu_and_extra_train_flags_reach_every_command(tmp_path, capsys):
    """--per-device 2 --train-args '--checkpointing-layers 24': batch = GPUs x 2, flags appended to every run."""
    bench = _bench()
    argv = ["--dry-run", "--runs", "qlora-ddp:4", "--two-node", "--two-node-setting", "qlora-ddp", "--per-device", "2",
            "--train-args", "--checkpointing-layers 24", "--work", str(tmp_path)]  # fmt: skip
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 1 + 2
    for line in lines:
        assert "--batch-size 8 --batch-size-per-device 2" in line and line.endswith("--checkpointing-layers 24")
