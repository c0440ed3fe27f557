"""The reference path (and the Triton path) compute the published algorithms: checks against independent
float64 oracles, closed forms and torch.optim identities."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from cases import ORACLES, case_backends

from fusedoptim import Adan, AdEMAMix
from fusedoptim._math import one_minus_exp as reference_one_minus_exp
from fusedoptim.kernels._math import one_minus_exp

BACKENDS = ["reference", "triton", "cpu"]


@pytest.mark.parametrize(("case", "backend"), case_backends(BACKENDS))
def test_matches_float64_oracle(case, backend):
    gen = torch.Generator().manual_seed(1)
    param0 = torch.randn(3, 37, generator=gen)
    grads = [torch.randn(3, 37, generator=gen) for _ in range(12)]
    p = param0.clone()
    opt = case.make([p], backend=backend)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = ORACLES[case.cls](param0, grads, **case.full_kwargs())
    torch.testing.assert_close(p.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_ademamix_alpha0_is_adamw(backend, weight_decay):
    """AdEMAMix with α = 0 and no warm-up is Adam (λ = 0) / AdamW (decoupled λ)."""
    gen = torch.Generator().manual_seed(2)
    ours, theirs = torch.randn(64, 9, generator=gen), None
    theirs = ours.clone().requires_grad_(False)
    opt = AdEMAMix([ours], lr=1e-2, betas=(0.9, 0.999, 0.9999), alpha=0.0, weight_decay=weight_decay,
                   backend=backend)
    torch_cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
    ref = torch_cls([theirs], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, foreach=False)
    for _ in range(15):
        g = torch.randn(64, 9, generator=gen)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[ours]["exp_avg"], ref.state[theirs]["exp_avg"], rtol=1e-5, atol=1e-7)
        # torch weighs g² by fp32(1 - β2) = 0.001f, we by 1 - fp32(β2) = 0.00099998713 (so that the EMA
        # weights sum to exactly 1 and match the bias correction 1 - fp32(β2)^t): 1.3e-5 relative apart.
        torch.testing.assert_close(opt.state[ours]["exp_avg_sq"], ref.state[theirs]["exp_avg_sq"],
                                   rtol=1.5e-5, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adan_first_step_has_no_gradient_difference(backend):
    """Δ₁ = 0: after one step v = 0, prev_grad = g, and θ₁ = (θ₀ − γ·g/(|g| + ε)) / (1 + γλ) since
    m̂ = g and n̂ = g² when Δ = 0."""
    lr, wd, eps = 0.1, 0.05, 1e-8
    theta0 = torch.tensor([1.0, -2.0, 0.5, 3.0])
    g = torch.tensor([0.3, -0.2, 0.0, 4.0])
    p = theta0.clone()
    opt = Adan([p], lr=lr, weight_decay=wd, eps=eps, backend=backend)
    p.grad = g.clone()
    opt.step()
    assert torch.equal(opt.state[p]["exp_avg_diff"], torch.zeros(4))
    assert torch.equal(opt.state[p]["prev_grad"], g)
    expected = (theta0 - lr * g / (g.abs() + eps)) / (1 + lr * wd)
    torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-7)
    # the second step sees the real difference
    g2 = torch.tensor([0.1, 0.1, 0.1, 0.1])
    p.grad = g2.clone()
    opt.step()
    torch.testing.assert_close(opt.state[p]["exp_avg_diff"], (1 - 0.92) * (g2 - g), rtol=1e-6, atol=1e-8)


@triton.jit
def _one_minus_exp_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, one_minus_exp(tl.load(x_ptr + offs)))


def test_kernel_one_minus_exp_is_accurate():
    """1 - exp(x) near 0 cancels (1.3e-5 relative error for 1 - 0.999**1 in fp32); the kernels' series must be
    within a few fp32 ulps of the exact value everywhere, and the reference path exact."""
    x = -torch.cat([torch.logspace(-9, 1.5, 2000), torch.tensor([0.25, 0.2500001, 0.2499999])])
    x = torch.nn.functional.pad(x, (0, 2048 - x.numel()), value=-1.0).float()
    out = torch.empty_like(x)
    _one_minus_exp_kernel[(1,)](x, out, BLOCK=2048)
    exact = -torch.expm1(x.double())
    torch.testing.assert_close(out.double(), exact, rtol=4e-7, atol=0)
    torch.testing.assert_close(reference_one_minus_exp(x).double(), exact, rtol=6e-8, atol=0)
