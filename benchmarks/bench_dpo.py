"""Preference tuning (DPO) throughput on one GPU: pairs/s and peak memory, ours vs a straightforward build.

Full-size Phi-3.5-vision with random weights (`perf/bench.py`'s checkpoint, written once to --model-dir), documents
of the DocVQA shape (perf/workloads.py's pages: one page per pair, num_crops 16, ~2.5k tokens per sequence) with a
chosen and a rejected answer of 10-60 tokens each.

* ours: `phi3v-tune train --objective dpo` as users run it (TrainingRun: data planning, loader workers,
  PreferenceTrainer): both answers of a pair packed into one row sharing the prompt (the page's tokens through the
  decoder once, the rejected answer as a branch that attends to them), the page through the vision tower once for
  both, answer log-probabilities from the labelled positions only; the reference as the run chooses it (lora: the adapters
  disabled; full / freeze-vision: a frozen copy, or --set dpo_precompute_reference=true).
* plain: what one writes from the DPO paper with our model class in the same process: the two answers as a padded
  batch of 2, the page in the batch twice (the vision tower runs for each sequence), full-vocabulary logits,
  log_softmax and gather; the reference pass the same way (lora: adapters disabled; else a frozen copy); a fused
  AdamW step.

Both start from the same checkpoint and train pairs of the same file (ours in the Trainer's shuffled order, plain in
file order; all pairs have the same shape), one pair per optimizer step by default (--pairs N: N pairs per step,
packed into one row for ours, N padded batches of 2 for plain). Rows print as JSON lines when done and as a markdown
table at the end (appended to --results when given).

Usage (one GPU):  python benchmarks/bench_dpo.py --results benchmarks/RESULTS.md
CPU smoke (tiny model, what tests/test_bench_dpo.py runs):  python benchmarks/bench_dpo.py --tiny --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

import phi3v_tune.perf.bench as bench
from phi3v_tune.config import FIELDS, TrainConfig
from phi3v_tune.data.collate import Collator
from phi3v_tune.data.preference import PreferenceRecord, build_pair_example
from phi3v_tune.data.sources import read_jsonl
from phi3v_tune.model.loss import IGNORE_INDEX
from phi3v_tune.model.modeling import Phi3VForCausalLM
from phi3v_tune.model.preference import adapters_disabled, frozen_copy, preference_loss
from phi3v_tune.perf.workloads import write_workload
from phi3v_tune.processing.processor import Phi3VProcessor
from phi3v_tune.train.run import TrainingRun, lora_settings
from phi3v_tune.train.strategies import apply_strategy

ANSWER_TOKENS = (10, 60)  # each answer's length in tokens (without its <|end|>, newline and <|endoftext|>)
WORDS = ("the total amount date invoice name number page form table is of on in and for with from this that was "
         "signed paid due shipped received account balance").split()  # fmt: skip


@dataclass
class Row:
    build: str
    method: str
    checkpointing: bool
    pairs_per_step: int
    pairs_s: float = 0.0
    tokens_s: float = 0.0
    peak_gib: float = 0.0
    loss_first: float | None = None
    loss_last: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------------
def answer(rng: random.Random, tokenizer, lo: int, hi: int) -> str:
    """Words until the text is lo..hi tokens long (a random target length in that range)."""
    target = rng.randint(lo, hi)
    words: list[str] = []
    while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < target:
        words.append(rng.choice(WORDS))
    while len(words) > 1 and len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) > hi:
        words.pop()
    return " ".join(words)


def write_pairs(folder: Path, pairs: int, tokenizer, seed: int = 0) -> Path:
    """perf/workloads.py's DocVQA pages, each with its question and a chosen and a rejected answer of 10-60 tokens."""
    workload = write_workload("docvqa", folder, pairs, seed=seed)
    rng = random.Random(seed)
    lines = []
    for line in workload.jsonl.read_text().splitlines():
        obj = json.loads(line)
        turn = obj["conversations"][0]
        del turn["assistant"]
        turn["chosen"], turn["rejected"] = (answer(rng, tokenizer, *ANSWER_TOKENS) for _ in range(2))
        lines.append(json.dumps(obj))
    path = folder / "pairs.jsonl"
    path.write_text("".join(x + "\n" for x in lines))
    return path


# --------------------------------------------------------------------------------------------------------------------
def run_ours(row: Row, model_dir: Path, data: Path, work: Path, num_crops: int, steps: int, warmup: int,
             **overrides: Any) -> Row:  # fmt: skip
    """`steps` timed optimizer steps (after `warmup`) of `phi3v-tune train --objective dpo`."""
    bench.free_gpu()
    settings = dict(
        data=str(data), model=str(model_dir), objective="dpo", method=row.method, bf16=bench.ON_GPU,
        num_crops=num_crops, gradient_checkpointing=row.checkpointing, batch_size=row.pairs_per_step,
        batch_size_per_device=row.pairs_per_step, max_steps=warmup + steps, warmup_steps=0, learning_rate=5e-6,
        logging_steps=warmup + steps, save_checkpoints=False, report_to="none", num_workers=8 if bench.ON_GPU else 0,
        cpu=not bench.ON_GPU, progress=False, lora_rank=64, output_dir=str(work / f"run-{row.method}"),
        overwrite_output_dir=True,
    )  # fmt: skip
    settings.update(overrides)
    row.extra.update(overrides)
    run = TrainingRun(TrainConfig(**settings)).setup()
    row.extra.setdefault("packing", run.runtime.packing)
    row.extra.setdefault("compile", run.runtime.compile)
    lengths = dict(zip((p.id for p in run.data.train), run.data.train_plan.lengths))
    trainer = run.trainer
    timer = bench.StepTimer(trainer, sync_after=(warmup - 1, warmup + steps - 1))
    trainer.add_callback(timer)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    row.loss_first, row.loss_last = (losses[0], losses[-1]) if losses else (None, None)
    wall = timer.end[-1] - timer.end[warmup - 1]
    ids = [i for step in timer.ids[warmup:] for i in dict.fromkeys(step)]
    row.pairs_s = len(ids) / wall
    row.tokens_s = sum(lengths[i] for i in ids) / wall
    row.peak_gib = bench.peak_gib()
    trainer.accelerator.free_memory()
    del trainer, run
    bench.free_gpu()
    return row


def plain_logps(model, batch: dict[str, Any]) -> torch.Tensor:
    """The straightforward way: full-vocabulary logits of every position, log_softmax, the labels' values summed."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]).logits  # fmt: skip
    labels = batch["labels"][:, 1:]
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    mask = labels != IGNORE_INDEX
    picked = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def plain_batch(example: dict[str, Any], pad: int, device: str) -> dict[str, Any]:
    """A pair as a padded batch of 2 (chosen, rejected), its images once per sequence."""
    sequences = [
        {"input_ids": example[f"{a}_input_ids"], "labels": example[f"{a}_labels"]} for a in ("chosen", "rejected")
    ]
    batch = Collator(pad)(sequences)
    pixels = example["pixel_values"].to(device, torch.bfloat16 if bench.ON_GPU else torch.float32)
    return {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
        "labels": batch["labels"].to(device),
        "pixel_values": torch.cat([pixels, pixels]),
        "image_sizes": torch.cat([example["image_sizes"], example["image_sizes"]]).to(device),
    }  # fmt: skip


def run_plain(row: Row, model_dir: Path, data: Path, num_crops: int, steps: int, warmup: int, beta: float = 0.1) -> Row:
    """The straightforward build on the same pairs, in the same order of files."""
    bench.free_gpu()
    device = "cuda" if bench.ON_GPU else "cpu"
    dtype = torch.bfloat16 if bench.ON_GPU else torch.float32
    processor = Phi3VProcessor.from_pretrained(str(model_dir), num_crops=num_crops)
    pad = processor.tokenizer.pad_token_id
    records = read_jsonl(data)[0]
    model = Phi3VForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa").to(device)
    reference = frozen_copy(model) if row.method in ("full", "freeze-vision") else None
    cfg = TrainConfig(method=row.method, lora_rank=64, cpu=not bench.ON_GPU)
    model = apply_strategy(model, row.method, lora=lora_settings(cfg), bf16_adapters=bench.ON_GPU)
    if row.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-6, fused=bench.ON_GPU)
    n = row.pairs_per_step
    cycles, tokens, losses = [], [], []
    last = time.perf_counter()
    for step in range(warmup + steps):
        pairs = [records[(step * n + k) % len(records)] for k in range(n)]
        step_tokens = 0
        for record in pairs:
            example = build_pair_example(PreferenceRecord.of(record), processor)  # as a loader would, on the host
            batch = plain_batch(example, pad, device)
            step_tokens += int(batch["attention_mask"].sum())
            with torch.no_grad():
                if reference is not None:
                    ref = plain_logps(reference, batch)
                else:
                    with adapters_disabled(model):
                        ref = plain_logps(model, batch)
            policy = plain_logps(model, batch)
            loss, _, _ = preference_loss(policy[:1], policy[1:], ref[:1], ref[1:], beta)
            (loss.mean() / n).backward()
            losses.append(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step in (warmup - 1, warmup + steps - 1):  # as ours: the device is waited for at the window's ends only
            bench.sync()
        now = time.perf_counter()
        if step >= warmup:
            cycles.append(now - last)
            tokens.append(step_tokens)
        last = now
    row.pairs_s = steps * n / sum(cycles)
    row.tokens_s = sum(tokens) / sum(cycles)
    row.peak_gib = bench.peak_gib()
    row.loss_first, row.loss_last = float(losses[0]), float(losses[-1])
    del model, reference, optimizer
    bench.free_gpu()
    return row


# --------------------------------------------------------------------------------------------------------------------
def markdown(rows: list[Row], command: str) -> str:
    card = torch.cuda.get_device_name() if bench.ON_GPU else "CPU (tiny model smoke run)"
    head = (
        f"\n## {time.strftime('%Y-%m-%d')} — DPO throughput, {card}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}\n\nCommand: `{command}`. DocVQA-shape pages, answers of "
        f"{ANSWER_TOKENS[0]}-{ANSWER_TOKENS[1]} tokens; speed-up and memory relative to the plain row of the same "
        "method and checkpointing.\n\n"
        "| method | ckpt | build | pairs/step | pairs/s | tokens/s | peak GiB | speed-up | loss first→last | notes |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    plain = {(r.method, r.checkpointing): r for r in rows if r.build == "plain" and not r.error}
    lines = []
    for r in rows:
        if r.error:
            lines.append(f"| {r.method} | {r.checkpointing} | {r.build} | {r.pairs_per_step} | failed: {r.error[:120]} "
                         "||||||\n")  # fmt: skip
            continue
        base = plain.get((r.method, r.checkpointing))
        speedup = f"{r.pairs_s / base.pairs_s:.2f}x" if base and base.pairs_s and r is not base else ""
        loss = f"{r.loss_first:.3f}→{r.loss_last:.3f}" if r.loss_first is not None else ""
        notes = ", ".join(f"{k}={v}" for k, v in r.extra.items())
        lines.append(
            f"| {r.method} | {'yes' if r.checkpointing else 'no'} | {r.build} | {r.pairs_per_step} | {r.pairs_s:.3f} | "
            f"{r.tokens_s:.0f} | {r.peak_gib:.1f} | {speedup} | {loss} | {notes} |\n"
        )
    return head + "".join(lines)


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)  # fmt: skip
    ap.add_argument("--methods", default="lora,full", help="Comma-separated methods (default: lora,full).")
    ap.add_argument("--checkpointing", default="yes", help="Activation checkpointing per row: yes, no or yes,no "
                    "(default: yes; full without it does not fit plain's logits and two copies).")  # fmt: skip
    ap.add_argument("--builds", default="plain,ours", help="Which builds to run (default: plain,ours).")
    ap.add_argument("--pairs", type=int, default=1, help="Pairs per optimizer step (default: 1).")
    ap.add_argument("--steps", type=int, default=8, help="Timed optimizer steps per row (default: 8).")
    ap.add_argument("--warmup", type=int, default=3, help="Untimed steps first (compile, allocator) (default: 3).")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="A training setting for our rows, e.g. dpo_precompute_reference=true (repeatable).")  # fmt: skip
    ap.add_argument("--model-dir", default="/dev/shm/phi3v-random", help="Random checkpoint folder (written once).")
    ap.add_argument("--work", default="/tmp/phi3v-bench-dpo", help="Data and runs (default: /tmp/phi3v-bench-dpo).")
    ap.add_argument("--results", default=None, help="Append the markdown table to this file (default: print only).")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny model (num_crops 1).")
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    command = "python benchmarks/bench_dpo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    bench.ON_GPU = torch.cuda.is_available() and not args.tiny
    if not bench.ON_GPU and not args.tiny:
        raise SystemExit("bench_dpo.py measures GPU throughput and needs a CUDA GPU (--tiny: CPU smoke run)")
    overrides = {k.replace("-", "_"): _value(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise SystemExit(f"--set: unknown training setting(s) {', '.join(unknown)}")
    work, model_dir = Path(args.work), Path(args.model_dir)
    bench.write_checkpoint(model_dir, tiny=args.tiny)
    num_crops = 1 if args.tiny else 16
    tokenizer = Phi3VProcessor.from_pretrained(str(model_dir)).tokenizer
    data = write_pairs(work / "data", (args.warmup + args.steps + 1) * args.pairs, tokenizer)
    rows: list[Row] = []

    def record(row: Row, fn, *a, **kw) -> None:
        t0 = time.time()
        try:
            fn(row, *a, **kw)
        except Exception as err:  # one failing row (e.g. out of memory) must not lose the others
            traceback.print_exc()
            row.error = f"{type(err).__name__}: {err}"
            bench.free_gpu()
        row.extra["wall_s"] = round(time.time() - t0)
        rows.append(row)
        print(json.dumps(asdict(row)), flush=True)

    for method in args.methods.split(","):
        for ck in (c.strip() in ("yes", "true", "1") for c in args.checkpointing.split(",")):
            if "plain" in args.builds:
                record(Row("plain", method, ck, args.pairs), run_plain, model_dir, data, num_crops, args.steps,
                       args.warmup)  # fmt: skip
            if "ours" in args.builds:
                record(Row("ours", method, ck, args.pairs), run_ours, model_dir, data, work, num_crops, args.steps,
                       args.warmup, **overrides)  # fmt: skip
    table = markdown(rows, command)
    print(table)
    if args.results:
        with open(args.results, "a") as f:
            f.write(table)
    return rows


if __name__ == "__main__":
    main()
