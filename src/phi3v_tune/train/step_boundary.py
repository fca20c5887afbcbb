"""The Trainer's per-step bookkeeping over the module tree, from lists made once.

Why: around every optimizer step the HF Trainer walks the whole module tree four times: `model.train()`,
`model.zero_grad()`, `clip_grad_norm_(model.parameters())` and `num_parameters()` (for its FLOP counter). Phi-3.5-
vision with LoRA has ~2,000 modules (32 decoder and 24 CLIP layers, PEFT's wrappers), so these walks cost 16-23 ms of
Python per step on a 2-core CPU (`benchmarks/step_boundary.py`), host time that a GPU step at one document per pass
cannot hide. The same work from lists built once: the same modes, the same gradients, the same norm.

Lists are built on first use. Modules or parameters are never added during training; parameters that do not require
a gradient never get one from backward, so clipping only those that do sees every gradient there is.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


class ModuleTree:
    """A model's modules and parameters, listed once (in `modules()` / `parameters()` order)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = list(model.modules())
        self.parameters = list(model.parameters())
        self.trainable = [p for p in self.parameters if p.requires_grad]
        self._module_train: Callable[[bool], nn.Module] = type(model).train.__get__(model)
        self._module_zero_grad: Callable[[bool], None] = type(model).zero_grad.__get__(model)

    def train(self, mode: bool = True) -> nn.Module:
        """`model.train(mode)`, done only when some module is not in that mode already (evaluation switches it)."""
        if any(m.training != mode for m in self.modules):
            self._module_train(mode)
        return self.model

    def zero_grad(self, set_to_none: bool = True) -> None:
        """`model.zero_grad()`: the gradients set to None (or zeroed, as nn.Module does with set_to_none=False)."""
        if not set_to_none:
            self._module_zero_grad(set_to_none)
            return
        for p in self.parameters:
            if p.grad is not None:
                p.grad = None


def install(model: nn.Module) -> ModuleTree:
    """Route `model.train` and `model.zero_grad` (what the Trainer calls every step) through a `ModuleTree`; returns
    it. Instance attributes shadow the class's methods on this one object only."""
    tree = ModuleTree(model)
    object.__setattr__(model, "train", tree.train)
    object.__setattr__(model, "zero_grad", tree.zero_grad)
    return tree


def uninstall(model: nn.Module) -> None:
    """Back to the class's own `train` / `zero_grad`."""
    for name in ("train", "zero_grad"):
        model.__dict__.pop(name, None)
