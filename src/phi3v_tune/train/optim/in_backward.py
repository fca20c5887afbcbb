"""`--optimizer-in-backward`: each weight is updated as soon as its gradient is complete, and the gradient is freed.

Why: at the end of a normal backward pass every trainable weight's gradient is alive at once, waiting for the
optimizer step: 7.7 GiB of bf16 gradients for full fine-tuning of Phi-3.5-vision (7.2 for freeze-vision), on top of the
weights and the two AdamW moments. Stepping each weight from a post-accumulate-grad hook (as its gradient lands in
backward) and dropping the gradient right after keeps only a few gradients alive at any time. The update itself is
the optimizer's own, with the same hyper-parameters, learning-rate schedule, state and checkpoints.

What it cannot do, and so refuses (`TrainConfig.validate`, `run_training`): clip by the global gradient norm (no
global norm exists before the first weight is updated), accumulate gradients over several forward passes, run under
DDP, DeepSpeed or FSDP (their gradient reduction happens after these hooks), scale an fp16 loss, or skip a batch
with a non-finite loss after its backward.

`OptimizerInBackward` wraps the optimizer the Trainer built and shares its `param_groups` and `state`, so the
Trainer's learning-rate scheduler, `state_dict()` and resume work unchanged; its `step()` and `zero_grad()` have
nothing left to do.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch


class OptimizerInBackward(torch.optim.Optimizer):
    """Steps every parameter of `inner` from a post-accumulate-grad hook; see the module docstring."""

    def __init__(self, inner: torch.optim.Optimizer):  # no super().__init__: every piece of state is `inner`'s
        self.inner = inner
        self.defaults = inner.defaults
        self._slots: dict[torch.Tensor, tuple[dict[str, Any], int]] = {}
        self._sync()
        # each hook holds the optimizer weakly: a parameter keeps its hooks, and hooks holding the optimizer (which
        # holds the parameters) would form a cycle the garbage collector cannot see through, keeping the weights and
        # the AdamW state of a finished run alive (21 GiB for freeze-vision, seen as a later run's peak memory)
        hook = _WeakStep(weakref.ref(self))
        self._handles = [p.register_post_accumulate_grad_hook(hook) for p in self._slots]
        self.steps_in_backward = 0  # parameters updated so far (tests and logs)

    def _sync(self) -> None:
        """Share `inner`'s groups and state (the LR scheduler's changes then reach it) and map each trainable
        parameter to its group and global index; again after `load_state_dict`, which replaces both."""
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        index = -1
        for group in self.inner.param_groups:
            for p in group["params"]:
                index += 1
                if p.requires_grad:
                    self._slots[p] = (group, index)

    @torch.no_grad()
    def _step_param(self, p: torch.Tensor) -> None:
        group, index = self._slots[p]
        step_param = getattr(self.inner, "step_param", None)
        if step_param is not None:  # AdamWSR: its random stream needs the parameter's global index
            step_param(p, group, index)
        else:  # torch's optimizers: their own step over a group holding this one parameter
            groups = self.inner.param_groups
            self.inner.param_groups = [{**group, "params": [p]}]
            try:
                self.inner.step()
            finally:
                self.inner.param_groups = groups
        p.grad = None
        self.steps_in_backward += 1

    def step(self, closure=None):
        """Nothing left to do: backward updated every weight. A closure is still evaluated (and its backward steps)."""
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients are freed as soon as they are used; drop any left over (e.g. from a backward outside training)."""
        for p in self._slots:
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)
        self._sync()

    def remove_hooks(self) -> None:
        """Detach from the parameters (the weights are then only updated by `inner.step()` again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __repr__(self) -> str:
        return f"OptimizerInBackward({self.inner!r})"


class _WeakStep:
    """The post-accumulate-grad hook: steps the parameter through the optimizer while it is alive, else nothing."""

    def __init__(self, optimizer: weakref.ref):
        self.optimizer = optimizer

    def __call__(self, p: torch.Tensor) -> None:
        optimizer = self.optimizer()
        if optimizer is not None:
            optimizer._step_param(p)
