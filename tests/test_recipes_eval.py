"""The four recipes on generated miniatures of their schemas, task metrics during training, eval/predict CLIs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from launch import REPO, TINY_CPU_FLAGS, cpu_env, torchrun
from PIL import Image

from phi3v_tune.cli import main as cli

datasets = pytest.importorskip("datasets")


def img(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (40, 60, 3), dtype=np.uint8))


def docvqa_table(folder: Path, n: int = 4) -> Path:
    table = datasets.Dataset.from_dict(
        {
            "questionId": [str(100 + i) for i in range(n)],
            "image": [img(i) for i in range(n)],
            "query": [{"en": f"What is the total {i}?"} for i in range(n)],
            "answers": [[f"{i}0", f"{i}.0"] for i in range(n)],
        },
        features=datasets.Features(
            {
                "questionId": datasets.Value("string"),
                "image": datasets.Image(),
                "query": {"en": datasets.Value("string")},
                "answers": datasets.Sequence(datasets.Value("string")),
            }
        ),
    )
    table.save_to_disk(str(folder))
    return folder


def cauldron_table(folder: Path, n: int, images_per_row: int, questions_per_row: int, answers: list[str]) -> Path:
    texts = [
        [
            {"user": f"Question {j} about row {i}?", "assistant": answers[(i + j) % len(answers)], "source": "x"}
            for j in range(questions_per_row)
        ]
        for i in range(n)
    ]
    table = datasets.Dataset.from_dict(
        {"images": [[img(i * 7 + k) for k in range(images_per_row)] for i in range(n)], "texts": texts},
        features=datasets.Features(
            {
                "images": datasets.Sequence(datasets.Image()),
                "texts": [
                    {
                        "user": datasets.Value("string"),
                        "assistant": datasets.Value("string"),
                        "source": datasets.Value("string"),
                    }
                ],
            }
        ),
    )
    table.save_to_disk(str(folder))
    return folder


COMMON = [
    *TINY_CPU_FLAGS,
    "--max-steps", "2", "--batch-size", "1", "--eval-steps", "1", "--eval-max-new-tokens", "4", "--warmup-steps", "0",
    "--no-gradient-checkpointing",
]  # fmt: skip


def check_metric_log(out: Path, metric: str, n_eval: int) -> None:
    entries = [json.loads(x) for x in (out / "eval_metrics.jsonl").read_text().splitlines()]
    assert [e["when"] for e in entries] == ["before", "during", "after"]
    assert [e["step"] for e in entries] == [0, 1, 2]
    assert all(0.0 <= e[f"eval_{metric}"] <= 1.0 for e in entries)
    rows = [json.loads(x) for x in (out / "eval_predictions" / "step-2.jsonl").read_text().splitlines()]
    assert len(rows) == n_eval and {"id", "prediction", "gold", "score"} <= set(rows[0])
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["task_metric"]) == 3


def test_docvqa_recipe_anls(tmp_path):
    data = docvqa_table(tmp_path / "docvqa")
    out = tmp_path / "run"
    assert (
        cli(
            [
                "train",
                "--task",
                "docvqa",
                "--data",
                str(data),
                "--eval-data",
                str(data),
                "--output-dir",
                str(out),
                *COMMON,
            ]
        )
        == 0
    )
    cfg = (out / "train_config.yaml").read_text()
    assert "learning_rate: 5.0e-06" in cfg and "metric: anls" in cfg and "epochs: 2" in cfg
    check_metric_log(out, "anls", 4)
    row = json.loads((out / "eval_predictions" / "step-0.jsonl").read_text().splitlines()[0])
    assert row["gold"] == ["00", "0.0"]  # every gold answer is kept for ANLS


def test_hateful_memes_recipe_holds_out_the_first_rows(tmp_path):
    data = cauldron_table(tmp_path / "hm", 6, 1, 1, ["yes", "no"])
    out = tmp_path / "run"
    assert (
        cli(
            [
                "train",
                "--task",
                "hateful_memes",
                "--data",
                str(data),
                "--eval-holdout",
                "2",
                "--output-dir",
                str(out),
                *COMMON,
            ]
        )
        == 0
    )
    check_metric_log(out, "accuracy", 2)
    assert json.loads((out / "metrics.json").read_text())["data"]["train_samples"] == 4


def test_eval_split_reads_another_split_of_the_evaluation_data(tmp_path):
    """Train on a data set's `train` split and evaluate on another one's `validation` split."""
    train = cauldron_table(tmp_path / "train", 3, 1, 1, ["yes", "no"])
    rows = datasets.load_from_disk(str(cauldron_table(tmp_path / "rows", 2, 1, 1, ["no"])))
    evaluation = tmp_path / "val"
    datasets.DatasetDict({"validation": rows}).save_to_disk(str(evaluation))
    out = tmp_path / "run"
    argv = ["train", "--task", "hateful_memes", "--data", str(train), "--eval-data", str(evaluation), "--output-dir",
            str(out), *COMMON]  # fmt: skip
    assert cli(argv) == 2  # the default: --split (train) for both, and this one has no train split
    assert cli([*argv, "--eval-split", "validation"]) == 0
    check_metric_log(out, "accuracy", 2)


def test_nlvr2_recipe_keeps_both_images_and_scores_the_first_question(tmp_path):
    """As the recipe's NLVR2 script: the first question of each held-out row is scored (every question trains);
    --eval-questions all scores each one."""
    data = cauldron_table(tmp_path / "nlvr2", 5, 2, 3, ["True", "False"])
    out = tmp_path / "run"
    argv = ["train", "--task", "nlvr2", "--data", str(data), "--eval-holdout", "2", "--output-dir", str(out), *COMMON]
    assert cli(argv) == 0
    check_metric_log(out, "accuracy", 2)  # 2 held-out rows, their first question
    ids = [json.loads(x)["id"] for x in (out / "eval_predictions" / "step-0.jsonl").read_text().splitlines()]
    assert ids == ["train-0000000000", "train-0000000001"]
    config = yaml.safe_load((out / "train_config.yaml").read_text())
    assert (config["multi_turn"], config["eval_questions"]) == ("recipe", "first")
    every = tmp_path / "every"
    argv = [*argv[: -len(COMMON) - 2], "--output-dir", str(every), "--eval-questions", "all", *COMMON]
    assert cli(argv) == 0
    check_metric_log(every, "accuracy", 6)  # 2 held-out rows x 3 questions, each scored
    ids = [json.loads(x)["id"] for x in (every / "eval_predictions" / "step-0.jsonl").read_text().splitlines()]
    assert ids[:3] == ["train-0000000000-q0", "train-0000000000-q1", "train-0000000000-q2"]


def test_ucf101_recipe_on_converted_videos(tmp_path):
    from test_convert import make_video

    root = tmp_path / "ucf"
    for split in ("train", "test"):
        for label in ("Archery", "Biking"):
            make_video(root / split / label / f"v_{label}_1.avi", 9)
    assert cli(["convert", "ucf101", "--src", str(root), "--out", str(tmp_path / "conv")]) == 0
    out = tmp_path / "run"
    assert (
        cli(
            [
                "train",
                "--task",
                "ucf101",
                "--data",
                str(tmp_path / "conv"),  # ucf101_train.jsonl
                "--eval-data",
                str(tmp_path / "conv" / "ucf101_test.jsonl"),
                "--output-dir",
                str(out),
                *COMMON,
            ]
        )
        == 0
    )
    check_metric_log(out, "accuracy", 2)


def test_eval_and_predict_clis(tmp_path, capsys):
    data = docvqa_table(tmp_path / "docvqa", n=3)
    out = tmp_path / "run"
    assert (
        cli(
            [
                "train",
                "--data",
                str(data),
                "--output-dir",
                str(out),
                "--method",
                "lora",
                "--lora-rank",
                "4",
                *TINY_CPU_FLAGS,
                "--max-steps",
                "2",
                "--batch-size",
                "1",
            ]  # fmt: skip
        )
        == 0
    )
    final = out / "final"
    assert (final / "adapter_config.json").is_file()
    capsys.readouterr()
    assert (
        cli(
            [
                "eval",
                "--model",
                str(final),
                "--data",
                str(data),
                "--split",
                "train",
                "--metric",
                "anls",
                "--max-new-tokens",
                "4",
                "--output",
                str(tmp_path / "p.jsonl"),
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 3 and 0.0 <= summary["anls"] <= 1.0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 3
    img(1).save(tmp_path / "a.png")
    img(2).save(tmp_path / "b.png")
    assert (
        cli(
            [
                "predict",
                "--model",
                str(final),
                "--image",
                str(tmp_path / "a.png"),
                "--image",
                str(tmp_path / "b.png"),
                "--prompt",
                "Compare",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    capsys.readouterr()  # a random tiny model's answer is arbitrary text; the call must succeed
    assert (
        cli(
            [
                "predict",
                "--model",
                str(final),
                "--data",
                str(data),
                "--split",
                "train",
                "--max-new-tokens",
                "2",
                "--output",
                str(tmp_path / "batch.jsonl"),
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in (tmp_path / "batch.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["100", "101", "102"]


def test_predict_answers_unlabelled_questions_and_checks_images_before_loading(tmp_path, capsys):
    from phi3v_tune.model.tiny import save_tiny_checkpoint

    img(3).save(tmp_path / "a.png")
    questions = tmp_path / "q.jsonl"  # no "assistant": questions to answer, not training data
    questions.write_text(
        json.dumps({"id": "q1", "conversations": [{"images": ["a.png"], "user": "Colour?"}]}) + "\n"
        + json.dumps({"id": "q2", "conversations": [{"user": "Say hi."}]}) + "\n"
    )  # fmt: skip
    model = save_tiny_checkpoint(tmp_path / "tiny", seed=1, num_crops=1)
    out = tmp_path / "answers.jsonl"
    argv = ["predict", "--model", str(model), "--data", str(questions), "--max-new-tokens", "2", "--output", str(out)]
    assert cli(argv) == 0
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["q1", "q2"]
    # a DocVQA-style test split withholds its answers
    table = datasets.Dataset.from_dict(
        {"questionId": ["7", "8"], "image": [img(5), img(6)], "query": [{"en": "Total?"}] * 2, "answers": [None] * 2},
        features=datasets.Features(
            {
                "questionId": datasets.Value("string"),
                "image": datasets.Image(),
                "query": {"en": datasets.Value("string")},
                "answers": datasets.Sequence(datasets.Value("string")),
            }
        ),
    )
    table.save_to_disk(str(tmp_path / "docvqa-test"))
    argv = ["predict", "--model", str(model), "--data", str(tmp_path / "docvqa-test"), "--max-new-tokens", "2",
            "--output", str(out)]  # fmt: skip
    assert cli(argv) == 0
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["7", "8"]
    # a missing image is reported before any model loads (the model path here does not even exist)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(
        json.dumps({"id": "q3", "conversations": [{"images": ["gone.png"], "user": "Colour?", "assistant": "red"}]})
        + "\n"
    )
    for command in (["predict"], ["eval", "--metric", "accuracy"]):
        capsys.readouterr()
        assert cli([*command, "--model", str(tmp_path / "no-model"), "--data", str(broken)]) == 2
        assert "broken.jsonl:1 id=q3 conversations[0].images[0]: not found" in capsys.readouterr().err
    # so is a video that exists but does not decode
    (tmp_path / "clip.mp4").write_bytes(b"not a video")
    bad_video = tmp_path / "bad_video.jsonl"
    bad_video.write_text(
        json.dumps({"id": "v1", "conversations": [{"video": "clip.mp4", "user": "Act?", "assistant": "run"}]}) + "\n"
    )
    for command in (["predict"], ["eval", "--metric", "accuracy"]):
        capsys.readouterr()
        assert cli([*command, "--model", str(tmp_path / "no-model"), "--data", str(bad_video)]) == 2
        assert "bad_video.jsonl:1 id=v1 conversations[0].video: video" in capsys.readouterr().err
    # a training file still needs its answers
    from phi3v_tune.data import load_records

    assert "missing (expected a string)" in str(load_records(questions)[1][0].message)
    # only the question asked may lack its answer: an earlier turn is context, and an empty one would be made up
    context = tmp_path / "context.jsonl"
    context.write_text(
        json.dumps({"id": "c1", "conversations": [{"images": ["a.png"], "user": "Colour?"}, {"user": "Sure?"}]}) + "\n"
    )
    capsys.readouterr()
    assert cli(["predict", "--model", str(tmp_path / "no-model"), "--data", str(context)]) == 2
    err = capsys.readouterr().err
    assert "context.jsonl:1 id=c1 conversations[0].assistant: missing" in err
    assert "only the last turn's answer may be left out" in err


def test_validate_cli_reports_every_problem(tmp_path):
    (tmp_path / "d.jsonl").write_text(
        '{"id": "a", "conversations": [{"user": "q", "assistant": ""}]}\n'
        "{broken\n"
        '{"id": "a", "conversations": [{"images": ["missing.png"], "user": "q", "assistant": "x"}]}\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "phi3v_tune", "validate", str(tmp_path / "d.jsonl")],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": ""},
    )
    assert proc.returncode == 1
    text = proc.stdout
    assert "d.jsonl:1" in text and "assistant" in text
    assert "d.jsonl:2" in text
    assert "d.jsonl:3" in text and "not found" in text and "duplicate" in text.lower()


def test_sharded_evaluation_equals_single_process(tmp_path):
    """`torchrun --nproc_per_node 2 ... eval` (gloo) gives the same rows and metric as one process."""

    from phi3v_tune.data.synthetic import demo_split, write_jsonl
    from phi3v_tune.model.tiny import save_tiny_checkpoint

    model = save_tiny_checkpoint(tmp_path / "tiny", seed=4, num_crops=1)
    _, held_out = demo_split(0, 3, seed=2, tasks=("colour", "compare"), as_png=True)
    data = write_jsonl(held_out, tmp_path / "data")  # 6 records: odd/even split across 2 ranks
    env = cpu_env()
    base = [
        "-m",
        "phi3v_tune",
        "eval",
        "--model",
        str(model),
        "--data",
        str(data),
        "--metric",
        "accuracy",
        "--max-new-tokens",
        "3",
        "--eval-batch-size",
        "2",
    ]
    single = subprocess.run(
        [sys.executable, *base, "--output", str(tmp_path / "one.jsonl")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    multi = subprocess.run(
        [
            *torchrun(2, 29541),
            *base,
            "--output",
            str(tmp_path / "two.jsonl"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert multi.returncode == 0, multi.stderr[-2000:]
    one = [json.loads(x) for x in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert len(one) == 6 and one == two

    def summary(out: str) -> dict:
        return next(json.loads(x) for x in out.splitlines() if x.startswith("{") and '"processes"' in x)

    s1, s2 = summary(single.stdout), summary(multi.stdout)
    assert s2["processes"] == 2 and s1["accuracy"] == s2["accuracy"]


def test_eval_and_predict_sample_videos_as_the_model_was_trained(tmp_path):
    """--video-frames defaults to the value in the model folder's train_config.yaml (what train wrote), else 8."""
    from phi3v_tune.cli.infer import trained_video_frames
    from phi3v_tune.config import TrainConfig

    TrainConfig(video_frames=4).save(tmp_path / "trained" / "train_config.yaml")
    assert trained_video_frames(str(tmp_path / "trained")) == 4
    assert trained_video_frames(str(tmp_path / "published")) == 8  # no train_config.yaml
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "train_config.yaml").write_text("[not, a, mapping]\n")
    assert trained_video_frames(str(tmp_path / "odd")) == 8


def test_eval_with_a_task_scores_exactly_the_rows_training_held_out(tmp_path, capsys):
    """`eval --task hateful_memes --data D` takes the recipe's metric, questions and held-out rows: the same rows (and
    questions) that `train --task hateful_memes --data D` evaluated, not the rows it trained on."""
    data = cauldron_table(tmp_path / "hm", 6, 1, 1, ["yes", "no"])
    out = tmp_path / "run"
    argv = ["train", "--task", "hateful_memes", "--data", str(data), "--eval-holdout", "2", "--output-dir", str(out)]
    assert cli([*argv, *COMMON]) == 0
    trained_on = [json.loads(x)["id"] for x in (out / "eval_predictions" / "step-2.jsonl").read_text().splitlines()]
    capsys.readouterr()
    predictions = tmp_path / "eval.jsonl"
    code = cli(["eval", "--task", "hateful_memes", "--eval-holdout", "2", "--model", str(out / "final"), "--data",
                str(data), "--max-new-tokens", "4", "--output", str(predictions), "--no-progress"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "evaluating the first 2 of 6 rows" in printed
    result = json.loads(printed.strip().splitlines()[-1])
    assert "accuracy" in result and result["samples"] == 2  # the recipe's metric, without --metric
    assert [json.loads(x)["id"] for x in predictions.read_text().splitlines()] == trained_on
    assert cli(["eval", "--model", str(out / "final"), "--data", str(data)]) == 2
    assert "eval needs --metric" in capsys.readouterr().err
