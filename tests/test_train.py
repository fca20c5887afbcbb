"""Training: config precedence, strategies, checkpoints + exact resume, LoRA save/merge, bad data, distributed."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from config_helpers import strategy
from safetensors.torch import load_file

from phi3v_tune.cli.args import add_train_arguments as add_arguments
from phi3v_tune.config import TrainConfig, resolve
from phi3v_tune.data.synthetic import demo_split, write_jsonl
from phi3v_tune.model.tiny import tiny_model
from phi3v_tune.train.checkpoints import MARKER, latest_complete
from phi3v_tune.train.run import run_summary, run_training
from phi3v_tune.train.strategies import count_parameters

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    train, _ = demo_split(3, 1, seed=5, tasks=("colour", "shape", "compare"), as_png=True)
    return write_jsonl(train, tmp_path_factory.mktemp("data"))


def small_config(data_file: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(data_file),
        model="tiny",
        num_crops=1,
        output_dir=str(out),
        batch_size=2,
        batch_size_per_device=1,
        learning_rate=1e-3,
        warmup_steps=2,
        seed=3,
        save_steps=4,
        logging_steps=1,
        report_to="none",
        num_workers=0,
        progress=False,
        cpu=True,  # exact fp32 results also on machines with a GPU
    )
    base.update(kw)
    return TrainConfig(**base)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# --------------------------------------------------------------------------------------------------------------------
def test_config_precedence_yaml_then_flags(tmp_path):
    import argparse

    (tmp_path / "r.yaml").write_text("learning_rate: 1.0e-5\nbatch-size: 32\nmethod: lora\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", str(tmp_path / "r.yaml"), "--batch-size", "16", "--no-lora-lm-head"])
    cfg = resolve(args)
    assert (cfg.learning_rate, cfg.batch_size, cfg.method, cfg.lora_lm_head) == (1e-5, 16, "lora", False)
    assert cfg.adam_beta2 == 0.95 and cfg.adam_epsilon == 1e-7 and cfg.warmup_steps == 50  # recipe defaults
    (tmp_path / "bad.yaml").write_text("learning_rat: 1\n")
    with pytest.raises(ValueError, match="unknown setting 'learning_rat'"):
        resolve(parser.parse_args(["--config", str(tmp_path / "bad.yaml")]))
    assert parser.parse_args(["--resume"]).resume == "latest"
    # data sources: one (a plain string) or several, in YAML or on the command line; a list elsewhere is refused
    (tmp_path / "two.yaml").write_text("data: [a.jsonl, b.jsonl]\neval_data: [c.jsonl]\n")
    cfg = resolve(parser.parse_args(["--config", str(tmp_path / "two.yaml")]))
    assert (cfg.data, cfg.eval_data) == (["a.jsonl", "b.jsonl"], "c.jsonl")
    assert resolve(parser.parse_args(["--data", "x.jsonl", "y.jsonl"])).data == ["x.jsonl", "y.jsonl"]
    assert resolve(parser.parse_args(["--data", "x.jsonl"])).data == "x.jsonl"
    (tmp_path / "list.yaml").write_text("output_dir: [a, b]\n")
    with pytest.raises(ValueError, match="setting output_dir: expected str, got a list"):
        resolve(parser.parse_args(["--config", str(tmp_path / "list.yaml")]))


def test_every_flag_has_help():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.dest
    text = parser.format_help()  # rendered as argparse renders it: a "%" in a help text stays text
    assert "option_strings" not in text
    from phi3v_tune.cli import build_parser

    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    assert "below 90% accuracy" in demo.format_help()
    helps = {a.dest: a.help for a in parser._actions}
    # every set default is stated, zero ones too (0 == False once hid them), switches as on/off
    assert helps["lora_dropout"].endswith("(default: 0.0)") and helps["eval_holdout"].endswith("(default: 0)")
    assert helps["lora_lm_head"].endswith("(default: on)") and helps["cpu"].endswith("(default: off)")
    for field in dataclasses.fields(TrainConfig):  # a default of None is explained too (or the setting required)
        assert "default" in helps[field.name].lower() or "required" in helps[field.name].lower(), field.name


def test_eval_writes_predictions_next_to_a_local_model_else_here(tmp_path, monkeypatch):
    from phi3v_tune.cli.infer import default_predictions_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    assert default_predictions_path(str(tmp_path / "run"), "anls") == tmp_path / "run" / "predictions-anls.jsonl"
    # a hub id is no folder here: no microsoft/... tree is made in the working directory
    assert default_predictions_path("microsoft/Phi-3.5-vision-instruct", "accuracy") == Path(
        "predictions-accuracy.jsonl"
    )
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only folder (root writes anywhere)
    assert default_predictions_path(str(tmp_path / "run"), "anls") == Path("predictions-anls.jsonl")


# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["full", "freeze-vision", "freeze-vision+projector", "lora", "lora+vision"])
def test_strategies_train_the_right_parameters(tiny_tokenizer, method):
    model = tiny_model(tiny_tokenizer)
    name, _, extra = method.partition("+")
    cfg = TrainConfig(method=name, freeze_projector=extra == "projector", lora_vision=extra == "vision", lora_rank=4)
    trained = strategy(model, cfg)
    names = {n for n, p in trained.named_parameters() if p.requires_grad}
    counts = count_parameters(trained)
    assert 0 < counts.trainable < counts.total
    assert not any(".encoder.layers.2." in n or "post_layernorm" in n for n in names)  # unused CLIP tail
    if name == "full":
        assert "model.embed_tokens.weight" in names and "model.vision_embed_tokens.glb_GN" in names
        assert any("vision_model.encoder.layers.0." in n for n in names)
    elif name == "freeze-vision":
        assert "model.embed_tokens.weight" in names  # the recipe's accidental embedding freeze is not reproduced
        assert not any("img_processor" in n for n in names)
        assert any("img_projection" in n for n in names) == (extra != "projector")
        assert ("model.vision_embed_tokens.sub_GN" in names) == (extra != "projector")
    else:
        assert names and all("lora_" in n for n in names)
        for target in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"):
            assert any(f"{target}.lora_A" in n for n in names), target
        assert any("img_processor" in n for n in names) == (extra == "vision")
        assert any("img_projection" in n for n in names) == (extra == "vision")


# --------------------------------------------------------------------------------------------------------------------
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(data_file, tmp_path):
    straight = tmp_path / "straight"
    straight_metrics = run_training(small_config(data_file, straight, max_steps=8))
    first = tmp_path / "resumed"
    sliced = run_training(small_config(data_file, first, max_steps=8, stop_at_step=4))
    # a slice of the run leaves its checkpoint, not a final model that would look finished
    ck = latest_complete(first)
    assert ck is not None and ck.name == "checkpoint-4"
    assert sliced["stopped_at_step"] == 4 and not (first / "final").exists()
    # continue the 4-step run to 8 steps from its checkpoint (same data order, LR schedule and RNG)
    resumed_metrics = run_training(small_config(data_file, first, max_steps=8, resume="latest"))
    # the closing summary reports the whole run's loss, also after a resume (steps 1 -> 8, as uninterrupted)
    summary = run_summary(resumed_metrics, small_config(data_file, first).metric, first).splitlines()[0]
    assert summary == run_summary(straight_metrics, small_config(data_file, first).metric, first).splitlines()[0]
    assert (
        summary.startswith("done: 8 steps, train loss ") and "(step 1) ->" in summary and summary.endswith("(step 8)")
    )
    # the epoch the stop cut in two is reported whole after the resume, as in the uninterrupted run
    reports = [json.loads(x) for x in (first / "epoch_reports.jsonl").read_text().splitlines()]
    straight_reports = [json.loads(x) for x in (straight / "epoch_reports.jsonl").read_text().splitlines()]
    assert [r for r in reports if "stopped_at_step" not in r] == straight_reports
    assert [r["stopped_at_step"] for r in reports if "stopped_at_step" in r] == [4]
    # a stop right at the end of an epoch: that epoch is complete and reported as it is, once
    boundary = straight_reports[0]["step"]
    at_end = tmp_path / "at-end"
    run_training(small_config(data_file, at_end, max_steps=8, stop_at_step=boundary, save_checkpoints=True))
    run_training(small_config(data_file, at_end, max_steps=8, resume="latest"))
    assert [json.loads(x) for x in (at_end / "epoch_reports.jsonl").read_text().splitlines()] == straight_reports
    a, b = weights(straight / "final"), weights(first / "final")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    state = json.loads((first / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    # the final folder loads as a model and carries the processor and the resolved config
    from phi3v_tune import Phi3VForCausalLM, Phi3VProcessor

    Phi3VForCausalLM.from_pretrained(first / "final")
    Phi3VProcessor.from_pretrained(first / "final")
    assert (first / "final" / "train_config.yaml").is_file() and (first / "loss.png").stat().st_size > 1000
    metrics = json.loads((first / "metrics.json").read_text())
    assert metrics["data"]["train_samples"] == 9


def test_task_metric_keeps_the_loss_curve_whole_and_a_stop_is_not_evaluated_twice(data_file, tmp_path):
    evaluated = dict(eval_holdout=2, metric="accuracy", eval_steps=2, eval_max_new_tokens=2, save_checkpoints=False)
    metrics = run_training(small_config(data_file, tmp_path / "a", max_steps=3, logging_steps=2, **evaluated))
    # step 2's loss is logged although the metric is logged at that step too; step 3 (off the grid) ends the curve
    assert [e["step"] for e in metrics["log_history"] if "loss" in e] == [1, 2, 3]  # the first step is always logged
    assert [(e["step"], e["when"]) for e in metrics["task_metric"]] == [(0, "before"), (2, "during"), (3, "after")]
    stop = tmp_path / "b"
    run_training(small_config(data_file, stop, max_steps=4, stop_at_step=2, **{**evaluated, "save_checkpoints": True}))
    entries = [json.loads(x) for x in (stop / "eval_metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], e["when"]) for e in entries] == [(0, "before"), (2, "during"), (2, "after")]
    assert entries[1]["eval_accuracy"] == entries[2]["eval_accuracy"]


def test_eval_loss_is_the_token_mean_whatever_the_batch_and_is_taken_before_training(data_file, tmp_path):
    """The evaluation loss is the mean over every answer token of the evaluation data (the training loss's
    definition), the same at any evaluation batch size; with evaluation data it is taken before training too, even
    without --eval-steps."""
    from phi3v_tune import Phi3VForCausalLM, Phi3VProcessor
    from phi3v_tune.data import load_records
    from phi3v_tune.data.examples import build_example

    rows = [json.loads(x) for x in data_file.read_text().splitlines()]
    for i, row in enumerate(rows):  # answers of 1 to 4 words: a mean of sample means would differ
        turn = row["conversations"][-1]
        turn["assistant"] = " ".join([turn["assistant"]] * (1 + i % 4))
    varied = data_file.parent / "varied.jsonl"
    varied.write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses = {}
    for per_device in (1, 3):
        out = tmp_path / f"b{per_device}"
        cfg = small_config(varied, out, max_steps=1, learning_rate=0.0, batch_size=3, batch_size_per_device=per_device)
        cfg.eval_data = str(varied)
        metrics = run_training(cfg)
        losses[per_device] = (metrics["eval_before"]["eval_loss"], metrics["eval_after"]["eval_loss"])
    model = Phi3VForCausalLM.from_pretrained(tmp_path / "b1" / "final").eval()
    processor = Phi3VProcessor.from_pretrained(tmp_path / "b1" / "final")
    total = count = 0.0
    for record in load_records(str(varied))[0]:
        ex = build_example(record, processor)
        n = int((ex["labels"][1:] != -100).sum())
        with torch.no_grad():
            loss = model(
                input_ids=ex["input_ids"][None],
                pixel_values=ex["pixel_values"],
                image_sizes=ex["image_sizes"],
                labels=ex["labels"][None],
            ).loss
        total, count = total + float(loss) * n, count + n
    for before, after in losses.values():
        assert before == pytest.approx(total / count, rel=1e-5) and after == pytest.approx(total / count, rel=1e-5)
    # the saved config is the base model's (the Trainer's use_cache=False for training does not leak into it)
    saved = json.loads((tmp_path / "b1" / "final" / "config.json").read_text())
    base = json.loads((tmp_path / "b1" / "base-tiny" / "config.json").read_text())
    assert saved["use_cache"] is True and {k for k, v in saved.items() if v != base.get(k)} <= {
        "dtype",
        "vision_config",
    }
    assert {k for k, v in saved["vision_config"].items() if v != base["vision_config"].get(k)} <= {"dtype"}


def test_a_metric_without_evaluation_data_is_said(data_file, tmp_path, capsys):
    metrics = run_training(
        small_config(data_file, tmp_path / "r", max_steps=1, metric="anls", eval_steps=1, save_checkpoints=False)
    )
    assert "there is no evaluation data (--eval-data or --eval-holdout): this run evaluates nothing" in (
        capsys.readouterr().out
    )
    assert "task_metric" not in metrics and "eval_after" not in metrics


def test_rotation_after_resuming_an_earlier_checkpoint_keeps_the_new_branch(data_file, tmp_path):
    out = tmp_path / "run"
    run_training(small_config(data_file, out, max_steps=8, save_steps=4, save_total_limit=2))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    # back to step 4 with other settings: checkpoint-8 is the abandoned run's; the new checkpoint-6 is what counts
    resumed = small_config(data_file, out, max_steps=8, save_steps=2, save_total_limit=1, stop_at_step=6)
    resumed.resume = str(out / "checkpoint-4")
    resumed.learning_rate = 1e-4
    run_training(resumed)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]
    assert latest_complete(out) == out / "checkpoint-6"
    # the abandoned run's later checkpoints go before the one resumed from, however recently they were written
    other = tmp_path / "other"
    run_training(small_config(data_file, other, max_steps=6, save_steps=2))
    again = small_config(data_file, other, max_steps=6, save_steps=2, save_total_limit=2, stop_at_step=4)
    again.resume = str(other / "checkpoint-2")
    run_training(again)
    assert sorted(p.name for p in other.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # the abandoned run's report of epoch 1 (step 5) is gone: finishing the run reports that epoch once
    reports = lambda: [json.loads(x)["step"] for x in (other / "epoch_reports.jsonl").read_text().splitlines()]  # noqa: E731
    assert all(step <= 4 for step in reports())
    run_training(small_config(data_file, other, max_steps=6, save_steps=2, resume="latest"))
    assert reports() == [4, 5, 6]  # 4: the stop cut epoch 1 (flagged), 5: epoch 1 whole, 6: epoch 2


def test_incomplete_checkpoints_are_never_resumed_and_limit_keeps_newest(data_file, tmp_path):
    out = tmp_path / "run"
    run_training(small_config(data_file, out, max_steps=6, save_steps=2, save_total_limit=2))
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert kept == ["checkpoint-4", "checkpoint-6"]
    assert all((out / k / MARKER).is_file() for k in kept)
    # a crash mid-write: a newer folder without the marker
    broken = out / "checkpoint-8"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    assert latest_complete(out).name == "checkpoint-6"
    run_training(small_config(data_file, out, max_steps=7, save_steps=2, resume="latest"))
    assert not broken.exists() and list(out.glob("incomplete-checkpoint-8-*"))
    assert json.loads((out / "checkpoint-7" / "trainer_state.json").read_text())["global_step"] == 7


def test_lora_final_folder_loads_as_base_plus_adapter_and_merges(data_file, tmp_path):
    from phi3v_tune import Phi3VForCausalLM
    from phi3v_tune.model.loading import load_for_inference
    from phi3v_tune.train.export import export_model

    out = tmp_path / "lora"
    run_training(small_config(data_file, out, max_steps=3, method="lora", lora_rank=4, learning_rate=1e-2))
    final = out / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "config.json").is_file()
    # adapter weights only: not the frozen lm_head that PEFT stores by default when LoRA targets lm_head
    keys = load_file(final / "adapter_model.safetensors").keys()
    assert any("lm_head.lora_A" in k for k in keys) and all("lora_" in k for k in keys), sorted(keys)[:5]
    peft_model = load_for_inference(final, merge=False)
    merged_dir = export_model(final, tmp_path / "merged", dtype="float32").folder
    merged = Phi3VForCausalLM.from_pretrained(merged_dir)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        a = peft_model(input_ids=ids).logits
        b = merged(input_ids=ids).logits
        base = Phi3VForCausalLM.from_pretrained(out / "base-tiny")(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, base, atol=1e-4)  # the adapter changed something
    index_or_file = list(merged_dir.glob("*.safetensors"))
    assert index_or_file and json.loads((merged_dir / "config.json").read_text())["model_type"] == "phi3_v"
    # how it was trained goes with the merged model: eval/predict take --video-frames from it
    assert (merged_dir / "train_config.yaml").read_text() == (final / "train_config.yaml").read_text()


def test_bad_data_stops_with_the_full_report_unless_skipped(data_file, tmp_path):
    lines = data_file.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    (tmp_path / "images").symlink_to(data_file.parent / "images")
    broken = json.loads(lines[0])
    broken["id"] = "broken-1"
    broken["conversations"][0]["assistant"] = "  "
    missing = json.loads(lines[1])
    missing["id"] = "missing-1"
    missing["conversations"][0]["images"] = ["images/nope.png"]
    bad.write_text("\n".join([*lines, json.dumps(broken), "{not json", json.dumps(missing)]) + "\n")
    from phi3v_tune.data import DataError

    with pytest.raises(DataError) as err:
        run_training(small_config(bad, tmp_path / "stop", max_steps=1))
    text = str(err.value)
    assert "bad.jsonl:10" in text and "broken-1" in text and "empty" in text
    assert "bad.jsonl:11" in text and "bad.jsonl:12" in text and "not found" in text
    out = tmp_path / "skip"
    metrics = run_training(small_config(bad, out, max_steps=1, skip_bad_samples=True))
    skipped = (out / "skipped_samples.tsv").read_text()
    assert "broken-1" in skipped and "missing-1" in skipped and "bad.jsonl:11" in skipped
    assert metrics["data"]["train_samples"] == 9


def test_two_process_gloo_run(data_file, tmp_path):
    """torchrun with 2 CPU processes: the distributed path of the Trainer (gloo)."""
    out = tmp_path / "ddp"
    from launch import TINY_CPU_FLAGS, cpu_env, torchrun

    env = cpu_env()
    cmd = [*torchrun(2, 29533), "-m", "phi3v_tune", "train", *TINY_CPU_FLAGS, "--data", str(data_file),
           "--output-dir", str(out), "--max-steps", "2", "--batch-size", "4", "--batch-size-per-device", "1",
           "--save-steps", "2"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert (out / "final" / MARKER).is_file()
    assert "training data: 9 samples" in proc.stdout


def test_no_save_checkpoints_writes_neither_checkpoints_nor_final_model(data_file, tmp_path):
    """Benchmarks and smoke runs: --no-save-checkpoints trains and reports, and writes no weights at all."""
    out = tmp_path / "nosave"
    metrics = run_training(small_config(data_file, out, max_steps=2, save_checkpoints=False))
    assert metrics["train"]["train_loss"] > 0
    assert not list(out.glob("checkpoint-*")) and not (out / "final").exists()
    assert "final_dir" not in json.loads((out / "metrics.json").read_text())


def test_ddp_settings_skip_unused_parameter_search_and_buffer_broadcasts(tmp_path):
    """Every trainable weight gets a gradient each step and the buffers are constants: DDP needs neither the unused-
    parameter search nor a buffer broadcast before every forward."""
    from phi3v_tune.config import TrainConfig
    from phi3v_tune.model.tiny import tiny_model
    from phi3v_tune.train.run import training_arguments
    from phi3v_tune.train.runtime import Runtime

    cfg = TrainConfig(data="x.jsonl", model="tiny", cpu=True, report_to="none", output_dir=str(tmp_path))
    args = training_arguments(cfg.validate(), Runtime.resolve(cfg, world_size=1))
    assert args.ddp_find_unused_parameters is False and args.ddp_broadcast_buffers is False
    from phi3v_tune.model.tiny import build_tiny_tokenizer

    model = tiny_model(build_tiny_tokenizer())
    assert {n.rsplit(".", 1)[-1] for n, _ in model.named_buffers()} == {
        "short_inv_freq",
        "long_inv_freq",
        "position_ids",
    }


def test_batches_reach_the_gpu_asynchronously_from_pinned_memory(tmp_path, monkeypatch):
    """A blocking host-to-GPU copy waits for every queued kernel: on a GPU batches are pinned and copied without it."""
    import dataclasses

    from phi3v_tune.config import TrainConfig
    from phi3v_tune.train import run
    from phi3v_tune.train.runtime import Runtime

    cfg = TrainConfig(data="x.jsonl", model="tiny", cpu=True, report_to="none", output_dir=str(tmp_path)).validate()
    runtime = Runtime.resolve(cfg, world_size=1)
    args = run.training_arguments(cfg, runtime)
    assert args.dataloader_pin_memory is False and args.accelerator_config.non_blocking is False
    args = run.training_arguments(cfg, dataclasses.replace(runtime, on_cuda=True, bf16=False, fp16=False))
    assert args.dataloader_pin_memory is True and args.accelerator_config.non_blocking is True


def test_bad_settings_fail_before_anything_loads(tmp_path):
    """Mistakes that need no model or data are refused by TrainConfig.validate, with what to do instead."""
    (tmp_path / "afile").write_text("x")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    cases = [
        (dict(model=str(tmp_path / "missing")), "no such folder"),
        (dict(model=str(adapter)), "is a LoRA adapter, not a model: merge it first"),
        (dict(epochs=0), "--epochs must be > 0"),
        (dict(max_steps=2, stop_at_step=5), "--stop-at-step 5 is not before --max-steps 2"),
        (dict(learning_rate=-1.0), "--learning-rate must be >= 0"),
        (dict(method="lora", lora_rank=0), "--lora-rank must be >= 1"),
        (dict(output_dir=str(tmp_path / "afile")), "is a file, not a folder"),
    ]
    for settings, message in cases:
        with pytest.raises(ValueError, match=message):
            TrainConfig(data="x.jsonl", **settings).validate()
    for ok in ("tiny", "microsoft/Phi-3.5-vision-instruct", str(tmp_path)):  # hub ids are not local paths
        TrainConfig(data="x.jsonl", model=ok).validate()
    with pytest.raises(ValueError, match="no such file"):  # what the machine must have: checked before loading
        TrainConfig(data="x.jsonl", deepspeed=str(tmp_path / "nope.json")).check_environment()
    with pytest.raises(ValueError, match="--method qlora needs a CUDA GPU"):  # before planning any data
        TrainConfig(data="x.jsonl", method="qlora", cpu=True).check_environment()


def test_sharded_runs_refuse_what_they_cannot_do(monkeypatch):
    """FSDP/ZeRO-3 conflicts fail at once, also when FSDP comes from `accelerate launch --config_file fsdp2.yaml`."""
    zero3 = str(REPO / "configs" / "deepspeed" / "zero3.json")
    with pytest.raises(ValueError, match="--skip-nonfinite cannot be combined with ZeRO-3"):
        TrainConfig(data="x.jsonl", deepspeed=zero3, skip_nonfinite=2).check_environment()
    with pytest.raises(ValueError, match="--skip-nonfinite cannot be combined with FSDP"):
        TrainConfig(data="x.jsonl", fsdp=True, skip_nonfinite=2).validate()
    with pytest.raises(ValueError, match="on the CPU accelerate would quietly train plain DDP"):
        TrainConfig(data="x.jsonl", fsdp=True, cpu=True).validate()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")  # accelerate launch with a ZeRO-3 config
    with pytest.raises(ValueError, match="--skip-nonfinite cannot be combined with ZeRO-3"):
        TrainConfig(data="x.jsonl", skip_nonfinite=1).check_environment()
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="does not shard 4-bit"):
        TrainConfig(data="x.jsonl", method="qlora").validate()
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    TrainConfig(data="x.jsonl", method="qlora").validate()


def test_inference_names_a_missing_model_or_adapter_base(tmp_path, monkeypatch):
    from phi3v_tune.model.loading import load_for_inference
    from phi3v_tune.train.export import export_model

    with pytest.raises(ValueError, match="no such folder"):
        load_for_inference(tmp_path / "missing")
    # a hub id is tried on the hub (eval/predict --model microsoft/...); offline it says so instead of "no folder"
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: no network wait
    with pytest.raises(ValueError, match="phi3v-test/none: no such local folder, and it could not be loaded from"):
        load_for_inference("phi3v-test/none")
    (tmp_path / "run").mkdir()  # a mistyped path under an existing folder is not looked up on the hub
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="run/final: no such folder"):
        load_for_inference("run/final")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    for call in (lambda: load_for_inference(adapter), lambda: export_model(adapter, tmp_path / "out")):
        with pytest.raises(ValueError, match=r"the base model that .* records, .*gone: no such folder.*pass --base"):
            call()


@pytest.mark.parametrize("rank, alpha, want", [(8, None, 16), (32, None, 64), (64, None, 128), (8, 5, 5)])
def test_lora_alpha_follows_the_rank_as_the_recipe(rank, alpha, want):
    """The recipe's `lora_alpha=round(rank * 2)`: --lora-rank 32 alone gives alpha 64; --lora-alpha overrides."""
    from phi3v_tune.model.tiny import build_tiny_tokenizer

    model = strategy(tiny_model(build_tiny_tokenizer()), TrainConfig(method="lora", lora_rank=rank, lora_alpha=alpha))
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha) == (rank, want)
