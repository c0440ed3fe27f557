"""torch.amp.GradScaler with the fused optimizers (``_step_supports_amp_scaling``): the step unscales the grads as
the kernels read them and skips itself when GradScaler found an inf or NaN, on every backend."""

from __future__ import annotations

import pytest
import torch
from cases import FIRST_CASES, SYNC_WRAPPERS, case_named
from test_tensor_lr import _NoHostReads

from fusedoptim import Lookahead, Scout

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


def test_the_triton_and_reference_steps_read_found_inf_on_the_device():
    """On the Triton and reference paths GradScaler's step issues no ``.item()``: whether to skip is decided in the
    kernels, or by a select on the device (torch's foreach AdamW, which does not declare the support, reads found_inf
    on the host; the C++ path reads it from host memory)."""
    counted = []
    item = torch.Tensor.item

    def counting(self):
        counted.append(1)
        return item(self)

    results = {}
    for name, make in (("triton", lambda ps: case_named("lamb").make(ps, backend="triton")),
                       ("reference", lambda ps: case_named("lamb").make(ps, backend="reference")),
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
    assert results["triton"] == results["reference"] == 0 and results["torch"] >= 1, results


#: Bases by backend; "torch-fused" is torch's fused AdamW (it declares the support): the wrapper's slow weights then
#: live in its own buffers, synced on the C++ path.
WRAPPED_BASES = {
    "reference": lambda ps: case_named("adabelief").make(ps, backend="reference"),
    "cpu": lambda ps: case_named("adan").make(ps, backend="cpu"),
    "triton": lambda ps: case_named("lamb").make(ps, backend="triton"),
    "torch-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
}


def _wrapper_state(opt, params):
    state = _state(opt, params)
    if isinstance(opt, Scout):
        state += [opt.snapshots(p).clone() for p in params]
    return state


@pytest.mark.parametrize("base", list(WRAPPED_BASES))
@pytest.mark.parametrize("wrapper", list(SYNC_WRAPPERS))
def test_a_wrapper_skips_a_step_with_an_inf_and_does_not_count_it(wrapper, base):
    """Through a wrapper, GradScaler's scaled grads give the steps plain grads give, and a step with an inf is not
    taken: not by the base, and not counted by the wrapper, so its syncs (and Scout's snapshots) come at the same
    steps taken as for a twin that never saw the bad steps, bitwise. Counted on the device: no host read decides."""
    gen = torch.Generator().manual_seed(2)
    start = [torch.randn(s, generator=gen) for s in SHAPES]
    scaled, plain = [p.clone() for p in start], [p.clone() for p in start]
    opt, twin = SYNC_WRAPPERS[wrapper](WRAPPED_BASES[base](scaled)), SYNC_WRAPPERS[wrapper](WRAPPED_BASES[base](plain))
    assert opt._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    bad_steps = (2, 4, 8)  # 2 and 8 where the twin syncs next (steps 3 and 6 taken)
    for step in range(11):
        grads = _grads(gen)
        if step in bad_steps:
            grads[2][100] = float("inf") if step != 4 else float("nan")
        before = _wrapper_state(opt, scaled)
        scale = scaler.scale(torch.ones(())).detach()
        for p, q, g in zip(scaled, plain, grads, strict=True):
            p.grad, q.grad = g * scale, g.clone()
        scaler.step(opt)
        scaler.update()
        if step in bad_steps:
            assert all(torch.equal(a, b) for a, b in zip(_wrapper_state(opt, scaled), before, strict=True))
        else:
            twin.step()
    assert opt.fast_steps == twin.fast_steps == 11 - len(bad_steps)
    for a, b in zip(_wrapper_state(opt, scaled), _wrapper_state(twin, plain), strict=True):
        assert torch.equal(a, b)
    restored = SYNC_WRAPPERS[wrapper](WRAPPED_BASES[base]([p.clone() for p in scaled]))
    restored.load_state_dict(opt.state_dict())  # the count read back from the device
    assert restored.fast_steps == 8
    assert scaler.get_scale() == 2.0**10 / 2**3 * 2  # three backoffs, one growth (3 good steps after the last inf)


def test_a_wrapper_step_through_gradscaler_reads_nothing_on_the_host():
    """On the Triton path a GradScaler step through Lookahead or Scout calls no .item(), .tolist(), __float__ or
    .cpu(): the wrapper's count, its syncs and Scout's ring position are decided on the device."""
    for make in SYNC_WRAPPERS.values():
        params = [torch.randn(s) for s in SHAPES]
        opt, scaler = make(WRAPPED_BASES["triton"](params)), torch.amp.GradScaler("cpu")
        for step in range(4):
            scaler.scale(torch.ones(()))
            for p in params:
                p.grad = torch.randn_like(p)
            if step == 0:
                scaler.step(opt)  # warm-up: layout, tables
            else:
                with _NoHostReads():
                    scaler.step(opt)
            scaler.update()
        assert opt.fast_steps == 4


def test_a_wrapper_around_a_base_without_the_support_takes_gradscalers_own_path():
    """torch's foreach AdamW does not take GradScaler's scale: neither does its wrapper, so GradScaler unscales the
    grads itself and skips the wrapper's step on an inf, and neither the base nor the wrapper's count moves."""
    params = [torch.randn(s) for s in SHAPES]
    opt = Lookahead(torch.optim.AdamW(params, foreach=True), sync_period=2)
    assert not opt._step_supports_amp_scaling
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
