"""GPU check of the training path: `run_training` on a full-size random-weight Phi-3.5-vision, every method.

Writes a bf16 random checkpoint once (published layout), then trains a few steps per method on synthetic
document-like samples at the DocVQA shape (one image at num_crops 16 -> 4x4 crops, ~2.5k tokens), batch 1,
activation checkpointing on. Prints s/step (steady state, from the Trainer's log) and peak GPU memory per method.

This proves the code path on a GPU; the throughput benchmark with a baseline is bench_train.py (speed issue).

Usage: python benchmarks/gpu_train_check.py [--methods lora,qlora,freeze-vision,full] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def build_checkpoint(folder: Path) -> None:
    from phi3v_tune import Phi3VForCausalLM, Phi3VProcessor
    from phi3v_tune.model.presets import phi35_vision_config
    from phi3v_tune.model.tiny import build_tiny_tokenizer

    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Phi3VForCausalLM(phi35_vision_config())
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder, max_shard_size="5GB")
    Phi3VProcessor.from_tokenizer(build_tiny_tokenizer(), num_crops=16).save_pretrained(folder)
    del model
    torch.cuda.empty_cache()


def write_data(folder: Path, n: int) -> Path:
    from phi3v_tune.data.synthetic import write_jsonl  # noqa: F401  (same jsonl format)

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    lines = []
    for i in range(n):
        page = Image.fromarray(rng.randint(0, 256, (1300, 1000, 3), dtype=np.uint8))
        page.save(folder / f"doc{i}.png")
        lines.append(
            {
                "id": f"doc{i}",
                "conversations": [
                    {
                        "images": [f"doc{i}.png"],
                        "user": "What is the total amount on this invoice?",
                        "assistant": f"The total is {i * 17 + 3}.00 dollars.",
                    }
                ],
            }
        )
    path = folder / "train.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--methods", default="lora,qlora,freeze-vision,full")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--work", default="/tmp/phi3v-gpu-check")
    ap.add_argument("--model-dir", default="/dev/shm/phi3v-random", help="where the random checkpoint goes")
    args = ap.parse_args()
    from phi3v_tune.config import TrainConfig
    from phi3v_tune.train.run import run_training

    work = Path(args.work)
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        t = time.time()
        build_checkpoint(model_dir)
        print(f"random checkpoint written in {time.time() - t:.0f} s", flush=True)
    data = write_data(work / "data", 16)
    results = []
    for method in args.methods.split(","):
        torch.cuda.reset_peak_memory_stats()
        cfg = TrainConfig(
            data=str(data),
            model=str(model_dir),
            method=method,
            bf16=True,
            num_crops=16,
            output_dir=str(work / f"run-{method}"),
            max_steps=args.steps,
            batch_size=1,
            batch_size_per_device=1,
            gradient_checkpointing=True,
            warmup_steps=0,
            learning_rate=1e-5,
            logging_steps=1,
            save_steps=10_000,
            report_to="none",
            num_workers=2,
            progress=False,
            lora_rank=64,
            lora_alpha=128,
        )
        t = time.time()
        try:
            metrics = run_training(cfg)
            state = json.loads(next((work / f"run-{method}").glob("checkpoint-*/trainer_state.json")).read_text())
            logs = [h for h in state["log_history"] if "loss" in h]
            steady = [h["train_samples_per_second"] for h in logs[2:] if "train_samples_per_second" in h]
            row = {
                "method": method,
                "ok": True,
                "steps": state["global_step"],
                "steady_samples_per_s": round(float(np.median(steady)), 3) if steady else None,
                "first_loss": logs[0]["loss"],
                "last_loss": logs[-1]["loss"],
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "wall_s": round(time.time() - t, 1),
                "train_runtime_s": metrics["train"].get("train_runtime"),
            }
        except Exception as err:  # report and go on with the next method
            row = {"method": method, "ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
        results.append(row)
        import shutil

        shutil.rmtree(work / f"run-{method}", ignore_errors=True)  # the device's disk holds one run at a time
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    print("card:", torch.cuda.get_device_name(), "torch", torch.__version__)


if __name__ == "__main__":
    main()
