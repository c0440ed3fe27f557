"""The test machinery itself: the state tolerance fails where it must, and cases are found by name."""

from __future__ import annotations

import os

import pytest
import torch
from cases import CASES, case_named
from helpers import FP32_ATOL, assert_state_close, assert_tensor_state_close, state_atol

from fusedoptim import AdaBelief


def _second_moment(seed=0):
    """A state of magnitude 1e-4 .. 1e-3, like exp_avg_sq of gradients of magnitude 1e-2."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(1000, generator=gen, dtype=torch.float64) * 9e-4 + 1e-4).float()


def test_state_tolerance_scales_with_the_state():
    assert state_atol(torch.tensor([1e-4, -3e-3])) == pytest.approx(3e-9)
    assert state_atol(torch.tensor([2.0, 0.5])) == pytest.approx(2e-6)
    assert state_atol(torch.zeros(4)) == 1e-12
    assert state_atol(torch.zeros(0)) == 1e-12
    assert state_atol(torch.tensor([1e-3, float("inf"), float("nan")])) == pytest.approx(1e-9)  # finite only


def test_a_relative_error_of_1e_3_on_a_small_state_fails():
    expected = _second_moment()
    actual = expected * (1 + 1e-3)
    # the old fixed atol let it pass: |actual - expected| <= 1e-6 everywhere
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=FP32_ATOL)
    with pytest.raises(AssertionError, match="exp_avg_sq"):
        assert_tensor_state_close(actual, expected, "exp_avg_sq")
    # and one entry off by 1e-3 of its value is enough
    one = expected.clone()
    one[17] *= 1 + 1e-3
    with pytest.raises(AssertionError):
        assert_tensor_state_close(one, expected, "exp_avg_sq")


def test_a_state_within_1e_6_relative_passes():
    expected = _second_moment()
    signs = torch.where(torch.arange(expected.numel()) % 2 == 0, 1.0, -1.0)
    assert_tensor_state_close(expected * (1 + 1e-6 * signs), expected, "exp_avg_sq")
    # an entry near zero next to large ones may be off by a few ulps of the largest
    mixed = torch.tensor([1e-3, 1e-4, 0.0])
    assert_tensor_state_close(mixed + torch.tensor([0.0, 0.0, 5e-10]), mixed, "mixed")
    with pytest.raises(AssertionError):
        assert_tensor_state_close(mixed + torch.tensor([0.0, 0.0, 5e-9]), mixed, "mixed")


def test_assert_state_close_compares_every_state_at_its_scale():
    """Two optimizers whose exp_avg_sq differ by 1e-3 relative, everything else equal: assert_state_close fails."""
    p, q = torch.randn(64), torch.randn(64)
    q.copy_(p)
    a, b = AdaBelief([p], lr=1e-2), AdaBelief([q], lr=1e-2)
    g = torch.randn(64) * 1e-2
    p.grad, q.grad = g.clone(), g.clone()
    a.step()
    b.step()
    assert_state_close(a, p, b, q, "equal")
    assert b.state[q]["exp_avg_sq"].abs().max() < 1e-5  # (1 − β2)·g²: far below the old atol
    a.state[p]["exp_avg_sq"].mul_(1 + 1e-3)
    with pytest.raises(AssertionError, match="exp_avg_sq"):
        assert_state_close(a, p, b, q, "perturbed")


def test_case_named():
    assert all(case_named(case.name) is case for case in CASES)
    with pytest.raises(KeyError, match="no case named 'adabeleif'.*known cases: adabelief, "):
        case_named("adabeleif")


# The interpreter's speed-up (tests/interpreter_speed.py): helpers called in a launch are not patched again.
if os.environ.get("TRITON_INTERPRET") == "1":
    import triton
    import triton.language as tl

    @triton.jit
    def _doubled(x):
        return x * 2

    @triton.jit
    def _double_n_times(x_ptr, out_ptr, n, CALLS: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offsets, mask=offsets < n)
        for _ in tl.static_range(CALLS):
            x = _doubled(x)
        tl.store(out_ptr + offsets, x, mask=offsets < n)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton kernels are compiled here")
def test_the_interpreter_patches_the_language_once_per_launch(monkeypatch):
    from triton.runtime import interpreter

    if not getattr(interpreter._patch_lang, "_fusedoptim", False):
        pytest.skip("this triton's interpreter is not the one interpreter_speed wraps: the tests only run slower")
    walks = []
    original = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda *args: walks.append(1) or original(*args))
    x = torch.arange(5, dtype=torch.float32)
    counts = []
    for calls in (0, 5):
        walks.clear()
        out = torch.empty_like(x)
        _double_n_times[(1,)](x, out, 5, CALLS=calls, BLOCK=8)
        assert torch.equal(out, x * 2**calls)
        counts.append(len(walks))
    assert counts[0] > 0 and counts[1] == counts[0]  # five helper calls: no walk of the language beyond the launch's
    assert tl.core.is_builtin(tl.load) and tl.core.is_builtin(tl.tensor.__add__)  # restored after the launch
