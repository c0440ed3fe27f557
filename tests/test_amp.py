"""torch.amp.GradScaler with the fused optimizers (``_step_supports_amp_scaling``): the step unscales the grads as
the kernels read them and skips itself when GradScaler found an inf or NaN, on every backend."""

from __future__ import annotations

import pytest
import torch
from cases import FIRST_CASES, case_named

from fusedoptim import Lookahead

BACKENDS = ["reference", "cpu", "triton"]
SHAPES = [(7,), (33, 31), (1025,), (4, 3, 2, 2)]


def _state(opt, params):
    return [p.detach().clone() for p in params] + [
        v.detach().clone() for p in params for v in opt.state[p].values() if isinstance(v, torch.Tensor)]


def _grads(gen):
    return [torch.randn(s, generator=gen) for s in SHAPES]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FIRST_CASES, ids=lambda c: c.name)
def test_a_scaled_step_equals_the_unscaled_step(case, backend):
    """GradScaler's grads, multiplied by its scale (a power of two), give the step the plain grads give: the
    kernels multiply by the inverse scale exactly as GradScaler's own unscale would (bitwise here), and the scale
    grows as with any optimizer."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in SHAPES]
    scaled, plain = [p.clone() for p in start], [p.clone() for p in start]
    opt, reference = case.make(scaled, backend=backend), case.make(plain, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    for _ in range(4):
        grads = _grads(gen)
        scale = scaler.scale(torch.ones(())).detach()  # the scale a scaled loss would carry
        for p, q, g in zip(scaled, plain, grads, strict=True):
            p.grad, q.grad = g * scale, g.clone()
        scaler.step(opt)
        scaler.update()
        reference.step()
    for a, b in zip(_state(opt, scaled), _state(reference, plain), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
        assert torch.equal(a, b)
    assert scaler.get_scale() == 2.0**12  # grown twice (growth_interval=2, 4 steps without an inf)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FIRST_CASES, ids=lambda c: c.name)
def test_an_inf_grad_skips_the_step(case, backend):
    """A step whose grads hold an inf (or a NaN) is not taken: params, states and steps stay bitwise, and the scale
    backs off as with torch's AdamW under the same GradScaler settings."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    opt = case.make(params, backend=backend)
    anchor_params = [p.clone() for p in params]
    anchor = torch.optim.AdamW(anchor_params)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8) for _ in range(2)]
    for step, bad in enumerate((None, float("inf"), float("nan"), None)):
        grads = _grads(gen)
        if bad is not None:
            grads[1][3, 5] = bad
        before = _state(opt, params)
        for scaler, group in zip(scalers, (params, anchor_params), strict=True):
            scale = scaler.scale(torch.ones(())).detach()
            for p, g in zip(group, grads, strict=True):
                p.grad = g * scale
        scalers[0].step(opt)
        scalers[1].step(anchor)
        for scaler in scalers:
            scaler.update()
        if bad is not None:
            assert all(torch.equal(a, b) for a, b in zip(_state(opt, params), before, strict=True))
        assert opt.state[params[0]]["step"].item() == step + 1 - (step >= 1) - (step >= 2)
        assert scalers[0].get_scale() == scalers[1].get_scale()
    assert scalers[0].get_scale() == 2.0**6


def test_the_triton_step_reads_found_inf_on_the_device():
    """On the Triton path GradScaler's step issues no ``.item()``: whether to skip is decided in the kernels
    (torch's foreach AdamW, which does not declare the support, reads found_inf on the host)."""
    counted = []
    item = torch.Tensor.item

    def counting(self):
        counted.append(1)
        return item(self)

    results = {}
    for name, make in (("fusedoptim", lambda ps: case_named("lamb").make(ps, backend="triton")),
                       ("torch", lambda ps: torch.optim.AdamW(ps, foreach=True))):
        params = [torch.randn(s) for s in SHAPES]
        opt, scaler = make(params), torch.amp.GradScaler("cpu")
        for p in params:
            p.grad = torch.ones_like(p)
        scaler.scale(torch.ones(()))
        scaler.step(opt)  # warm-up: layout, tables
        scaler.update()
        scaler.scale(torch.ones(()))
        counted.clear()
        torch.Tensor.item = counting
        try:
            scaler.step(opt)
        finally:
            torch.Tensor.item = item
        results[name] = len(counted)
    assert results["fusedoptim"] == 0 and results["torch"] >= 1, results


def test_a_wrapper_takes_gradscalers_own_path():
    """Lookahead does not declare the support: GradScaler unscales the grads itself and skips the wrapper's step on
    an inf, so neither the base nor the wrapper's step count moves."""
    params = [torch.randn(s) for s in SHAPES]
    opt = Lookahead(case_named("adan").make(params, backend="reference"), sync_period=2)
    assert not getattr(opt, "_step_supports_amp_scaling", False)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    before = [p.clone() for p in params]
    scaler.step(opt)
    assert opt.fast_steps == 0 and all(torch.equal(a, b) for a, b in zip(params, before, strict=True))


def test_bad_grad_scale_is_refused_before_anything_is_written():
    params = [torch.randn(s) for s in SHAPES]
    opt = case_named("adabelief").make(params, backend="reference")
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.clone() for p in params]
    opt.grad_scale, opt.found_inf = 2.0, torch.zeros(())
    with pytest.raises(TypeError, match="grad_scale .* must be a 1-element floating-point tensor"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True))
