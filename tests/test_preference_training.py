"""Preference tuning (DPO) through the real training path: exact resume with stored reference log-probabilities,
the loss of an accumulated step as the mean over its pairs, packed = padded, LoRA's reference, held-out reward
accuracy and margin, metrics in the log / tensorboard / loss.png, non-finite losses, and two gloo processes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import TINY_CPU_FLAGS, cpu_env, torchrun
from safetensors.torch import load_file

from phi3v_tune.config import TrainConfig
from phi3v_tune.data.synthetic import demo_split, preference_pairs, write_jsonl
from phi3v_tune.train.checkpoints import latest_complete
from phi3v_tune.train.run import run_training

LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory) -> list[str]:
    """Two files: 6 text-only pairs (quick) and 2 image pairs (the colour task: one image each, seen once per pair)."""
    root = tmp_path_factory.mktemp("pairs")
    text = root / "text.jsonl"
    lines = []
    for i in range(1, 7):
        count = " ".join(map(str, range(i + 1)))
        lines.append(
            {
                "id": f"t{i}",
                "conversations": [{"user": f"Count to {i}.", "chosen": count, "rejected": count[::-1] + " !"}],
            }
        )
    text.write_text("".join(json.dumps(x) + "\n" for x in lines))
    train, _ = demo_split(2, 0, seed=4, tasks=("colour",), as_png=True)
    return [str(text), str(write_jsonl(preference_pairs(train), root / "images"))]  # fmt: skip


def dpo_config(data, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=data, model="tiny", num_crops=1, output_dir=str(out), objective="dpo", method="full", batch_size=2,
        batch_size_per_device=1, learning_rate=1e-3, warmup_steps=0, seed=3, save_steps=4, logging_steps=1,
        report_to="none", num_workers=0, progress=False, cpu=True, dpo_beta=0.5,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def logged(metrics: dict, key: str) -> list[tuple[int, float]]:
    return [(e["step"], e[key]) for e in metrics["log_history"] if key in e]


# --------------------------------------------------------------------------------------------------------------------
def test_resume_is_exact_and_reads_the_stored_reference(pair_data, tmp_path, monkeypatch):
    import phi3v_tune.train.preference as preference

    computed = []
    real = preference.precompute_reference
    monkeypatch.setattr(preference, "precompute_reference", lambda *a, **k: computed.append(1) or real(*a, **k))
    settings = dict(max_steps=8, dpo_precompute_reference=True, dpo_sft_weight=0.2)
    straight = run_training(dpo_config(pair_data, tmp_path / "straight", **settings))
    assert len(computed) == 1  # the training pairs, once (no evaluation data)
    out = tmp_path / "sliced"
    sliced = run_training(dpo_config(pair_data, out, stop_at_step=4, **settings))
    assert sliced["stopped_at_step"] == 4 and latest_complete(out).name == "checkpoint-4"
    stored = (out / "reference_logps.json").read_text()
    table = json.loads(stored)["train"]
    assert sorted(table) == ["colour-000000", "colour-000001", "t1", "t2", "t3", "t4", "t5", "t6"]
    assert all(c < 0 and r < 0 for c, r in table.values())
    computed.clear()
    resumed = run_training(dpo_config(pair_data, out, resume="latest", **settings))
    assert computed == [] and (out / "reference_logps.json").read_text() == stored  # read, not computed again
    a, b = weights(tmp_path / "straight" / "final"), weights(out / "final")
    assert set(a) == set(b) and len(a) > 20
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-exact: 4 steps + resume + 4 steps = 8 steps
    assert logged(resumed, "loss") == logged(straight, "loss")
    assert logged(resumed, "rewards/margins") == logged(straight, "rewards/margins")
    # train_loss is the whole run's mean (the Trainer's own covers only the resumed steps 5..8)
    assert resumed["train"]["train_loss"] == pytest.approx(straight["train"]["train_loss"], rel=1e-6)
    assert resumed["train"]["train_loss"] != pytest.approx(sum(x for _, x in logged(straight, "loss")[4:]) / 4)
    assert logged(straight, "rewards/accuracies")[0] == (1, 0.5)  # step 1: policy = reference, every pair a tie
    assert logged(straight, "loss")[0][1] > LN2  # + the SFT term (RPO)
    # sample accounting counts pairs: 8 per epoch, each epoch reported once, as in the uninterrupted run
    reports = [json.loads(x) for x in (out / "epoch_reports.jsonl").read_text().splitlines()]
    straight_reports = [json.loads(x) for x in (tmp_path / "straight" / "epoch_reports.jsonl").read_text().splitlines()]
    assert [r for r in reports if "stopped_at_step" not in r] == straight_reports
    assert [(r["input_samples"], r["trained"]) for r in straight_reports] == [(8, 8), (8, 8)]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["data"]["train_samples"] == 8 and "ref_logps/chosen" in saved["log_history"][0]


def test_an_accumulated_step_is_the_mean_over_its_pairs_and_packed_equals_padded(pair_data, tmp_path, monkeypatch):
    """5 pairs in one optimizer step of 3 passes (2 + 2 + 1 pairs): the step's loss is the mean of the 5 per-pair
    losses, not the mean of the passes' means; packed rows give the padded run's losses and weights."""
    from phi3v_tune import Phi3VForCausalLM, Phi3VProcessor
    from phi3v_tune.data import load_records
    from phi3v_tune.data.preference import PackedPairCollator, PairCollator, PreferenceRecord, build_pair_example
    from phi3v_tune.model import packed_attention
    from phi3v_tune.model.preference import preference_step

    calls = []
    real = packed_attention.varlen_attention
    monkeypatch.setattr(packed_attention, "varlen_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    used = []
    for cls in (PairCollator, PackedPairCollator):
        monkeypatch.setattr(cls, "__call__", lambda self, ex, _f=cls.__call__: used.append(type(self)) or _f(self, ex))
    text = tmp_path / "three.jsonl"
    text.write_text("".join(Path(pair_data[0]).read_text().splitlines(keepends=True)[:3]))
    data = [str(text), pair_data[1]]  # 5 pairs: one step of passes with 2, 2 and 1 pairs
    runs = {}
    for packing in (False, True):
        calls.clear()
        used.clear()
        out = tmp_path / f"packing-{packing}"
        cfg = dpo_config(data, out, batch_size=6, batch_size_per_device=2, max_steps=2, packing=packing,
                         dpo_sft_weight=0.5, save_checkpoints=True, save_steps=100)  # fmt: skip
        runs[packing] = (run_training(cfg), weights(out / "final"))
        assert bool(calls) == packing and (PackedPairCollator in used) == packing
    (padded, w_a), (packed, w_b) = runs[False], runs[True]
    losses_a, losses_b = logged(padded, "loss"), logged(packed, "loss")
    assert [s for s, _ in losses_a] == [1, 2]
    for (_, x), (_, y) in zip(losses_a, losses_b):
        assert math.isclose(x, y, rel_tol=1e-5)
    for k in w_a:
        torch.testing.assert_close(w_b[k], w_a[k], rtol=1e-4, atol=1e-5, msg=k)

    # step 1 by hand: every pair of the data (the epoch is one step), one batch, the mean over pairs
    base = tmp_path / "packing-False" / "base-tiny"
    processor = Phi3VProcessor.from_pretrained(base, num_crops=1)
    model = Phi3VForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    records = load_records(data)[0]
    examples = [build_pair_example(PreferenceRecord.of(r), processor) for r in records]
    assert len(examples) == 5
    with torch.no_grad():
        step = preference_step(model, PairCollator(processor.tokenizer.pad_token_id)(examples), beta=0.5,
                               sft_weight=0.5, reference=model)  # fmt: skip
    assert math.isclose(losses_a[0][1], float(step.loss), rel_tol=1e-5)
    # whichever pair had a pass of its own, a mean of the passes' means would be off by far more than the tolerance
    x = step.losses.tolist()
    for alone in range(5):
        a, b, c, d = [x[i] for i in range(5) if i != alone]
        for first, second in (((a, b), (c, d)), ((a, c), (b, d)), ((a, d), (b, c))):
            pass_means = (sum(first) / 2 + sum(second) / 2 + x[alone]) / 3
            assert abs(pass_means - float(step.loss)) > 10 * 1e-5 * float(step.loss)


def test_lora_reference_held_out_rewards_tensorboard_and_plot(pair_data, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from phi3v_tune.train.plots import loss_figure

    _, held_out = demo_split(0, 2, seed=4, tasks=("colour",), as_png=True)
    evaluation = write_jsonl(preference_pairs(held_out), tmp_path / "eval")
    out = tmp_path / "lora"
    metrics = run_training(
        dpo_config(pair_data, out, method="lora", lora_rank=4, max_steps=3, eval_data=str(evaluation), eval_steps=2,
                   report_to="tensorboard", save_checkpoints=False, metric="accuracy", eval_max_new_tokens=2)
    )  # fmt: skip
    before, after = metrics["eval_before"], metrics["eval_after"]
    # before the first update the adapters add nothing: the policy is its reference, every reward 0
    assert (before["eval_rewards/accuracies"], before["eval_rewards/margins"]) == (0.5, 0.0)
    assert math.isclose(before["eval_loss"], LN2, rel_tol=1e-6)
    assert [e["step"] for e in metrics["log_history"] if "eval_rewards/margins" in e] == [0, 2, 3]
    assert after["step"] == 3 and after["eval_rewards/margins"] != 0.0
    assert all(0 <= e["rewards/accuracies"] <= 1 for e in metrics["log_history"] if "rewards/accuracies" in e)
    summary = capsys.readouterr().out
    assert "eval reward accuracy before: 50.0%, margin 0.0000" in summary
    assert f"eval reward accuracy after: {after['eval_rewards/accuracies']:.1%}" in summary
    acc = EventAccumulator(str(next((out / "runs").rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/rewards/margins", "train/logps/chosen", "eval/rewards/accuracies", "eval/loss"} <= tags
    assert len(acc.Scalars("train/rewards/margins")) == 3
    figure = loss_figure(metrics["log_history"])
    lines = {line.get_label(): line for a in figure.axes for line in a.get_lines()}
    assert list(lines["reward margin"].get_xdata()) == [1, 2, 3]
    assert list(lines["eval reward margin"].get_xdata()) == [0, 2, 3]
    assert (out / "loss.png").stat().st_size > 1000
    # --metric scores greedy answers against the chosen answers, before, during and after
    assert [(p["step"], p["when"]) for p in metrics["task_metric"]] == [(0, "before"), (2, "during"), (3, "after")]
    rows = [json.loads(x) for x in (out / "eval_predictions" / "step-3.jsonl").read_text().splitlines()]
    chosen = {r.id: r.turns[-1].chosen for r in preference_pairs(held_out)}
    assert len(rows) == 2 and all(row["gold"] == chosen[row["id"]] for row in rows)


def test_a_nonfinite_pair_loss_stops_or_is_skipped_and_counted(pair_data, tmp_path, monkeypatch):
    import phi3v_tune.train.preference as preference

    real = preference.preference_step
    training_calls = []

    def poisoned(model, batch, **kw):  # the second training batch's loss is NaN (one bad pair)
        step = real(model, batch, **kw)
        if model.training:
            training_calls.append(1)
            if len(training_calls) == 2:
                step.loss = step.loss * float("nan")
        return step

    monkeypatch.setattr(preference, "preference_step", poisoned)
    data = pair_data[0]  # 6 text pairs, one per step
    common = dict(batch_size=1, max_steps=6, save_checkpoints=False, method="freeze-vision")  # a frozen copy
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at step 2; samples in the batch: t\d\."):
        run_training(dpo_config(data, tmp_path / "stop", **common))
    training_calls.clear()
    metrics = run_training(dpo_config(data, tmp_path / "skip", skip_nonfinite=1, **common))
    report = json.loads((tmp_path / "skip" / "epoch_reports.jsonl").read_text().splitlines()[0])
    assert (report["trained"], report["nonfinite_skipped"]) == (5, 1)
    margins = logged(metrics, "rewards/margins")
    assert len(margins) == 5 and all(math.isfinite(v) for _, v in margins)  # the skipped pair's values stay out


def test_two_gloo_processes_train_like_one(pair_data, tmp_path):
    """2 ranks x 1 pair = the single process's 2 passes x 1 pair: the same losses step by step, and the reference
    log-probabilities computed in two shards equal one process's."""
    common = ["-m", "phi3v_tune", "train", *TINY_CPU_FLAGS, "--data", *pair_data, "--objective", "dpo",
              "--batch-size", "2", "--batch-size-per-device", "1", "--learning-rate", "1e-3", "--warmup-steps", "0",
              "--seed", "3", "--max-steps", "3", "--logging-steps", "1", "--no-save-checkpoints",
              "--dpo-precompute-reference", "--dpo-sft-weight", "0.3"]  # fmt: skip
    two = subprocess.run([*torchrun(2, 29671), *common, "--output-dir", str(tmp_path / "two")], env=cpu_env(),
                         capture_output=True, text=True, timeout=400)  # fmt: skip
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    one = subprocess.run([sys.executable, *common, "--output-dir", str(tmp_path / "one")], env=cpu_env(),
                         capture_output=True, text=True, timeout=400)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]

    def history(folder: Path) -> list[dict]:
        return json.loads((folder / "metrics.json").read_text())["log_history"]

    losses = {name: [h["loss"] for h in history(tmp_path / name) if "loss" in h] for name in ("one", "two")}
    assert len(losses["one"]) == 3 and losses["two"] == pytest.approx(losses["one"], rel=1e-6)
    margins = {name: [h["rewards/margins"] for h in history(tmp_path / name) if "loss" in h] for name in ("one", "two")}
    assert margins["two"] == pytest.approx(margins["one"], rel=1e-5, abs=1e-7)
    tables = {name: json.loads((tmp_path / name / "reference_logps.json").read_text())["train"] for name in losses}
    assert sorted(tables["two"]) == sorted(tables["one"]) and len(tables["one"]) == 8
    for pair_id, values in tables["one"].items():
        assert tables["two"][pair_id] == pytest.approx(values, rel=1e-6)


def test_resume_keeps_the_runs_dpo_settings_and_refuses_changed_pairs(pair_data, tmp_path, capsys):
    """A DPO run (beta 0.3, SFT weight 0.5, stored reference) stopped at step 2: `--resume` alone continues it with
    those settings (not the defaults), a different --dpo-beta stops with both values, and pairs whose answers changed
    under the same ids stop the run instead of meeting reference values computed for other text."""
    from phi3v_tune.cli import main

    data = tmp_path / "pairs.jsonl"
    original = Path(pair_data[0]).read_text()
    data.write_text(original)
    out = tmp_path / "run"
    common = ["train", *TINY_CPU_FLAGS, "--data", str(data), "--output-dir", str(out), "--max-steps", "4",
              "--batch-size", "2", "--save-steps", "2", "--warmup-steps", "0"]  # fmt: skip
    dpo = ["--objective", "dpo", "--method", "full", "--dpo-beta", "0.3", "--dpo-sft-weight", "0.5",
           "--dpo-precompute-reference"]  # fmt: skip
    assert main([*common, *dpo, "--stop-at-step", "2"]) == 0
    capsys.readouterr()

    assert main([*common, "--resume", "--dpo-beta", "0.5"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --dpo-beta 0.5 conflicts with checkpoint-2, trained with --dpo-beta 0.3: drop the flag to continue "
        "that run, or start a new run in another --output-dir"
    )

    swapped = [json.loads(line) for line in original.splitlines()]
    last = swapped[0]["conversations"][-1]
    last["chosen"], last["rejected"] = last["rejected"], last["chosen"]
    data.write_text("".join(json.dumps(x) + "\n" for x in swapped))
    assert main([*common, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "pair(s) t1 differ from the data the run started with (prompt, images or answers)" in err, err

    data.write_text(original)
    assert main([*common, "--resume"]) == 0
    text = capsys.readouterr().out
    assert (
        "from checkpoint-2: --objective dpo, --dpo-beta 0.3, --dpo-sft-weight 0.5, --dpo-precompute-reference"
    ) in text, text
    assert f"reference log-probabilities: read from {out / 'reference_logps.json'}" in text
    saved = (out / "train_config.yaml").read_text()
    assert "dpo_beta: 0.3" in saved and "dpo_sft_weight: 0.5" in saved and "dpo_precompute_reference: true" in saved
