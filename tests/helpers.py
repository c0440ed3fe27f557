"""Shared test machinery: parameter profiles, a seeded gradient stream, and the per-dtype tolerances.

The profiles are built on the tests' one device (tests/devices.py: ``FUSEDOPTIM_TEST_DEVICE``): values are drawn on
the CPU and then moved, so every device gets the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from devices import DEVICE

from fusedoptim import FusedOptimizer

PROFILES = ["ragged", "many_small", "two_groups", "misaligned", "memory_formats"]

RAGGED_SHAPES = [(), (1,), (7,), (1023,), (1025,), (4097,), (33, 31)]


@dataclass
class Profile:
    groups: list[list[torch.Tensor]]
    grads: Callable[[int, list[list[torch.Tensor]]], list[list[torch.Tensor | None]]]


def _views(shapes, dtype, gen, offset, device):
    """Contiguous tensors of ``shapes`` carved from one buffer at an element ``offset``: offset 1 makes every
    address misaligned for 16-byte vector access."""
    numels = [torch.Size(s).numel() for s in shapes]
    buf = torch.randn(sum(numels) + offset, generator=gen).to(dtype).to(device)
    out, pos = [], offset
    for shape, n in zip(shapes, numels, strict=True):
        out.append(buf[pos:pos + n].view(shape))
        pos += n
    return out


#: (shape, strides) of the "memory_formats" profile: channels_last, channels_last_3d (one with a channel dim of 1),
#: a transposed weight (dense, dim 0 innermost: AdamP's rows are not contiguous in it), a view with gaps (a slice of
#: a wider matrix) and two contiguous tensors.
MEMORY_FORMATS = [
    ((6, 3, 3, 3), (27, 1, 9, 3)),
    ((6, 1, 3, 3), (9, 1, 3, 1)),
    ((4, 2, 3, 3, 2), (36, 1, 12, 4, 2)),
    ((9, 7), (1, 9)),
    ((5, 8), (12, 1)),
    ((7,), (1,)),
    ((1025,), (1,)),
]


def _strided(layouts, dtype, gen, device):
    """Tensors of these (shape, strides) carved from one buffer, each in its own range of it."""
    spans = [1 + sum((n - 1) * st for n, st in zip(shape, stride, strict=True)) for shape, stride in layouts]
    buf = torch.randn(sum(spans), generator=gen).to(dtype).to(device)
    out, pos = [], 0
    for (shape, stride), span in zip(layouts, spans, strict=True):
        out.append(torch.as_strided(buf, shape, stride, pos))
        pos += span
    return out


def make_profile(name: str, dtype: torch.dtype, seed: int = 0, device: torch.device = DEVICE) -> Profile:
    gen = torch.Generator().manual_seed(seed)
    misaligned = name == "misaligned"
    if name == "ragged" or misaligned:
        shapes = [RAGGED_SHAPES]
    elif name == "many_small":
        shapes = [[(1 + (i * 7) % 40,) for i in range(200)]]
    elif name == "two_groups":
        shapes = [[(7,), (1025,), (5, 3)], [(1,), (4097,)]]
    elif name != "memory_formats":
        raise ValueError(name)
    if name == "memory_formats":
        groups = [_strided(MEMORY_FORMATS, dtype, gen, device)]
    else:
        groups = [_views(s, dtype, gen, 1 if misaligned else 0, device) for s in shapes]

    def grads(step: int, params: list[list[torch.Tensor]]) -> list[list[torch.Tensor | None]]:
        g = torch.Generator().manual_seed(seed * 1000 + step)
        out = []
        for gi, group in enumerate(params):
            if misaligned:
                # misaligned views, and one non-contiguous (transposed) gradient
                row = _views([p.shape for p in group], dtype, g, 3, device)
                last = group[-1]
                row[-1] = torch.randn(last.shape[::-1], generator=g).to(dtype).to(device).t()
                assert not row[-1].is_contiguous()
            elif name == "memory_formats":
                # grads in their param's memory order on odd steps, contiguous (another order) on even ones
                row = [torch.randn(p.shape, generator=g).to(dtype).to(device) for p in group]
                if step % 2:
                    row = [torch.empty_like(p).copy_(r) for p, r in zip(group, row, strict=True)]  # p's strides
                    assert row[0].is_contiguous(memory_format=torch.channels_last) and not row[0].is_contiguous()
            else:
                row = [torch.randn(p.shape, generator=g).to(dtype).to(device) for p in group]
            if gi == 0 and step in (2, 4):
                row[1] = None  # a param without a gradient on some steps: skipped, its step does not advance
            out.append(row)
        return out

    return Profile(groups, grads)


def clone_groups(groups: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    # Keep the storage layout (offsets, misalignment): clone the buffer, not the views.
    out = []
    for group in groups:
        base = group[0].untyped_storage()
        copy = torch.empty(0, dtype=group[0].dtype, device=group[0].device).set_(base.clone())
        out.append([torch.as_strided(copy, p.shape, p.stride(), p.storage_offset()) for p in group])
    return out


def set_grads(groups, grads) -> None:
    for group, row in zip(groups, grads, strict=True):
        for p, g in zip(group, row, strict=True):
            p.grad = None if g is None else g.clone()  # a clone keeps a dense tensor's strides


def param_groups(case_kwargs_group2, groups):
    out = [{"params": groups[0]}]
    if len(groups) > 1:
        out.append({"params": groups[1], **case_kwargs_group2})
    return out


# ------------------------------------------------------------------- tolerances
FP32_RTOL, FP32_ATOL = 1e-5, 1e-6  # FP32_ATOL: params, whose magnitude is about 1

#: The absolute tolerance of a state, relative to its largest magnitude, and its floor.
STATE_ATOL_SCALE, STATE_ATOL_FLOOR = 1e-6, 1e-12


def state_atol(expected: torch.Tensor) -> float:
    """The absolute tolerance for comparing a state (or per-tensor factor) with ``expected``: 1e-6 of the largest
    finite magnitude of ``expected``, at least 1e-12. A fixed 1e-6 would be a 1e-3 relative error on a second
    moment of 1e-3 and miss real errors there; the absolute part only covers entries near zero next to large
    ones, which fp32 accumulation leaves a few ulps of the largest off."""
    finite = expected.detach()[torch.isfinite(expected)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    return max(STATE_ATOL_SCALE * scale, STATE_ATOL_FLOOR)


def assert_tensor_state_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """One state (or factor) tensor against the expected one, in fp64: rtol 1e-5, the scale-aware state_atol."""
    torch.testing.assert_close(actual.double(), expected.double(), rtol=FP32_RTOL, atol=state_atol(expected),
                               msg=lambda m: f"{what}: {m}")


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact distance in units in the last place between two bf16/fp16 tensors of one dtype."""
    assert a.dtype == b.dtype and a.element_size() == 2

    def ordered(x):
        i = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i >= 0, i, -32768 - i)  # sign-magnitude -> ordered integers (-0 and +0 both map to 0)

    return (ordered(a) - ordered(b)).abs()


def assert_param_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=FP32_RTOL, atol=FP32_ATOL, msg=lambda m: f"{what}: {m}")
    else:
        dist = ulp_distance(actual, expected)
        if dist.numel() and dist.max() > 1:
            i = int(dist.view(-1).argmax())
            raise AssertionError(f"{what}: {int(dist.max())} ULP apart at flat index {i} "
                                 f"({actual.view(-1)[i].item()} vs {expected.view(-1)[i].item()})")


def assert_state_close(opt_a: FusedOptimizer, pa: torch.Tensor, opt_b: FusedOptimizer, pb: torch.Tensor,
                       what: str) -> None:
    sa, sb = opt_a.state[pa], opt_b.state[pb]
    assert sa.keys() == sb.keys(), f"{what}: state keys {sorted(sa)} vs {sorted(sb)}"
    for name in sa:
        a, b = sa[name], sb[name]
        if name == "step":
            assert torch.equal(a, b), f"{what}: step {a} vs {b}"
        else:
            # fp32 (fp64 for fp64 params), or the param dtype for a copy of the grad (Adan's prev_grad)
            assert a.dtype == b.dtype == opt_a.state_dtype(name, pa.dtype), f"{what}: {name} dtype"
            assert_tensor_state_close(a, b, f"{what} {name}")


def assert_steps_like_twin(opt, params, twin, twin_params, steps: int = 1) -> None:
    """``steps`` more steps with the same grads on both, then params and states bitwise equal: what an optimizer
    that refused a bad input must do next, against an untouched twin."""
    for o, ps in ((opt, params), (twin, twin_params)):
        for _ in range(steps):
            for p in ps:
                p.grad = torch.full_like(p, 0.5)
            o.step()
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p, q)
        for name, value in twin.state[q].items():
            assert torch.equal(opt.state[p][name], value), name
