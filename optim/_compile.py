"""torch.compile: a fused step is one custom op (``fusedoptim::step``) that declares the tensors it mutates.

Dynamo cannot trace what a step does on the host (data pointers, the C++ binding, the Triton launcher), and has no
need to: under ``torch.compile`` the step collects the params, their grads, the flat state buffers and the tensor
learning rates and betas, which Dynamo traces as graph inputs, and calls this op, which runs the eager step inside
with those values. The op declares the params and the state buffers (steps and per-tensor states included) as
mutated, so the compiled graph orders it correctly against everything that reads them, and its fake implementation
mutates nothing and returns nothing. A tensor lr is an input like any other tensor: a new value never recompiles
(a float lr is a constant Dynamo guards on, as for torch.optim).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.optim import Optimizer

from ._distributed import local

#: The optimizers a compiled graph may step, by their ``_handle`` (an op takes no Python objects): fusedoptim's, and
#: the wrappers, whose step (counters, Scout's ring, the base's step) runs inside the op as well.
OPTIMIZERS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def register(optimizer: Optimizer) -> None:
    """Let compiled graphs find ``optimizer`` (its ``_eager_step(amp)`` is what the op runs); a copy registers
    itself again."""
    optimizer._handle = id(optimizer)
    OPTIMIZERS[optimizer._handle] = optimizer


def _held(optimizer: Optimizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The params ``optimizer`` steps and its tensor hyperparameters (lrs and betas), in the op's order."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    hyper = [value for group in optimizer.param_groups for value in (group["lr"], *group.get("betas", ()))
             if isinstance(value, torch.Tensor)]
    return params, hyper


def compiled_step(optimizer: Optimizer) -> None:
    """What ``optimizer.step()`` does under torch.compile: one op over its params, their grads, every other tensor
    the step writes (``optimizer._written_tensors()``), its tensor lrs and betas, and GradScaler's scale and
    found_inf."""
    params, hyper = _held(optimizer)
    torch.ops.fusedoptim.step(optimizer._handle, params, [p.grad for p in params], optimizer._written_tensors(),
                              hyper, getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None))


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is b or (a is not None and b is not None and local(a).data_ptr() == local(b).data_ptr())


@torch.library.custom_op("fusedoptim::step", mutates_args=("params", "states"))
def step_op(handle: int, params: list[torch.Tensor], grads: list[torch.Tensor | None], states: list[torch.Tensor],
            hyper: list[torch.Tensor], grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
    """One eager step of optimizer ``handle`` with the values the graph hands it: params and states are updated in
    place (they are the tensors the optimizer holds), grads, tensor lrs and betas and GradScaler's grad_scale and
    found_inf read.

    The optimizer reads its grads and hyperparameters off its params and groups, which may not hold the graph's
    values yet: Dynamo applies attribute writes after the graph (GradScaler's two attributes, a ``p.grad = ...``), and
    a tensor lr filled in place before the step reaches the graph's input only in the graph's epilogue (measured:
    ``lr.copy_(x); opt.step()`` compiled stepped with the last step's lr). So the op hands the optimizer its own
    inputs: a grad that is another tensor for the step, a hyperparameter's value copied in place."""
    optimizer = OPTIMIZERS.get(handle)
    if optimizer is None:
        raise RuntimeError("fusedoptim::step: the optimizer of this compiled step no longer exists")
    # These checks cost 32 us a step for 161 params (the C++ step of small ones: 670 us), on the host, reading nothing
    held_params, held_hyper = _held(optimizer)
    held_states = optimizer._written_tensors()
    if (len(params), len(states), len(hyper)) != (len(held_params), len(held_states), len(held_hyper)) or not all(
            _same(a, b) for a, b in zip(params + states, held_params + held_states, strict=True)):
        # the step would write the optimizer's tensors and the graph copy its inputs over them afterwards
        raise RuntimeError(f"fusedoptim::step: the compiled graph does not hand {type(optimizer).__name__}'s step the "
                           "params and states it holds (copies, or the optimizer changed since it was traced); "
                           "call torch._dynamo.reset() and compile again")
    for held, value in zip(held_hyper, hyper, strict=True):
        if not _same(held, value):
            held.copy_(value)
    moved = [(p, p.grad, grad) for p, grad in zip(held_params, grads, strict=True) if not _same(p.grad, grad)]
    for p, _, grad in moved:
        p.grad = grad  # for this step: Dynamo sets the attribute itself after the graph
    try:
        optimizer._eager_step(amp=(grad_scale, found_inf))  # (None, None): none, whatever attributes it has
    finally:
        for p, grad, _ in moved:
            p.grad = grad


@step_op.register_fake
def _(handle: int, params: list[torch.Tensor], grads: list[torch.Tensor | None], states: list[torch.Tensor],
      hyper: list[torch.Tensor], grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
    return None
