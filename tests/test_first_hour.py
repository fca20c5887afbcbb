"""A new user's first hour: flags that mean what they say, checks before the model loads, defaults that train or
say why not, recipes on small data, one run per output folder, validation of prediction input."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from test_train import data_file, small_config  # noqa: F401  (fixture and helper)

from phi3v_tune.cli import build_parser, main
from phi3v_tune.config import TrainConfig, resolve
from phi3v_tune.data import DataError
from phi3v_tune.data.synthetic import demo_split, write_jsonl
from phi3v_tune.train import run
from phi3v_tune.train.run import Schedule, run_training


def parse_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
def test_lr_is_an_alias_and_prefixes_are_never_guessed(capsys):
    args = build_parser().parse_args(["train", "--lr", "1e-3", "--data", "x.jsonl"])
    assert resolve(args).learning_rate == 1e-3
    err = parse_error(["train", "--lr-sched", "cosine", "--data", "x.jsonl"], capsys)  # no prefix matching
    assert "unrecognized arguments: --lr-sched cosine" in err
    assert "--epoch: did you mean --epochs" in parse_error(["train", "--epoch", "2"], capsys)


def test_a_flag_error_is_not_buried_under_the_whole_usage(capsys):
    """train has some 150 flags: the error follows a one-line usage pointing at --help, not 80 lines of it."""
    err = parse_error(["train", "--data", "x.jsonl", "--lerning-rate", "3"], capsys)
    assert err.splitlines() == [
        "usage: phi3v-tune train [flags] (every flag: phi3v-tune train --help)",
        "phi3v-tune train: error: unrecognized arguments: --lerning-rate 3",
        "  --lerning-rate: did you mean --learning-rate",
    ]


def test_a_misspelt_yaml_setting_names_its_file_and_the_setting_meant(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lerning_rate: 1e-4\n")
    with pytest.raises(ValueError) as err:
        resolve(build_parser().parse_args(["train", "--config", str(config), "--data", "x.jsonl"]))
    assert str(err.value) == (
        f"{config}: unknown setting 'lerning_rate' (did you mean 'learning_rate'? see `phi3v-tune train --help`)"
    )


@pytest.mark.parametrize(
    "spelling, ours",
    [
        ("--learning_rate", "--learning-rate"),
        ("--num_train_epochs", "--epochs"),
        ("--per_device_train_batch_size", "--batch-size-per-device"),
        ("--gradient_accumulation_steps", "--batch-size"),
        ("--output_dir", "--output-dir"),
        ("--lr_scheduler_type", "--lr-scheduler"),
    ],
)
def test_hugging_face_spellings_get_ours(spelling, ours, capsys):
    err = parse_error(["train", spelling, "3"], capsys)
    assert f"{spelling}: did you mean {ours}" in err


def test_eval_batch_size_is_not_the_training_batch(capsys):
    err = parse_error(["eval", "--model", "m", "--data", "d", "--metric", "anls", "--batch-size", "4"], capsys)
    assert "--batch-size: did you mean --eval-batch-size" in err
    args = build_parser().parse_args(
        ["eval", "--model", "m", "--data", "d", "--metric", "anls", "--eval-batch-size", "4"]
    )
    assert args.eval_batch_size == 4


def test_an_unknown_schedule_fails_before_anything_loads():
    with pytest.raises(ValueError, match="--lr-scheduler cosinus: unknown schedule; transformers knows linear, cosine"):
        TrainConfig(data="x.jsonl", lr_scheduler="cosinus").validate()


def no_model(monkeypatch):
    """Any attempt to load the model fails the test: the checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(run, "load_model", refuse)


def test_a_batch_that_does_not_divide_fails_before_the_data_and_model_load(data_file, tmp_path, monkeypatch):  # noqa: F811
    no_model(monkeypatch)
    monkeypatch.setattr(run, "read_data", lambda *a, **k: pytest.fail("the data was read before the check"))
    with pytest.raises(ValueError, match="--batch-size 3 must be a multiple of --batch-size-per-device x devices = 2"):
        run_training(small_config(data_file, tmp_path / "x", batch_size=3, batch_size_per_device=2))


# --------------------------------------------------------------------------------------------------------------------
def test_defaults_on_a_small_set_warn_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """40 samples with the defaults (global batch 64, 50 warm-up steps): one optimizer step at learning rate 0. The
    run says so, naming the flags and the numbers, before the model loads."""
    rows, _ = demo_split(10, 0, seed=1, tasks=("colour", "shape", "compare", "video"), as_png=True)
    data = write_jsonl(rows, tmp_path / "data")
    no_model(monkeypatch)
    cfg = TrainConfig(data=str(data), model="tiny", num_crops=1, output_dir=str(tmp_path / "out"), cpu=True,
                      report_to="none", num_workers=0, progress=False)  # fmt: skip
    with pytest.raises(AssertionError, match="the model was loaded"):
        run_training(cfg)
    out = capsys.readouterr().out
    assert "schedule: 1 optimizer step(s), 1 per epoch, 50 warm-up" in out
    assert "the run has 1 optimizer step(s) and 50 warm-up step(s) (--warmup-steps)" in out
    assert "--batch-size 64 is more than the 40 training samples" in out


def test_warmup_ratio_scales_with_the_run(tmp_path):
    cfg = TrainConfig(data="x.jsonl", batch_size=4, epochs=3, warmup_ratio=0.1)
    schedule = Schedule.of(cfg, samples=38, world_size=1)  # 10 steps per epoch (the last one short)
    assert (schedule.steps, schedule.steps_per_epoch, schedule.warmup) == (30, 10, 3)
    assert not schedule.warnings(cfg, 38)
    one_step = TrainConfig(data="x.jsonl", batch_size=4, max_steps=1, warmup_ratio=0.1)  # its advice fits the ratio
    (warning,) = Schedule.of(one_step, samples=38, world_size=1).warnings(one_step, 38)
    assert warning.endswith(
        "(--warmup-ratio 0.1): the learning rate never reaches --learning-rate 4e-05 (the first step runs at 0). "
        "Train longer (--epochs, a smaller --batch-size), or set --warmup-ratio 0"
    ), warning
    from phi3v_tune.train.run import training_arguments
    from phi3v_tune.train.runtime import Runtime

    args = training_arguments(cfg, Runtime.resolve(TrainConfig(data="x.jsonl", cpu=True), world_size=1))
    assert args.get_warmup_steps(30) == 3 == math.ceil(30 * 0.1)
    with pytest.raises(ValueError, match=r"--warmup-ratio must be in \[0, 1\)"):
        TrainConfig(data="x.jsonl", warmup_ratio=1.5).validate()


# --------------------------------------------------------------------------------------------------------------------
def test_a_recipe_holdout_larger_than_the_data_says_how_to_lower_it(tmp_path):
    rows, _ = demo_split(2, 0, seed=1, tasks=("compare",), as_png=True)
    data = write_jsonl(rows, tmp_path / "data")
    cfg = TrainConfig(data=str(data), model="tiny", num_crops=1, output_dir=str(tmp_path / "o"), cpu=True,
                      report_to="none", num_workers=0, progress=False, eval_holdout=500)  # fmt: skip
    started = time.time()
    with pytest.raises(DataError) as err:
        run_training(cfg)
    text = str(err.value)
    assert "--eval-holdout 500 holds out the first 500 training rows" in text
    assert "none of the 2 rows to train on" in text and "--eval-holdout N with N < 2" in text
    assert time.time() - started < 60


# --------------------------------------------------------------------------------------------------------------------
def test_an_output_folder_holds_one_run(data_file, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    run_training(small_config(data_file, out, max_steps=2, save_steps=1))
    assert (out / "checkpoint-1").is_dir() and (out / "final").is_dir()
    with pytest.raises(ValueError, match="holds another run .*pass --resume to continue it, --overwrite-output-dir"):
        run_training(small_config(data_file, out, max_steps=2))
    (out / "keep-me.txt").write_text("the user's own file")
    run_training(small_config(data_file, out, max_steps=1, overwrite_output_dir=True, save_steps=100))
    assert not (out / "checkpoint-2").exists()  # the earlier run's; checkpoint-1 is this run's last step
    assert json.loads((out / "final" / "checkpoint_complete.json").read_text())["step"] == 1
    assert (out / "keep-me.txt").read_text() == "the user's own file"  # only what a run writes is deleted
    reports = (out / "epoch_reports.jsonl").read_text().splitlines()
    assert len(reports) == 1  # the earlier run's reports went with it
    with pytest.raises(ValueError, match="pick one"):
        small_config(data_file, out, resume="latest", overwrite_output_dir=True).validate()


# --------------------------------------------------------------------------------------------------------------------
def test_validate_checks_prediction_input_as_predict_reads_it(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (30, 20), "red").save(tmp_path / "a.png")
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        json.dumps({"id": "q1", "conversations": [{"images": ["a.png"], "user": "What colour?"}]}) + "\n"
    )
    assert main(["validate", str(questions)]) == 1  # training and evaluation need the answer
    out = capsys.readouterr().out
    assert (
        out.splitlines()[0]
        == f"{questions}: 0 records, 0 turns, 0 images (and 1 sample that could not be read: see below)"
    )
    assert f"{questions}:1 id=q1 conversations[0].assistant: missing (expected a string)" in out
    assert out.splitlines()[-1] == (
        "(every problem is a missing answer: for prompts to answer, check them with --for predict, as predict --data "
        "reads them)"
    )
    assert main(["validate", str(questions), "--for", "predict"]) == 0
    assert "1 record, 1 turn, 1 image\nno problems found" in capsys.readouterr().out


def test_no_progress_is_quiet_and_our_calls_raise_no_deprecation_warnings(data_file, tmp_path):  # noqa: F811
    """--no-progress silences every bar (ours, weight loading, shard writing); a LoRA run and a prediction from its
    adapter print no deprecation warning (PEFT reads `is_gradient_checkpointing`; saved configs carry
    `torch_dtype`)."""
    import subprocess
    import sys

    from launch import cpu_env

    out = tmp_path / "run"
    env = {**cpu_env(), "PYTHONWARNINGS": "default"}  # every warning shown once, none hidden by filters
    train = [sys.executable, "-m", "phi3v_tune", "train", "--data", str(data_file), "--model", "tiny", "--num-crops",
             "1", "--cpu", "--report-to", "none", "--num-workers", "0", "--no-progress", "--method", "lora",
             "--lora-rank", "4", "--max-steps", "2", "--batch-size", "2", "--gradient-checkpointing",
             "--output-dir", str(out)]  # fmt: skip
    done = subprocess.run(train, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    predict = [sys.executable, "-m", "phi3v_tune", "predict", "--model", str(out / "final"), "--image",
               str(tmp_path / "a.png"), "--prompt", "What colour?", "--max-new-tokens", "2", "--no-progress"]  # fmt: skip
    answered = subprocess.run(predict, env=env, capture_output=True, text=True, timeout=600)
    assert answered.returncode == 0, answered.stderr[-3000:]
    for result in (done, answered):
        text = result.stdout + result.stderr
        assert "it/s" not in text and "s/it" not in text and "%|" not in text, text[-2000:]
        assert "deprecated" not in text.lower(), text[-2000:]


# --------------------------------------------------------------------------------------------------------------------
def test_resume_takes_the_runs_settings_and_refuses_a_conflicting_flag(data_file, tmp_path, capsys):  # noqa: F811
    """A LoRA run (rank 4) stopped at step 2; `--resume` alone continues it as LoRA rank 4 (not a full fine-tune
    loading an adapter), and `--resume --lora-rank 8` stops with one line naming both ranks."""
    from launch import TINY_CPU_FLAGS

    out = tmp_path / "lora"
    common = ["train", *TINY_CPU_FLAGS, "--data", str(data_file), "--output-dir", str(out), "--max-steps", "4",
              "--batch-size", "2", "--save-steps", "2", "--warmup-steps", "0"]  # fmt: skip
    assert main([*common, "--method", "lora", "--lora-rank", "4", "--stop-at-step", "2"]) == 0
    capsys.readouterr()
    assert main([*common, "--resume", "--lora-rank", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: --lora-rank 8 conflicts with checkpoint-2, trained with --lora-rank 4: drop the flag to continue that "
        "run, or start a new run in another --output-dir"
    )
    assert main([*common, "--resume"]) == 0
    text = capsys.readouterr().out
    assert "from checkpoint-2: --method lora, --lora-rank 4, --lora-alpha 8" in text
    assert "resuming from checkpoint-2 (step 2 of 4)" in text
    assert json.loads((out / "final" / "adapter_config.json").read_text())["r"] == 4


def test_ctrl_c_says_how_to_continue(monkeypatch, tmp_path, capsys):
    import phi3v_tune.train.run as training

    def interrupted(cfg):
        (Path(cfg.output_dir) / "checkpoint-3").mkdir(parents=True)
        (Path(cfg.output_dir) / "checkpoint-3" / "checkpoint_complete.json").write_text('{"step": 3, "time": 1}')
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "run_training", interrupted)
    out = tmp_path / "run"
    monkeypatch.setattr("sys.argv", ["phi3v-tune", "train", "--data", "x.jsonl", "--output-dir", str(out)])
    assert main(["train", "--data", "x.jsonl", "--output-dir", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"the last complete checkpoint is {out / 'checkpoint-3'}" in err
    assert f"phi3v-tune train --data x.jsonl --output-dir {out} --resume" in err


# --------------------------------------------------------------------------------------------------------------------
def test_the_numbers_a_user_reads_are_the_runs(data_file, tmp_path):  # noqa: F811
    """A run with a task metric, stopped at step 2 and resumed to 4 (--eval-steps 2): metrics.json still holds the
    evaluation before training and every task-metric point; the last step is evaluated once; the progress bar ends
    on the final evaluation's score; loss.png draws evaluations as points."""
    from phi3v_tune.train.callbacks import ProgressBar
    from phi3v_tune.train.plots import loss_figure
    from phi3v_tune.train.run import TrainingRun

    out = tmp_path / "run"

    def cfg(**kw):
        return small_config(data_file, out, max_steps=4, eval_holdout=2, eval_steps=2, save_steps=2,
                            metric="accuracy", eval_max_new_tokens=2, **kw)  # fmt: skip

    run_training(cfg(stop_at_step=2))
    training = TrainingRun(cfg(resume="latest", progress=True)).setup()
    bar = next(c for c in training.trainer.callback_handler.callbacks if isinstance(c, ProgressBar))
    metrics = training.train()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["eval_before"]["step"] == 0 and "eval_loss" in saved["eval_before"]
    points = [(p["step"], p["when"]) for p in saved["task_metric"]]
    assert points == [(0, "before"), (2, "during"), (4, "after")]
    lines = [json.loads(x) for x in (out / "eval_metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["when"]) for x in lines] == [(0, "before"), (2, "during"), (4, "after")]
    losses = [e["step"] for e in metrics["log_history"] if "eval_loss" in e]
    assert losses == [0, 2, 4]  # each evaluated once: the final step is not evaluated again after training
    assert metrics["eval_after"]["step"] == 4
    assert bar.shown["accuracy"] == f"{saved['task_metric'][-1]['eval_accuracy']:.4f}"
    figure = loss_figure(metrics["log_history"])
    styles = {
        line.get_label(): (line.get_linestyle(), line.get_marker()) for a in figure.axes for line in a.get_lines()
    }
    assert styles["train loss"][0] == "-" and styles["eval loss"] == ("None", "o") and styles["accuracy"][0] == "None"
