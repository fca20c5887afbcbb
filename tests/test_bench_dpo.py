"""benchmarks/bench_dpo.py end to end on the CPU (tiny model): every row runs, both builds start from the same model
(the DPO loss of the first step is ln 2), and the table compares them."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_dpo", REPO / "benchmarks" / "bench_dpo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_dpo"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_tiny_run_measures_both_builds_for_lora_and_full(tmp_path, capsys):
    bench = _bench()
    rows = bench.main(["--tiny", "--steps", "2", "--warmup", "1", "--checkpointing", "no", "--work",
                       str(tmp_path / "work"), "--model-dir", str(tmp_path / "model"),
                       "--results", str(tmp_path / "results.md")])  # fmt: skip
    assert [(r.method, r.build) for r in rows] == [("lora", "plain"), ("lora", "ours"), ("full", "plain"),
                                                   ("full", "ours")]  # fmt: skip
    for row in rows:
        assert row.error is None and row.pairs_s > 0 and row.tokens_s > 0
        # step 1: the policy is its reference in both builds (zero LoRA update, or the frozen copy): the DPO loss is ln 2
        assert math.isclose(row.loss_first, math.log(2), rel_tol=1e-5) and math.isfinite(row.loss_last)
    ours = [r for r in rows if r.build == "ours"]
    assert all(r.extra["packing"] for r in ours)  # a pair's two answers in one row, its page once
    lines = (tmp_path / "results.md").read_text().splitlines()
    table = [x for x in lines if x.startswith("| lora") or x.startswith("| full")]
    assert len(table) == 4 and table[1].split("|")[8].strip().endswith("x")  # ours' speed-up over plain
    pairs = (tmp_path / "work" / "data" / "pairs.jsonl").read_text().splitlines()
    assert len(pairs) == 4  # (warm-up + timed + 1) pairs of one step each
    out = capsys.readouterr().out
    assert out.count('{"build": ') == 4  # one JSON line per row as it finishes
