"""Multi-GPU paths that a CPU can check: the vision tower runs on every rank every step (text-only batches under
DDP / ZeRO-3 / FSDP), sharded evaluation equals one process, resume on another world size (DDP works, ZeRO stops
with a clear message), FSDP2 arguments, consolidated final weights."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from launch import REPO, TINY_CPU_FLAGS, cpu_env, torchrun

from phi3v_tune.model.tiny import tiny_model
from phi3v_tune.train.distributed import check_resume_world_size, clean_key, saved_world_size, zero_partitions


# --------------------------------------------------------------------------------------------------------------------
def _text_batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _loss_and_grads(model, batch, distributed: bool, monkeypatch) -> tuple[torch.Tensor, dict, int]:
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: distributed)
    calls = []
    hook = model.model.vision_embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    if model.training:
        loss.backward()
    hook.remove()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, len(calls)


def test_text_only_batch_runs_the_vision_tower_while_training_distributed(tiny_tokenizer, monkeypatch):
    model = tiny_model(tiny_tokenizer).train()
    batch = _text_batch(model.config.vocab_size)
    loss0, grads0, calls0 = _loss_and_grads(model, batch, False, monkeypatch)
    loss1, grads1, calls1 = _loss_and_grads(model, batch, True, monkeypatch)
    assert (calls0, calls1) == (0, 1)
    assert torch.equal(loss0, loss1)  # the dummy adds exactly 0
    vision = [n for n in grads1 if ".vision_embed_tokens." in n]
    assert vision and all(grads0[n] is None for n in vision)  # alone: no gradient (DDP would fail next step)
    for n in vision:  # distributed: every trainable vision weight has a gradient, exactly zero
        assert grads1[n] is not None and not grads1[n].any(), n
    for n, g in grads0.items():
        if n not in vision:
            assert torch.equal(g, grads1[n]), n
    # evaluation with unsharded weights: unchanged (no extra CLIP pass while generating)
    model.eval()
    with torch.no_grad():
        loss2, _, calls2 = _loss_and_grads(model, batch, True, monkeypatch)
    assert calls2 == 0 and torch.allclose(loss2, loss0)


def test_shards_have_equal_length():
    from phi3v_tune.evaluate.runner import shard_indices

    parts = [shard_indices(5, r, 2) for r in range(2)]
    assert parts == [[0, 2, 4], [1, 3, -1]]
    assert [shard_indices(1, r, 3) for r in range(3)] == [[0], [-1], [-1]]
    assert shard_indices(0, 0, 2) == [] and shard_indices(4, 0, 1) == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------------------------------
def _fake_zero_checkpoint(folder: Path, ranks: int, stage: int = 2) -> Path:
    tag = folder / "global_step4"
    tag.mkdir(parents=True)
    (folder / "latest").write_text("global_step4")
    for r in range(ranks):
        (tag / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
        if stage == 3:
            (tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(b"")
    if stage < 3:
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    return folder


def test_zero_checkpoint_on_another_world_size_stops_with_what_to_do(tmp_path):
    ck = _fake_zero_checkpoint(tmp_path / "checkpoint-4", ranks=4, stage=3)
    assert zero_partitions(ck) == 4 and saved_world_size(ck) == 4
    assert check_resume_world_size(ck, 4, "configs/deepspeed/zero3.json") is None
    with pytest.raises(RuntimeError) as err:
        check_resume_world_size(ck, 2, "configs/deepspeed/zero3.json")
    text = str(err.value)
    assert "saved by 4 GPU(s)" in text and "this run has 2" in text
    assert "--nproc_per_node 4" in text and "ds_to_universal" in text and "load_universal" in text
    # converted to a universal checkpoint and loaded as one: any world size
    (ck / "global_step4_universal").mkdir()
    (ck / "latest_universal").write_text("global_step4_universal")
    assert check_resume_world_size(ck, 2, {"checkpoint": {"load_universal": True}}) is None
    with pytest.raises(RuntimeError):
        check_resume_world_size(ck, 2, {"zero_optimization": {"stage": 3}})


def test_full_state_checkpoints_resume_anywhere_with_a_note(tmp_path):
    ck = tmp_path / "checkpoint-2"
    ck.mkdir()
    for r in range(2):
        (ck / f"rng_state_{r}.pth").write_bytes(b"")
    assert zero_partitions(ck) is None and saved_world_size(ck) == 2
    assert check_resume_world_size(ck, 2, None) is None
    assert "written by 2" in check_resume_world_size(ck, 1, None)


def test_wrapper_names_are_removed_from_state_keys():
    assert clean_key("module.model.layers.0.mlp.down_proj.weight") == "model.layers.0.mlp.down_proj.weight"
    key = "model.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.self_attn.qkv_proj.weight"
    assert clean_key(key) == "model.layers.0.self_attn.qkv_proj.weight"
    assert clean_key("_orig_mod.lm_head.weight") == "lm_head.weight"


def test_fsdp_flag_gives_fsdp2_layer_wrapping():
    from transformers import TrainingArguments

    from phi3v_tune.config import TrainConfig
    from phi3v_tune.train.run import fsdp_arguments

    with pytest.raises(ValueError, match="exclusive"):
        TrainConfig(fsdp=True, deepspeed="configs/deepspeed/zero3.json").validate()
    args = TrainingArguments(output_dir="/tmp/unused", report_to=[], **fsdp_arguments(True))
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["state_dict_type"] == "FULL_STATE_DICT"
    assert plugin["transformer_cls_names_to_wrap"] == "Phi3DecoderLayer,CLIPEncoderLayer"
    assert plugin["reshard_after_forward"] is True and not plugin.get("activation_checkpointing")
    assert fsdp_arguments(False) == {}


def test_deepspeed_and_accelerate_configs_say_what_the_trainer_needs():
    import yaml

    for name in ("zero2", "zero3", "zero3_offload"):
        cfg = json.loads((REPO / "configs" / "deepspeed" / f"{name}.json").read_text())
        assert cfg["bf16"]["enabled"] == "auto" and cfg["train_micro_batch_size_per_gpu"] == "auto"
        zero = cfg["zero_optimization"]
        if name != "zero2":
            assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    offload = json.loads((REPO / "configs" / "deepspeed" / "zero3_offload.json").read_text())
    assert offload["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    acc = yaml.safe_load((REPO / "configs" / "accelerate" / "fsdp2.yaml").read_text())
    fsdp = acc["fsdp_config"]
    assert acc["distributed_type"] == "FSDP" and acc["mixed_precision"] == "bf16" and fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "Phi3DecoderLayer,CLIPEncoderLayer"
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT" and fsdp["fsdp_activation_checkpointing"] is False


# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dist_data(tmp_path_factory) -> tuple[Path, Path]:
    """Text-only training data (every batch leaves the vision tower unused) and 5 image questions for evaluation."""
    from phi3v_tune.data.synthetic import demo_split, write_jsonl

    root = tmp_path_factory.mktemp("dist-data")
    lines = [
        {"id": f"t{i}", "conversations": [{"user": f"Count to {i}.", "assistant": " ".join(map(str, range(i + 1)))}]}
        for i in range(6)
    ]
    train = root / "text.jsonl"
    train.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    _, evaluation = demo_split(1, 2, seed=7, tasks=("colour", "shape", "compare"), as_png=True)
    return train, write_jsonl(evaluation[:5], root / "eval")


def _torchrun(args: list[str], port: int, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*torchrun(nproc, port), "-m", "phi3v_tune", "train", *args],
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )


def test_two_processes_text_only_ddp_sharded_eval_then_resume_on_one(dist_data, tmp_path):
    """2 gloo ranks, every batch text-only, DDP with find_unused_parameters=False: trains (the vision tower runs on a
    dummy crop); the task metric computed sharded before training equals one process on the same weights; the
    2-rank checkpoint resumes in 1 process and finishes."""
    from phi3v_tune import Phi3VForCausalLM, Phi3VProcessor
    from phi3v_tune.config import TrainConfig
    from phi3v_tune.data import load_records
    from phi3v_tune.evaluate.runner import evaluate_records, split_questions
    from phi3v_tune.train.run import run_training

    train, evaluation = dist_data
    out = tmp_path / "ddp"
    common = ["--model", "tiny", "--num-crops", "1", "--batch-size", "2", "--learning-rate", "1e-3",
              "--warmup-steps", "0", "--seed", "3", "--num-workers", "0", "--report-to", "none", "--no-progress",
              "--cpu", "--eval-max-new-tokens", "8"]  # fmt: skip
    proc = _torchrun(["--data", str(train), "--eval-data", str(evaluation), "--metric", "accuracy",
                      "--output-dir", str(out), "--max-steps", "3", "--save-steps", "1",
                      *common], port=29651)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # (DDP raises "Expected to have finished reduction" at step 3 when the vision weights get no gradients)
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    logged = [json.loads(x) for x in (out / "eval_metrics.jsonl").read_text().splitlines()]
    assert [e["when"] for e in logged] == ["before", "after"]
    sharded = [json.loads(x) for x in (out / "eval_predictions" / "step-0.jsonl").read_text().splitlines()]

    base = out / "base-tiny"
    records = split_questions(load_records(str(evaluation))[0])
    model = Phi3VForCausalLM.from_pretrained(base, dtype=torch.float32)
    value, rows = evaluate_records(model, Phi3VProcessor.from_pretrained(base, num_crops=1), records, "accuracy",
                                   max_new_tokens=8, progress=False)  # fmt: skip
    assert [r["id"] for r in sharded] == [r.id for r in records]  # gathered back in the original order
    assert [r["prediction"] for r in sharded] == [r["prediction"] for r in rows]
    assert logged[0]["eval_accuracy"] == value

    # resume the 2-process checkpoint-1 in one process (full optimizer state: any world size)
    again = tmp_path / "one"
    cfg = TrainConfig(data=str(train), model=str(base), num_crops=1, output_dir=str(again), batch_size=2,
                      learning_rate=1e-3, warmup_steps=0, seed=3, max_steps=3, save_steps=1, num_workers=0,
                      report_to="none", progress=False, cpu=True, resume=str(out / "checkpoint-1"))  # fmt: skip
    run_training(cfg)
    state = json.loads((again / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and (again / "final" / "model.safetensors").is_file()


def test_two_nodes_emulated_on_loopback_train_like_one_node(dist_data, tmp_path):
    """`torchrun --nnodes 2 --nproc_per_node 1 --node_rank 0|1 --master_addr 127.0.0.1` (two agents, as on two
    machines) gives the same loss curve as one node with 2 processes (CPU, fp32, same seed and data)."""
    from phi3v_tune.data.synthetic import demo_split, write_jsonl

    train, _ = demo_split(4, 0, seed=2, tasks=("colour",), as_png=True)
    data = write_jsonl(train, tmp_path / "data")
    common = ["-m", "phi3v_tune", "train", *TINY_CPU_FLAGS, "--data", str(data), "--batch-size", "2",
              "--learning-rate", "1e-3", "--warmup-steps", "0", "--seed", "3", "--max-steps", "3",
              "--logging-steps", "1", "--no-save-checkpoints"]  # fmt: skip
    one = subprocess.run([*torchrun(2, 29655), *common, "--output-dir", str(tmp_path / "one")], env=cpu_env(),
                         capture_output=True, text=True, timeout=400)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two_nodes = ("--nnodes", "2", "--master_addr", "127.0.0.1")
    agents = [
        subprocess.Popen(
            [*torchrun(1, 29656, *two_nodes, "--node_rank", str(rank)), *common, "--output-dir", str(tmp_path / "two")],
            env=cpu_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    for agent in agents:
        _, err = agent.communicate(timeout=400)
        assert agent.returncode == 0, err[-3000:]

    def losses(folder: Path) -> list[float]:
        history = json.loads((folder / "metrics.json").read_text())["log_history"]
        return [h["loss"] for h in history if "loss" in h]

    assert len(losses(tmp_path / "one")) == 3
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-6)


def test_fsdp2_evaluation_runs_the_vision_tower_on_a_rank_without_images(tmp_path):
    """FSDP2 shards every CLIP layer, so all ranks must run the tower together; inside the root's forward the
    tower's own weights are plain gathered Parameters, which once hid the sharding: the rank without an image
    skipped CLIP and the collectives mismatched (a hang on NCCL). Both ranks finish, with one-process losses."""
    from phi3v_tune.model.tiny import save_tiny_checkpoint

    model = save_tiny_checkpoint(tmp_path / "tiny", seed=2, num_crops=1)
    image = tmp_path / "dot.png"
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    data = tmp_path / "two.jsonl"
    lines = [
        {"id": "with-image", "conversations": [{"images": [str(image)], "user": "Colour?", "assistant": "red"}]},
        {"id": "text-only", "conversations": [{"user": "Say hi.", "assistant": "hi"}]},
    ]
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    done = subprocess.run(
        [*torchrun(2, 29547), str(REPO / "tests" / "fsdp2_forward.py"), str(model), str(data), str(tmp_path)],
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in rows] == [0, 1]
    assert [r["vision_calls"] for r in rows] == [1, 1]
    for r in rows:  # the text-only rank's dummy crop adds exactly nothing
        assert abs(r["sharded"] - r["alone"]) < 1e-5, r
    # generating: CLIP runs for the prompt on both ranks (images / dummy crop), then no more for the decode steps
    assert [r["generation_clip_runs"] for r in rows] == [1, 1]


def test_a_nan_loss_on_one_rank_stops_or_skips_on_every_rank(dist_data, tmp_path):
    """Only rank 1 sees the NaN: both ranks stop with the sample named (no rank left waiting in a collective until
    the timeout), or with --skip-nonfinite both skip that batch and finish."""
    train, _ = dist_data
    base = [str(REPO / "tests" / "nan_on_one_rank.py"), "train", *TINY_CPU_FLAGS, "--data", str(train), "--method",
            "full", "--batch-size", "2", "--batch-size-per-device", "1", "--max-steps", "2", "--warmup-steps", "0",
            "--no-save-checkpoints"]  # fmt: skip

    def run(*extra: str, port: int) -> subprocess.CompletedProcess:
        cmd = [*torchrun(2, port), *base, "--output-dir", str(tmp_path / str(port)), *extra]
        return subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True,
                              timeout=300)  # fmt: skip

    stopped = run(port=29548)
    text = stopped.stdout + stopped.stderr
    assert stopped.returncode != 0
    assert text.count("non-finite loss (nan) at step 1; samples in the batch: t") == 2, text[-3000:]  # both ranks
    skipped = run("--skip-nonfinite", "1", port=29549)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "warning: non-finite loss at step 1 (samples: t" in skipped.stdout  # rank 0 reports rank 1's batch
    report = json.loads((tmp_path / "29549" / "epoch_reports.jsonl").read_text().splitlines()[0])
    assert report["nonfinite_skipped"] == 2  # both ranks' samples of that step were not trained on
