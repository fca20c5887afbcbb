"""Reliability: non-finite losses stop training with step + sample ids (or are skipped within a budget)."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import data_file, small_config  # noqa: F401  (fixture and helper)

from phi3v_tune.train.checkpoints import latest_complete
from phi3v_tune.train.run import run_training


@pytest.fixture()
def poisoned(monkeypatch):
    """Every example of one record gets NaN pixels, so its batch has a NaN loss."""
    import phi3v_tune.data.dataset as dataset

    original = dataset.build_example

    def build(record, *args, **kwargs):
        example = original(record, *args, **kwargs)
        if record.id == "shape-000001" and "pixel_values" in example:
            example["pixel_values"] = torch.full_like(example["pixel_values"], float("nan"))
        return example

    monkeypatch.setattr(dataset, "build_example", build)


def test_nan_loss_stops_with_step_and_sample_ids(data_file, tmp_path, poisoned):  # noqa: F811
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError) as err:
        run_training(small_config(data_file, out, max_steps=12, save_steps=1, batch_size=1))
    message = str(err.value)
    assert "non-finite loss" in message and "shape-000001" in message and "at step" in message
    step = int(message.split("at step ")[1].split(";")[0])
    last = latest_complete(out)
    if step > 1:  # the checkpoints before the bad step are complete and untouched
        assert last is not None and last.name == f"checkpoint-{step - 1}"
    assert f"Last good checkpoint: {last or 'none yet'}" in message


def test_skip_nonfinite_skips_and_finishes(data_file, tmp_path, poisoned, capsys):  # noqa: F811
    out = tmp_path / "run"
    metrics = run_training(small_config(data_file, out, max_steps=9, batch_size=1, skip_nonfinite=2))
    assert metrics["train"]["train_loss"] == metrics["train"]["train_loss"]  # finite, not NaN
    assert "batch skipped (1/2)" in capsys.readouterr().out
    from safetensors.torch import load_file

    state = load_file(out / "final" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values())


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.slow
def test_sigkill_at_five_points_then_resume_equals_an_uninterrupted_run(data_file, tmp_path):  # noqa: F811
    """2 gloo processes; rank 0 is SIGKILLed mid-run or while a checkpoint is written; --resume finishes the run."""
    import subprocess
    from pathlib import Path

    from launch import TINY_CPU_FLAGS, cpu_env, torchrun

    env = cpu_env()

    def train(out: Path, port: int, fault: str | None = None, resume: bool = False, *extra: str) -> int:
        cmd = [*torchrun(2, port), "-m", "phi3v_tune", "train", *TINY_CPU_FLAGS, "--data", str(data_file),
               "--output-dir", str(out), "--max-steps", "6", "--batch-size", "2", "--batch-size-per-device", "1",
               "--save-steps", "2", "--seed", "3", "--learning-rate", "1e-3", "--warmup-steps", "1"]  # fmt: skip
        if resume:
            cmd.append("--resume")
        cmd += extra
        run_env = {**env, "PHI3V_FAULT_INJECT": fault} if fault else env
        proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=300)
        if proc.returncode and not fault:
            print(proc.stdout[-3000:], proc.stderr[-6000:])  # shown by pytest when the test fails
        return proc.returncode

    reference = tmp_path / "straight"
    assert train(reference, 29611) == 0
    expected = _weights(reference / "final")
    for i, fault in enumerate(
        ["kill_at_step:1", "kill_in_save:2", "kill_at_step:3", "kill_in_save:4", "kill_at_step:5"]
    ):
        out = tmp_path / f"killed-{i}"
        # with --save-total-limit 1, the previous checkpoint is deleted only once the new one is complete
        limit = ("--save-total-limit", "1") if fault == "kill_in_save:4" else ()
        assert train(out, 29621 + 2 * i, fault, False, *limit) != 0  # the run died
        assert not (out / "final").exists()
        if fault.startswith("kill_in_save"):
            step = int(fault.split(":")[1])
            assert (out / f"checkpoint-{step}").is_dir()
            assert not (out / f"checkpoint-{step}" / "checkpoint_complete.json").exists()
            if limit:
                assert (out / "checkpoint-2" / "checkpoint_complete.json").is_file()
        assert train(out, 29622 + 2 * i, None, True, *limit) == 0
        if fault.startswith("kill_in_save"):
            assert list(out.glob("incomplete-checkpoint-*"))  # never resumed from
        got = _weights(out / "final")
        for k in expected:
            assert torch.equal(expected[k], got[k]), (fault, k)
        # every epoch reported once, as in the uninterrupted run (a killed run's later reports are dropped)
        steps = [json.loads(x)["step"] for x in (out / "epoch_reports.jsonl").read_text().splitlines()]
        assert steps == [json.loads(x)["step"] for x in (reference / "epoch_reports.jsonl").read_text().splitlines()]


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(data_file, tmp_path, monkeypatch):  # noqa: F811
    import errno

    import transformers

    from phi3v_tune.train.checkpoints import MARKER

    original = transformers.PreTrainedModel.save_pretrained
    calls = {"n": 0}

    def save(self, folder, *args, **kwargs):
        if "checkpoint-4" in str(folder):
            raise OSError(errno.ENOSPC, "No space left on device")
        calls["n"] += 1
        return original(self, folder, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="could not write checkpoint-4 .*No space left.*checkpoint-2.*--resume"):
        run_training(small_config(data_file, out, max_steps=6, save_steps=2))
    assert (out / "checkpoint-2" / MARKER).is_file()
    assert not (out / "checkpoint-4" / MARKER).exists()
    assert latest_complete(out).name == "checkpoint-2"
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", original)
    run_training(small_config(data_file, out, max_steps=6, save_steps=2, resume="latest"))
    assert (out / "final" / MARKER).is_file() and list(out.glob("incomplete-checkpoint-4-*"))


def test_epoch_report_accounts_for_every_input_sample(data_file, tmp_path):  # noqa: F811
    import json

    lines = data_file.read_text().splitlines()  # 9 good samples: 3 colour, 3 shape, 3 compare
    first = json.loads(lines[0])
    dup = dict(first, conversations=[dict(first["conversations"][0], assistant="")])  # same id, empty answer
    missing = json.loads(lines[1])
    missing["id"] = "missing"
    missing["conversations"][0]["images"] = ["images/nope.png"]
    bad = tmp_path / "bad.jsonl"
    (tmp_path / "images").symlink_to(data_file.parent / "images")
    bad.write_text("\n".join([*lines, "{oops", json.dumps(dup), json.dumps(missing)]) + "\n")
    out = tmp_path / "run"
    # max_length 400: the two-image 'compare' samples (~680 tokens of images) are refused, the rest fit
    run_training(small_config(bad, out, epochs=1, batch_size=1, skip_bad_samples=True, max_length=400, eval_holdout=1))
    (report,) = [json.loads(x) for x in (out / "epoch_reports.jsonl").read_text().splitlines()]
    assert report["input_samples"] == 12
    assert report["invalid_skipped"] == 3  # broken JSON, duplicate id with empty answer, missing image
    assert report["refused"] == 3 and report["refused_reasons"] == {"images_exceed_max_length": 3}
    assert report["held_out_for_eval"] == 1
    assert report["trained"] == 5 and report["not_reached_this_epoch"] == 0 and report["nonfinite_skipped"] == 0
    parts = (
        "trained",
        "refused",
        "invalid_skipped",
        "nonfinite_skipped",
        "not_reached_this_epoch",
        "held_out_for_eval",
    )
    assert sum(report[k] for k in parts) == report["input_samples"]
    # the bad line reuses the first sample's id; the good first sample is kept (held out here), not dropped
    assert "colour-000000" in (out / "skipped_samples.tsv").read_text()
    assert json.loads((out / "metrics.json").read_text())["data"]["train_samples"] == 5


def test_gloo_run_device_is_plain_cpu_and_the_process_group_ends_before_exit(tmp_path):
    """A gloo (multi-process CPU) run, here of one process.

    1. accelerate names the device torch.device("cpu", 0), and the Trainer of transformers < 5.24 resumes the
       optimizer with map_location=args.device; torch.load cannot map to "cpu:0". Ours is plain "cpu".
    2. leave_process_group() really ends gloo (its threads are gone) although a DDP wrapper still refers to the
       group: destroy_process_group() alone leaves the threads running into interpreter shutdown.
    """
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    from phi3v_tune.train.distributed import free_port

    port = free_port()
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    env["MASTER_PORT"] = str(port)
    script = textwrap.dedent(
        f"""
        import io
        import torch
        from transformers import TrainingArguments
        from phi3v_tune.config import TrainConfig
        from phi3v_tune.train.run import training_arguments
        from phi3v_tune.train.runtime import Runtime

        cfg = TrainConfig(data="unused.jsonl", model="tiny", output_dir={str(tmp_path)!r}, cpu=True, batch_size=1,
                          batch_size_per_device=1, report_to="none")
        args = training_arguments(cfg, Runtime.resolve(cfg, world_size=1))
        assert str(args.distributed_state.distributed_type).endswith("MULTI_CPU"), args.distributed_state
        print("accelerate", TrainingArguments.device.fget(args), "ours", args.device)
        assert args.device == torch.device("cpu"), args.device
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
        optimizer.zero_grad()
        sum(p.sum() for g in optimizer.param_groups for p in g["params"]).backward()
        optimizer.step()
        buf = io.BytesIO()
        torch.save(optimizer.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, map_location=args.device, weights_only=True)
        assert state["state"][0]["exp_avg"].device.type == "cpu"

        import os, types
        from phi3v_tune.train.distributed import leave_process_group

        def gloo_threads():
            names = []
            for t in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{{t}}/comm") as f:
                    names.append(f.read().strip())
            return [n for n in names if "gloo" in n]

        linear = torch.nn.Linear(2, 2)
        ddp = torch.nn.parallel.DistributedDataParallel(linear)
        ddp(torch.ones(1, 2)).sum().backward()
        accelerator = types.SimpleNamespace(wait_for_everyone=torch.distributed.barrier, free_memory=lambda: None)
        trainer = types.SimpleNamespace(model=linear, model_wrapped=ddp, accelerator=accelerator)
        if os.path.isdir("/proc/self/task"):
            assert gloo_threads(), "expected gloo threads while the group is alive"
        del ddp
        leave_process_group(trainer)
        assert not torch.distributed.is_initialized()
        assert trainer.model_wrapped is linear
        if os.path.isdir("/proc/self/task"):
            assert not gloo_threads(), gloo_threads()
        print("clean exit")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "clean exit" in proc.stdout


def test_evaluation_samples_that_do_not_fit_stop_the_run_unless_skipped(data_file, tmp_path):  # noqa: F811
    """An evaluation metric over fewer samples than given is never silent: like training data, refused evaluation
    samples stop the run (listed in refused_eval_samples.tsv), or with --skip-bad-samples are left out and listed."""
    from phi3v_tune.data.sources import DataError

    lines = data_file.read_text().splitlines()
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(x for x in lines if '"compare' not in x) + "\n")
    (tmp_path / "images").symlink_to(data_file.parent / "images")
    out = tmp_path / "run"
    # max_length 400: the two-image 'compare' samples (~680 tokens of images) cannot be evaluated
    with pytest.raises(DataError, match=r"3 evaluation sample\(s\) cannot be evaluated.*refused_eval_samples.tsv"):
        run_training(small_config(train, out, max_steps=1, max_length=400, eval_data=str(data_file)))
    header, *refused = (out / "refused_eval_samples.tsv").read_text().splitlines()
    assert header == "id\treason\tmessage"
    assert sorted(r.split("\t")[:2] for r in refused) == [
        [f"compare-00000{i}", "images_exceed_max_length"] for i in range(3)
    ]
    run_training(small_config(train, out, max_steps=1, max_length=400, eval_data=str(data_file), skip_bad_samples=True))
    assert (out / "final").is_dir()


def test_a_resumed_runs_train_loss_is_the_whole_runs_mean():
    """Steps 1..4 logged in windows of 2 (means 4.0 and 2.0), then resumed at step 4 for 2 steps whose mean the
    Trainer reports (1.0): the run's mean is (2x4 + 2x2 + 2x1) / 6. Windows that do not end at the checkpoint's step
    cannot give the earlier steps' sum: the Trainer's value stays, and the first step it covers is named."""
    from pathlib import Path

    from phi3v_tune.train.run import resumed_step, whole_run_train_loss

    history = [{"step": 2, "loss": 4.0}, {"step": 3, "eval_loss": 9.0}, {"step": 4, "loss": 2.0}]
    assert resumed_step(Path("out/checkpoint-4")) == 4 and resumed_step(None) == 0
    assert whole_run_train_loss({"train_loss": 1.0}, history, 4, 6)["train_loss"] == pytest.approx(14 / 6)
    assert whole_run_train_loss({"train_loss": 1.0}, history, 0, 6) == {"train_loss": 1.0}  # not resumed
    assert whole_run_train_loss({"train_loss": 1.0}, history[:2], 4, 6) == {
        "train_loss": 1.0,
        "train_loss_from_step": 5,
    }


def test_a_slices_last_evaluation_is_named_by_its_step_and_a_zero_margin_has_no_sign(tmp_path):
    """A --stop-at-step slice has not finished: its closing evaluation is 'at step N', not 'after'; a margin that
    rounds to zero prints as 0.0000."""
    from phi3v_tune.train.run import run_summary

    after = {"eval_loss": 1.25, "eval_rewards/accuracies": 0.75, "eval_rewards/margins": -0.00001}
    before = {"eval_loss": 1.5, "eval_rewards/accuracies": 0.5, "eval_rewards/margins": 0.0}
    sliced = run_summary({"steps": 2, "eval_before": before, "eval_after": after, "stopped_at_step": 2}, None, tmp_path)
    assert "  eval loss before: 1.5000\n  eval loss at step 2: 1.2500\n" in sliced
    assert "  eval reward accuracy at step 2: 75.0%, margin 0.0000" in sliced
    finished = run_summary({"steps": 4, "eval_before": before, "eval_after": after}, None, tmp_path)
    assert "  eval loss after: 1.2500" in finished and "eval reward accuracy after: 75.0%, margin 0.0000" in finished
