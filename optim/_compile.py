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
from typing import Any

import torch
from torch.optim import Optimizer

#: The optimizers a compiled graph may step, by their ``_handle`` (an op takes no Python objects): fusedoptim's, and
#: the wrappers, whose step (counters, Scout's ring, the base's step) runs inside the op as well.
OPTIMIZERS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def register(optimizer: Optimizer) -> None:
    """Let compiled graphs find ``optimizer`` (its ``_eager_step(amp)`` is what the op runs); a copy registers
    itself again."""
    optimizer._handle = id(optimizer)
    OPTIMIZERS[optimizer._handle] = optimizer


def compiled_step(optimizer: Optimizer, states: list[torch.Tensor]) -> None:
    """What ``optimizer.step()`` does under torch.compile: one op over its params, their grads, ``states`` (every
    tensor the step writes besides the params), its tensor lrs and betas and GradScaler's scale and found_inf."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    lrs = [value for group in optimizer.param_groups for value in (group["lr"], *group.get("betas", ()))
           if isinstance(value, torch.Tensor)]  # tensor lrs and betas
    torch.ops.fusedoptim.step(optimizer._handle, params, [p.grad for p in params], states, lrs,
                              getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None))


@torch.library.custom_op("fusedoptim::step", mutates_args=("params", "states"))
def step_op(handle: int, params: list[torch.Tensor], grads: list[torch.Tensor | None], states: list[torch.Tensor],
            lrs: list[torch.Tensor], grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
    """One eager step of optimizer ``handle``: params and states are updated in place (they are the tensors the
    optimizer holds), grads, lrs and GradScaler's grad_scale and found_inf read. GradScaler's two are passed, not
    read off the optimizer: Dynamo applies attribute writes after the graph, so the op would see the last step's."""
    optimizer = OPTIMIZERS.get(handle)
    if optimizer is None:
        raise RuntimeError("fusedoptim::step: the optimizer of this compiled step no longer exists")
    optimizer._eager_step(amp=(grad_scale, found_inf))  # (None, None): none, whatever attributes it has


@step_op.register_fake
def _(handle: int, params: list[torch.Tensor], grads: list[torch.Tensor | None], states: list[torch.Tensor],
      lrs: list[torch.Tensor], grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
    return None
