"""Rules with per-tensor statistics (LARS, LAMB, RaLars, TAdam): hand-computed steps, edge cases, determinism
and the launch budget of the two-pass step."""

from __future__ import annotations

import math

import pytest
import torch
from cases import CASES, FIRST_CASES

from fusedoptim import LAMB, LARS, AdamP, RaLars, TAdam
from fusedoptim.kernels import LAUNCH_COUNTS

BACKENDS = ["reference", "triton"]
LAYERWISE = [c for c in CASES if c.cls.rule.two_pass]


def _one_step(opt_cls, theta, grad, backend, **kwargs):
    p = torch.tensor(theta)
    opt = opt_cls([p], backend=backend, **kwargs)
    p.grad = torch.tensor(grad)
    opt.step()
    return p, opt


@pytest.mark.parametrize("backend", BACKENDS)
def test_lamb_step_by_hand(backend):
    # θ = (3, 4): ‖θ‖ = 5. First step: m̂ = g, v̂ = g², so r = g/(|g| + ε) = (1, -1) up to ε.
    # u = r + λθ = (1.3, -0.6), ‖u‖ = √2.05; θ₁ = θ − lr·φ(5)/‖u‖·u.
    p, opt = _one_step(LAMB, [3.0, 4.0], [1.0, -2.0], backend, lr=0.1, weight_decay=0.1)
    ratio = 5.0 / math.sqrt(1.3**2 + 0.6**2)
    torch.testing.assert_close(p, torch.tensor([3.0 - 0.1 * ratio * 1.3, 4.0 + 0.1 * ratio * 0.6]),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(opt.last_factors()[p]["trust_ratio"], torch.tensor(ratio), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lars_step_by_hand(backend):
    # θ = (3, 4), g = (0.6, 0.8): ‖θ‖ = 5, ‖g‖ = 1. γ = η·5/(1 + λ·5) with η = 0.5, λ = 0.01;
    # d = γ(g + λθ) = γ·(0.63, 0.84); θ₁ = θ − lr·d (the first momentum buffer is d itself).
    p, opt = _one_step(LARS, [3.0, 4.0], [0.6, 0.8], backend, lr=0.1, momentum=0.9, weight_decay=0.01,
                       trust_coefficient=0.5)
    gamma = 0.5 * 5.0 / (1.0 + 0.01 * 5.0)
    expected = torch.tensor([3.0 - 0.1 * gamma * 0.63, 4.0 - 0.1 * gamma * 0.84])
    torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch.tensor([gamma * 0.63, gamma * 0.84]),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("scale_clip", "phi"), [((0.0, 2.0), 2.0), ((6.0, 10.0), 6.0), ((0.0, 10.0), 5.0)])
def test_scale_clip_clamps_both_ends(backend, scale_clip, phi):
    _, lars = _one_step(LARS, [3.0, 4.0], [0.6, 0.8], backend, lr=0.1, scale_clip=scale_clip)
    assert next(iter(lars.last_factors().values()))["trust_ratio"].item() == pytest.approx(phi, rel=1e-6)
    _, lamb = _one_step(LAMB, [3.0, 4.0], [1.0, -1.0], backend, lr=0.1, scale_clip=scale_clip)
    assert next(iter(lamb.last_factors().values()))["trust_ratio"].item() == pytest.approx(phi / math.sqrt(2),
                                                                                            rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LAYERWISE, ids=lambda c: c.name)
def test_zero_tensor_zero_gradient_zero_update(case, backend):
    """‖θ‖ = 0, g = 0 (so a zero update where there is no decay) and a 0-d param: finite, ratios 1 where a
    norm is 0, and a zero gradient without decay leaves θ unchanged."""
    zero_param, zero_grad, scalar = torch.zeros(6), torch.randn(5), torch.tensor(0.7)
    opt = case.make([zero_param, zero_grad, scalar], backend=backend)
    for _ in range(3):
        zero_param.grad, zero_grad.grad, scalar.grad = torch.randn(6), torch.zeros(5), torch.tensor(0.3)
        before = zero_grad.clone()
        opt.step()
        for p in (zero_param, zero_grad, scalar):
            assert torch.isfinite(p).all(), case.name
            assert all(torch.isfinite(v).all() for v in opt.state[p].values()), case.name
        decays = case.full_kwargs().get("weight_decay", 0.0) != 0
        if not decays and case.cls is not TAdam:  # TAdam's first moment still moves towards 0 ...
            assert torch.equal(zero_grad, before), case.name
    factors = opt.last_factors()
    if case.cls in (LAMB, LARS) and not case.full_kwargs().get("weight_decay"):
        assert factors[zero_grad]["trust_ratio"].item() == 1.0  # ‖g‖ = 0 (LARS) or ‖u‖ = 0 (LAMB)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ralars_rectification_starts_when_rho_exceeds_4(backend):
    p = torch.randn(20)
    opt = RaLars([p], lr=1e-2, backend=backend)
    beta2 = torch.tensor(0.999, dtype=torch.float32).item()  # the β2 the kernels see, used consistently
    rho_inf = 2 / (1 - beta2) - 1
    for t in range(1, 9):
        p.grad = torch.randn(20)
        opt.step()
        rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
        expected = 1.0 if t < 5 else math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf
                                               / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        assert opt.last_factors()[p]["rectification"].item() == pytest.approx(expected, rel=1e-5), t


@pytest.mark.parametrize("backend", BACKENDS)
def test_tadam_dof_inf_is_adam(backend):
    ours = torch.randn(30)
    theirs = ours.clone()
    opt = TAdam([ours], lr=1e-2, dof=math.inf, backend=backend)
    adam = torch.optim.Adam([theirs], lr=1e-2, foreach=False)
    for _ in range(10):
        g = torch.randn(30)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        adam.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_tadam_rejects_beta1_zero():
    with pytest.raises(ValueError, match="betas\\[0\\] > 0"):
        TAdam([torch.randn(3)], betas=(0.0, 0.999))


@pytest.mark.parametrize("case", LAYERWISE, ids=lambda c: c.name)
def test_fused_runs_are_bitwise_identical(case):
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(3)
        params = [torch.randn(n, generator=gen) for n in (5000, 9000, 3)]
        opt = case.make(params, backend="triton")
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs.append((params, [f for v in opt.last_factors().values() for f in v.values()]))
    (a, fa), (b, fb) = runs
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(fa, fb, strict=True))


@pytest.mark.parametrize("case", [c for c in FIRST_CASES if c.cls.rule.two_pass], ids=lambda c: c.name)
def test_at_most_three_launches_whatever_the_tensor_count(case):
    counts = {}
    for n in (10, 300):  # 1000 took 25-57 s a rule in the interpreter (a program per tensor), 300 about 8
        params = [torch.ones(3) for _ in range(n)]
        opt = case.make(params, backend="triton")
        for p in params:
            p.grad = torch.ones(3)
        before = sum(LAUNCH_COUNTS.values())
        opt.step()
        counts[n] = sum(LAUNCH_COUNTS.values()) - before
    assert counts == {10: 3, 300: 3}  # pass A, segment sum, pass B


def _orthogonal_rows(theta: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A gradient whose every row is orthogonal to the same row of theta."""
    g = torch.randn(theta.shape, generator=gen)
    return g - theta * (g * theta).sum(1, keepdim=True) / (theta * theta).sum(1, keepdim=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["channel", "layer"])
def test_adamp_projection_fires_on_orthogonal_gradients(backend, view):
    """Per-row orthogonal gradients project channel-wise; a gradient orthogonal to θ only as a whole (rows
    aligned with ±θ_c, cancelling) projects layer-wise. Both checked against the official algorithm."""
    from oracles import adamp_oracle

    gen = torch.Generator().manual_seed(5)
    theta0 = torch.randn(6, 40, generator=gen)
    if view == "channel":
        grads = [_orthogonal_rows(theta0, gen)]
    else:  # rows 0..2 along +θ_c, rows 3..5 along −θ_c scaled so that θ·g = 0 overall
        g = theta0.clone()
        g[3:] *= -(theta0[:3] ** 2).sum() / (theta0[3:] ** 2).sum()
        grads = [g]
    p = theta0.clone()
    kwargs = dict(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, amsgrad=False, delta=0.1,
                  wd_ratio=0.1, nesterov=False)
    opt = AdamP([p], backend=backend, **kwargs)
    p.grad = grads[0].clone()
    opt.step()
    factors = opt.last_factors()[p]
    assert torch.allclose(factors["decay"], torch.tensor(1 - 0.1 * 0.1 * 0.1))  # wd_ratio applied: projected
    assert factors["projection"].item() == 0.0  # the tensor's own segment; the rows carry the coefficients
    expected = adamp_oracle(theta0, grads, maximize=False, **kwargs)
    torch.testing.assert_close(p.double(), expected, rtol=1e-5, atol=1e-6)
    # the update kept θ's direction out: per row (channel) or as a whole (layer)
    delta = (p - theta0 * (1 - 0.1 * 0.1 * 0.1)).double()
    radial = (delta * theta0).sum(1) if view == "channel" else (delta * theta0).sum()
    assert radial.abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_adamp_never_projects_1d_params(backend):
    bias = torch.randn(64)
    opt = AdamP([bias], lr=0.1, weight_decay=0.1, delta=1e9, backend=backend)  # any cosine passes the test
    bias.grad = torch.randn(64)
    opt.step()
    factors = opt.last_factors()[bias]
    assert factors["projection"].item() == 0.0
    assert factors["decay"].item() == pytest.approx(1 - 0.1 * 0.1)  # no wd_ratio: not projected


@pytest.mark.parametrize("case", LAYERWISE, ids=lambda c: c.name)
def test_device_finalize_matches_the_torch_finalize(case):
    """The Triton finalize in the segment sum's epilogue against the rule's torch finalize (the reference) on the
    same sums and steps: the factors of every segment (AdamP's rows too, with tensors projecting channel-wise,
    layer-wise and not at all) and the per-tensor states, also on a step where one tensor has no gradient. Segments
    of several chunks take the two-level sum (the interpreter's groups are one chunk)."""
    gen = torch.Generator().manual_seed(11)
    params = [torch.randn(6, 40, generator=gen), torch.randn(5000, generator=gen), torch.randn(3, 5, generator=gen),
              torch.randn(9000, generator=gen)]
    opt = case.make(params, backend="triton")
    rule = type(opt).rule
    for step in range(3):
        grads = [_orthogonal_rows(params[0], gen), torch.randn(5000, generator=gen), torch.randn(3, 5, generator=gen),
                 None if step == 2 else torch.randn(9000, generator=gen)]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        (bucket,) = opt.bucket_layout()
        before = tuple(t.clone() for t in bucket.tensor_states.values())
        opt.step()
        group = opt.param_groups[0]
        expected, states = rule.finalize(bucket.sums, bucket.steps, bucket.segments, before, *opt._hyper(group),
                                         *opt._flags(group))
        torch.testing.assert_close(bucket.factors, expected.float(), rtol=1e-6, atol=1e-7)
        active = torch.tensor([g is not None for g in grads])
        for new, old, updated in zip(bucket.tensor_states.values(), before, states, strict=True):
            torch.testing.assert_close(new, torch.where(active, updated.float(), old), rtol=1e-6, atol=0)
    if rule.row_statistics:  # the channel view fired for the orthogonal rows: the rows carry coefficients
        assert bucket.factors[len(params):len(params) + 6, 0].abs().sum() > 0
