"""The benchmark's FLOP formula against torch's flop counter, and the benchmark script end to end (CPU, tiny)."""

from __future__ import annotations

import json

import pytest
import torch
from config_helpers import strategy
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from phi3v_tune.config import TrainConfig
from phi3v_tune.model.tiny import build_tiny_tokenizer, tiny_model
from phi3v_tune.perf.flops import SampleShape, training_flops
from phi3v_tune.processing.processor import Phi3VProcessor


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.mark.parametrize("method", ["full", "freeze-vision", "lora"])
def test_flop_formula_equals_flop_counter(tok, method):
    """Eager attention so the counter sees every matmul; forward + backward of one two-crop image sample."""
    proc = Phi3VProcessor.from_tokenizer(tok, num_crops=4)
    model = tiny_model(tok).train()
    model.set_attn_implementation("eager")
    model = strategy(model, TrainConfig(method=method, lora_rank=8, lora_alpha=16))
    enc = proc(
        "<|user|>\n<|image_1|>\nWhat is it?<|end|>\n<|assistant|>\nred<|end|>\n",
        images=[Image.new("RGB", (700, 340), "red")],
        return_tensors="pt",
    )
    ids = enc["input_ids"]
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head_rows = []
    hook = base.lm_head.register_forward_hook(lambda m, a, o: head_rows.append(a[0].shape[:-1].numel()))
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids, pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"], labels=labels)
        out.loss.backward()
    hook.remove()
    crops = base.model.vision_embed_tokens.crops_per_image(enc["image_sizes"])[0]
    assert crops == 3
    # the output projection runs only at the 4 labelled positions, twice (forward, then recomputed in backward)
    assert head_rows == [4, 4]
    shape = SampleShape(ids.shape[1], crops, int((ids < 0).sum()), label_tokens=4)
    recompute = 2 * 4 * base.config.hidden_size * base.config.vocab_size  # not model work, but the counter sees it
    if method == "lora":
        recompute += 2 * 4 * (base.config.hidden_size + base.config.vocab_size) * 8  # the head's LoRA A and B
    assert training_flops(base.config, [shape], method, lora_rank=8) + recompute == counter.get_total_flops()


def test_flops_per_strategy_order():
    """At the DocVQA shape full > freeze-vision > lora, and the full count is ~6 x params x tokens."""
    from phi3v_tune.model.presets import phi35_vision_config

    cfg = phi35_vision_config()
    shape = [SampleShape(2560, 17, 2509, 10)]
    full, frozen, lora = (training_flops(cfg, shape, m) for m in ("full", "freeze-vision", "lora"))
    assert full > frozen > lora
    lm_params = 3.72e9  # decoder linears, without embeddings and lm_head
    assert 6 * lm_params * 2560 < full < 1.6 * 6 * lm_params * 2560


def tiny_bench(tmp_path, *args: str, steps: int = 1, samples: int = 4) -> list[str]:
    """`phi3v-tune bench --tiny` arguments with this test's folders, 1 warm-up step, then `args`."""
    return ["bench", "--tiny", "--work", str(tmp_path / "w"), "--model-dir", str(tmp_path / "ck"),
            "--steps", str(steps), "--warmup", "1", "--samples", str(samples), *args]  # fmt: skip


def test_bench_script_runs_on_cpu_tiny(tmp_path):
    """`phi3v-tune bench --tiny`: every row measured (no errors), figures positive, markdown appended."""
    from phi3v_tune.cli import main

    results = tmp_path / "RESULTS.md"
    rows = tmp_path / "rows.jsonl"
    code = main(
        tiny_bench(tmp_path, "--short-batch", "2", "--methods", "lora", "--checkpointing", "no", "--json", str(rows),
                   "--results", str(results))
    )  # fmt: skip
    assert code == 0
    got = [json.loads(x) for x in rows.read_text().splitlines()]
    assert [(r["workload"], r["build"], r["packing"]) for r in got] == [
        ("docvqa", "plain", False),
        ("docvqa", "ours", False),
        ("memes", "ours", True),
        ("memes", "ours", False),
    ]
    for r in got:
        assert r["error"] is None
        assert r["img_s"] > 0 and r["tokens_s"] > r["img_s"] and r["mfu"] > 0
    table = results.read_text()
    assert "| docvqa | plain | lora | no | 1 |" in table and table.count("\n| memes |") == 2


def test_docvqa_rows_with_several_documents_per_pass_are_packed_as_training_does(tmp_path):
    """--set batch_size_per_device=2 on the DocVQA rows: training's default (packed rows) applies, and the row says so;
    --set packing=false gives padded batches."""
    from phi3v_tune.cli import main

    rows = tmp_path / "rows.jsonl"
    common = tiny_bench(tmp_path, "--workloads", "docvqa", "--builds", "ours", "--methods", "lora", "--checkpointing",
                        "no", "--json", str(rows), "--set", "batch_size=2", "--set", "batch_size_per_device=2",
                        samples=6)  # fmt: skip
    assert main(common) == 0
    assert main([*common, "--set", "packing=false"]) == 0
    got = [json.loads(x) for x in rows.read_text().splitlines()]
    assert [(r["batch"], r["packing"], r["error"]) for r in got] == [(2, True, None), (2, False, None)]


def test_tuned_rows_take_the_recorded_setting_and_say_so(tmp_path):
    """--tuned: our full row (no-checkpointing column) runs two packed documents per pass with CLIP checkpointing,
    lora two packed documents with some decoder layers checkpointed; in the checkpointed column full updates each
    weight in backward and lora runs as the row says. Each row reports what ran (batch 2, packed, checkpointing) and
    lists the settings in its notes."""
    from phi3v_tune.cli import main
    from phi3v_tune.perf.bench import TUNED, docvqa_docs_per_step

    rows = tmp_path / "rows.jsonl"
    argv = tiny_bench(tmp_path, "--workloads", "docvqa", "--builds", "ours", "--methods", "full,lora",
                      "--checkpointing", "no", "--json", str(rows), "--tuned", samples=6)  # fmt: skip
    assert main(argv) == 0
    # documents written per step: TUNED's largest batch under --tuned, --set batch_size when given
    assert (docvqa_docs_per_step(True, {}), docvqa_docs_per_step(False, {})) == (2, 1)
    assert docvqa_docs_per_step(True, {"batch_size": 4}) == 4
    full, lora = (json.loads(x) for x in rows.read_text().splitlines())
    assert (full["batch"], full["packing"], full["checkpointing"], full["error"]) == (2, True, True, None)
    assert full["extra"]["checkpointing_scope"] == "vision"
    assert (lora["batch"], lora["packing"], lora["checkpointing"]) == (2, True, True)
    assert lora["extra"]["checkpointing_layers"] == TUNED[("lora", False)]["checkpointing_layers"]

    rows.unlink()
    assert main([*argv[: argv.index("--checkpointing")], "--checkpointing", "yes", *argv[argv.index("--json") :]]) == 0
    full, lora = (json.loads(x) for x in rows.read_text().splitlines())
    assert (full["batch"], full["packing"], full["checkpointing"], full["error"]) == (2, True, True, None)
    assert full["extra"]["optimizer_in_backward"] is True and full["extra"]["max_grad_norm"] == 0
    assert (lora["batch"], lora["checkpointing"], lora["error"]) == (1, True, None)
    assert ("lora", True) not in TUNED and "optimizer_in_backward" not in lora["extra"]


def test_bench_refuses_an_unknown_training_setting(tmp_path):
    """`--set compyle=true` must not silently measure the default setting."""
    from phi3v_tune.perf.bench import main

    with pytest.raises(SystemExit, match="unknown training setting.*compyle"):
        main(["--tiny", "--work", str(tmp_path), "--model-dir", str(tmp_path / "ck"), "--set", "compyle=true"])


def test_profile_tables_cover_the_same_two_steps_for_both_builds(tmp_path, monkeypatch):
    """PHI3V_PROFILE: one kernel table per row, ours and plain, each over the same two timed steps."""
    from phi3v_tune.cli import main

    monkeypatch.setenv("PHI3V_PROFILE", str(tmp_path / "prof"))
    code = main(tiny_bench(tmp_path, "--methods", "lora", "--checkpointing", "no", "--workloads", "docvqa", steps=2))
    assert code == 0
    for name in ("ours-docvqa-lora.txt", "plain-docvqa-lora.txt"):
        rows = [line.split() for line in (tmp_path / "prof" / name).read_text().splitlines()]
        steps = [r for r in rows if r and r[0] == "ProfilerStep*"]
        assert steps and steps[0][-1] == "2", name  # '# of Calls': two profiled steps


def test_profile_summary_sorts_kernels_by_kind():
    """The profile's summary groups GPU kernels by the kind of work (what the speed levers act on)."""
    from phi3v_tune.perf.bench import kernel_kind

    assert kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "matmul"
    assert kernel_kind("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT") == "matmul"
    assert kernel_kind("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel") == "attention"
    assert kernel_kind("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "compiled (triton)"
    assert kernel_kind("void at::native::(anonymous namespace)::multi_tensor_apply_kernel") == "optimizer"
    assert kernel_kind("ncclDevKernel_AllReduce_Sum_bf16_RING_LL") == "communication"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add>") == "other"


def test_profile_summary_counts_kernels_once_not_the_ranges_or_ops_around_them():
    """The profiler's GPU-side ranges (ProfilerStep*, optimizer steps, compiled graphs) span kernels, and the CPU-side
    op that launched a kernel (aten::mm; a triton launcher of the kernel's own name) reports the kernel's time as
    its own: only the kernel rows count."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from phi3v_tune.perf.bench import profile_summary

    def ev(key, ms, annotation=False, on=DeviceType.CUDA):
        return SimpleNamespace(key=key, self_device_time_total=ms * 1e3, is_user_annotation=annotation, device_type=on)

    cpu = DeviceType.CPU
    events = [ev("ProfilerStep*", 400.0, True), ev("Optimizer.step#AdamWSR.step", 50.0), ev("nvjet_sm90_tst_x", 100.0),
              ev("pytorch_flash::flash_fwd_kernel", 30.0), ev("_adamw_sr_kernel", 20.0), ev("aten::mm", 100.0, on=cpu),
              ev("triton_poi_fused_add_0", 7.0, on=cpu), ev("triton_poi_fused_add_0", 7.0)]  # fmt: skip
    text = profile_summary(SimpleNamespace(key_averages=lambda: events), wall_s=0.2)
    assert text.startswith("profiled steps: wall 200.0 ms, GPU kernels 157.0 ms (78% busy)")
    assert "matmul" in text and "100.0 ms" in text and "attention" in text and "optimizer" in text


def test_bench_tiny_on_a_cpu_skips_and_names_the_rows_that_need_a_gpu(tmp_path, capsys):
    """`phi3v-tune bench --tiny` with every method (the default): qlora's 4-bit kernels need CUDA, so its rows are
    skipped and named, and every other row runs: exit code 0."""
    from phi3v_tune.cli import main

    rows = tmp_path / "rows.jsonl"
    code = main(tiny_bench(tmp_path, "--workloads", "docvqa", "--builds", "ours", "--checkpointing", "no", "--json",
                           str(rows)))  # fmt: skip
    assert code == 0
    assert "skipped on the CPU: the qlora rows (4-bit kernels need a CUDA GPU)" in capsys.readouterr().out
    got = [json.loads(x) for x in rows.read_text().splitlines()]
    assert [r["method"] for r in got] == ["full", "freeze-vision", "lora"] and all(r["error"] is None for r in got)


def test_bench_help_states_defaults_and_answers_without_torch():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['__main__'].__file__ = '/venv/bin/phi3v-tune'\n"
        "from phi3v_tune.cli import build_parser\n"
        "p = build_parser()._subparsers._group_actions[0].choices['bench']\n"
        "print(p.format_help()); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.strip().endswith("False")
    options = out.split("options:", 1)[1]
    for flag, default in (("--steps", "8"), ("--warmup", "3"), ("--samples", "64"), ("--work", "/tmp/phi3v-bench")):
        entry = options.split(f"\n  {flag} ", 1)[1].split("\n  --", 1)[0]
        assert f"(default: {default})" in " ".join(entry.split()), flag
    assert "TUNED" not in out and "perf/bench.py" not in out
