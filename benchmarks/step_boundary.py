"""Host time of the Trainer's per-step walks over the module tree, and of the same work from lists (CPU).

Why: at one document per pass a GPU step is bound by the host, and around every optimizer step the HF Trainer calls
`model.train()`, `model.zero_grad()`, `clip_grad_norm_(model.parameters())` and `num_parameters()`, each a walk over
every module. The model here has the published depth (32 decoder, 24 CLIP layers: the module count of the real
model) with tiny widths, so only the Python work is timed. `train/step_boundary.py` does the same work from lists.
Usage: python benchmarks/step_boundary.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

from phi3v_tune.model.modeling import Phi3VForCausalLM
from phi3v_tune.model.tiny import PUBLISHED_DEPTH, build_tiny_tokenizer, tiny_config
from phi3v_tune.train.step_boundary import ModuleTree
from phi3v_tune.train.strategies import LoraSettings, apply_strategy


def ms_per_call(fn: Callable[[], object], n: int = 50) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def compare(method: str) -> None:
    """One model: each walk the Trainer makes per optimizer step, timed next to the same work from lists."""
    model = Phi3VForCausalLM(tiny_config(build_tiny_tokenizer(), **PUBLISHED_DEPTH))
    model = apply_strategy(model, method, lora=LoraSettings(rank=4, alpha=8))
    tree = ModuleTree(model)
    counted: list[int] = []

    def count_once() -> list[int]:
        return counted or [model.num_parameters(exclude_embeddings=True)]

    pairs = {
        "model.train()": (model.train, tree.train),
        "model.zero_grad()": (model.zero_grad, tree.zero_grad),
        "model.parameters() for clipping": (lambda: list(model.parameters()), lambda: tree.trainable),
        "num_parameters() for the FLOP count": (lambda: model.num_parameters(exclude_embeddings=True), count_once),
    }
    counted.extend(count_once())
    print(f"{method}: {len(tree.modules)} modules, {len(tree.parameters)} parameter tensors")
    total = [0.0, 0.0]
    for what, (trainer_way, list_way) in pairs.items():
        a, b = ms_per_call(trainer_way), ms_per_call(list_way)
        total[0] += a
        total[1] += b
        print(f"  {what:<38} Trainer {a:6.2f} ms   from lists {b:6.3f} ms")
    print(f"  {'per optimizer step':<38} Trainer {total[0]:6.2f} ms   from lists {total[1]:6.3f} ms")


def main() -> None:
    for method in ("full", "lora"):
        compare(method)


if __name__ == "__main__":
    main()
