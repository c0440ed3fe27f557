"""A tensor learning rate (the torch.compile and CUDA-graph recipe): a 0-d tensor in the param group, changed in
place by the user or a scheduler, read by the kernels on the device and never with ``.item()``."""

from __future__ import annotations

import contextlib

import pytest
import torch
from cases import FIRST_CASES, case_named

BACKENDS = ["reference", "cpu", "triton"]
SHAPES = [(7,), (33, 31), (1025,), (4, 3, 2, 2)]
STEPS = 4


def _run(case, backend, lr, steps=STEPS, patch=None):
    """Params after ``steps`` steps with lr halved after each (in place for a tensor: its value, never the object,
    changes), grads from a fixed stream."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    opt = case.make(params, backend=backend, lr=lr)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        if patch is None:
            opt.step()
        else:
            with patch():
                opt.step()
        group = opt.param_groups[0]
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].mul_(0.5)
        else:
            group["lr"] *= 0.5
    return params, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FIRST_CASES, ids=lambda c: c.name)
def test_a_tensor_lr_steps_as_the_float_lr(case, backend):
    """The compiled kernels read the tensor's fp32 value where they would take the float's: bitwise. The reference
    computes lr·x as a tensor product instead of a scalar one (an fp32 rounding apart): within fp32 tolerance."""
    floats, _ = _run(case, backend, 1e-2)
    tensors, opt = _run(case, backend, torch.tensor(1e-2))
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    for a, b in zip(tensors, floats, strict=True):
        if backend == "reference":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b)


class _NoHostReads:
    """Tensor.item, .tolist, __float__ and .cpu raise: a step that calls any of them (a host sync on a GPU, a
    graph break under torch.compile) fails."""

    NAMES = ("item", "tolist", "__float__", "cpu")

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}

        def refuse(name):
            def raiser(*args, **kwargs):
                raise AssertionError(f"Tensor.{name} called during the step")
            return raiser

        for name in self.NAMES:
            setattr(torch.Tensor, name, refuse(name))

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            setattr(torch.Tensor, name, value)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("case", FIRST_CASES, ids=lambda c: c.name)
def test_no_host_read_of_a_tensor_lr(case, backend):
    """A tensor lr costs no .item() a step (the float path read a tensor lr with float(): one host sync per group
    per step). The first step lays the buckets out and builds the C++ extension: it runs unpatched."""
    _run(case, backend, torch.tensor(1e-2), steps=1)
    _run(case, backend, torch.tensor(1e-2), steps=3, patch=_NoHostReads)
    with pytest.raises(AssertionError, match="Tensor.__float__ called"), _NoHostReads():
        float(torch.tensor(1.0))  # the patch itself bites


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_scheduler_drives_a_tensor_lr_in_place(backend):
    """torch's schedulers fill a tensor lr in place: the kernels see each new value, as with a float lr."""
    case = next(c for c in FIRST_CASES if c.name == "lamb")
    runs = []
    for lr in (1e-2, torch.tensor(1e-2)):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen) for s in SHAPES]
        opt = case.make(params, backend=backend, lr=lr)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.3)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
            scheduler.step()
        assert (opt.param_groups[0]["lr"] is lr) == isinstance(lr, torch.Tensor)  # the same tensor, refilled
        runs.append(params)
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_tensor_lr_on_another_device_or_of_another_dtype_is_read_there_as_fp32():
    """An fp64 lr is rounded to fp32, as a float lr is; the kernels read a device copy (here on the same CPU)."""
    case = next(c for c in FIRST_CASES if c.name == "adabelief")
    floats, _ = _run(case, "cpu", 1e-2)
    doubles, _ = _run(case, "cpu", torch.tensor(1e-2, dtype=torch.float64))
    assert all(torch.equal(a, b) for a, b in zip(doubles, floats, strict=True))


#: The optimizers whose betas may be tensors, as torch's Adam takes them (RaLars's may not: its rectification start
#: is a host-side search over its beta2); LARS has none.
BETA_CASES = [c for c in FIRST_CASES if "betas" in c.full_kwargs() and c.name != "ralars"]


def _run_betas(case, backend, as_tensors, lr=1e-2, patch=None, steps=STEPS):
    """Params and states after ``steps`` steps whose betas move after each (in place for tensors), lr ``lr``."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    betas = case.full_kwargs()["betas"]
    opt = case.make(params, backend=backend, lr=lr,
                    betas=tuple(torch.tensor(b) for b in betas) if as_tensors else betas)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        with patch() if patch is not None and step > 0 else contextlib.nullcontext():
            opt.step()
        moved = tuple(b - 0.01 * (step + 1) * (1 - b) for b in betas)  # towards 0, staying in [0, 1)
        group = opt.param_groups[0]
        if as_tensors:
            for tensor, value in zip(group["betas"], moved, strict=True):
                tensor.fill_(value)
        else:
            group["betas"] = moved
    return params + [v for p in params for v in opt.state[p].values()]


@pytest.mark.parametrize(("case", "backend"), [
    pytest.param(c, b, id=f"{c.name}-{b}") for c in BETA_CASES for b in BACKENDS
    # through the interpreter: an elementwise rule and a two-pass one (the segment sum's finalize reads them too);
    # the scalars are the same host code for every optimizer, run on the other backends
    if b != "triton" or c.name in ("adabelief", "lamb")])
def test_tensor_betas_step_as_float_betas(case, backend):
    """Betas as 1-element tensors, filled in place after each step, give the float betas' steps (their scalars,
    beta and log beta, computed on the device as on the host), with a float and with a tensor lr, and after the first
    step read no host value. Bitwise on the compiled paths; the reference's tensor products round apart from its
    scalar ones (as for a tensor lr): within fp32 tolerance."""
    floats = _run_betas(case, backend, False)
    for lr in (1e-2, torch.tensor(1e-2)):
        tensors = _run_betas(case, backend, True, lr=lr, patch=_NoHostReads if backend != "reference" else None)
        for a, b in zip(tensors, floats, strict=True):
            if backend == "reference":
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(a, b)


def test_tensor_betas_are_checked_and_refused_where_the_host_needs_them():
    p = torch.zeros(3)
    with pytest.raises(ValueError, match=r"Invalid beta parameter at index 1: 1.0"):
        case_named("lamb").make([p], betas=(torch.tensor(0.9), torch.tensor(1.0)))
    with pytest.raises(ValueError, match="a tensor beta must be a 1-element floating-point tensor"):
        case_named("lamb").make([p], betas=(torch.tensor([0.9, 0.8]), 0.999))
    with pytest.raises(ValueError, match=r"betas\[1\] must be a number, not a tensor"):
        case_named("ralars").make([p], betas=(0.9, torch.tensor(0.999)))
