"""torch.compile: a fused step is one custom op (``fusedoptim::step``) that declares the tensors it mutates.

Dynamo cannot trace what a step does on the host (data pointers, the C++ binding, the Triton launcher), and has no
need to: under ``torch.compile`` the step collects the params, their grads, the flat state buffers and the tensor
learning rates, which Dynamo traces as graph inputs, and calls this op, which runs the eager step inside. The op
declares the params and the state buffers (steps and per-tensor states included) as mutated, so the compiled
graph orders it correctly against everything that reads them, and its fake implementation mutates nothing and
returns nothing. A tensor lr is an input like any other tensor: a new value never recompiles (a float lr is a
constant Dynamo guards on, as for torch.optim).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ._base import FusedOptimizer

#: The optimizers a compiled graph may step, by ``FusedOptimizer._handle`` (an op takes no Python objects).
OPTIMIZERS: weakref.WeakValueDictionary[int, FusedOptimizer] = weakref.WeakValueDictionary()


@torch.library.custom_op("fusedoptim::step", mutates_args=("params", "states"))
def step_op(handle: int, params: list[torch.Tensor], grads: list[torch.Tensor | None], states: list[torch.Tensor],
            lrs: list[torch.Tensor], grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
    """One eager step of optimizer ``handle``: params and states are updated in place (they are the tensors the
    optimizer holds), grads, lrs and GradScaler's grad_scale and found_inf read. GradScaler's two are passed, not
    read off the optimizer: Dynamo applies attribute writes after the graph, so the op would see the last step's."""
    optimizer = OPTIMIZERS.get(handle)
    if optimizer is None:
        raise RuntimeError("fusedoptim::step: the optimizer of this compiled step no longer exists")
    optimizer._eager_step(amp=None if grad_scale is None and found_inf is None else (grad_scale, found_inf))


@step_op.register_fake
def _(handle: int, params: list[torch.Tensor], grads: list[torch.Tensor | None], states: list[torch.Tensor],
      lrs: list[torch.Tensor], grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
    return None
