"""Lookahead and Scout: the paper's algorithm, shared param groups, checkpoints, and Scout's NaN-free rate.

The tensors live on the tests' one device (tests/devices.py, ``FUSEDOPTIM_TEST_DEVICE``), drawn on the CPU and
moved: on cuda the Triton syncs and bases run compiled, and torch's SGD on CUDA tensors.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from devices import DEVICE
from helpers import assert_param_close, assert_steps_like_twin, assert_tensor_state_close

from fusedoptim import LAMB, AdaBelief, AdEMAMix, Lookahead, Scout

BASES = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "ademamix": lambda params: AdEMAMix(params, lr=1e-2),
    "lamb-triton": lambda params: LAMB(params, lr=1e-2, weight_decay=0.1, backend="triton"),
}


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(7, generator=gen), torch.randn(3, 5, generator=gen), torch.randn(4, generator=gen).bfloat16()]
    return [p.to(DEVICE) for p in params]


def _grads(step, params):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype).to(DEVICE) for p in params]


def _step(opt, params, step):
    for p, g in zip(params, _grads(step, params), strict=True):
        p.grad = g
    opt.step()


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize(("rate", "period"), [(0.5, 6), (0.8, 1), (0.3, 4)])
def test_lookahead_is_the_papers_algorithm(base, rate, period):
    params, ref_params = _params(), _params()
    opt = Lookahead(BASES[base](params), sync_rate=rate, sync_period=period)
    ref = BASES[base](ref_params)
    slow = [p.double() for p in ref_params]  # φ = θ₀, at construction
    for step in range(1, 14):
        _step(opt, params, step)
        _step(ref, ref_params, step)
        if step % period == 0:
            with torch.no_grad():
                for s, p in zip(slow, ref_params, strict=True):
                    s += rate * (p.double() - s)
                    p.copy_(s)
        for p, q, s in zip(params, ref_params, slow, strict=True):
            assert_param_close(p, q, f"{base} step {step}")  # bf16: 1 ULP (fp32 vs fp64 slow weights)
            if p.dtype == torch.float32:
                assert_tensor_state_close(opt.state[p]["slow_param"], s, f"{base} slow {step}")
            else:  # the fast weight the sync reads is 1 ULP apart at most, so is the slow one in that dtype
                assert_param_close(opt.state[p]["slow_param"].to(p.dtype), s.to(p.dtype), f"{base} slow {step}")
            with torch.no_grad():  # measure each step on its own
                q.copy_(p)
                s.copy_(opt.state[p]["slow_param"])


def test_sync_rate_one_is_the_base_and_virtex_keywords():
    params, ref_params = _params(), _params()
    opt, ref = Lookahead(torch.optim.SGD(params, lr=0.1), sync_rate=1.0, sync_period=2), torch.optim.SGD(ref_params,
                                                                                                      lr=0.1)
    for step in range(1, 7):
        _step(opt, params, step)
        _step(ref, ref_params, step)
    assert all(torch.equal(p, q) for p, q in zip(params, ref_params, strict=True))
    # virtex: Lookahead(optimizer, k=5, alpha=0.8): p ← α·p + (1 − α)·slow every 5 steps
    p = torch.randn(10).to(DEVICE)
    slow = p.clone()
    v = Lookahead(torch.optim.SGD([p], lr=0.1), k=5, alpha=0.8)
    assert (v.sync_period, v.sync_rate) == (5, 0.8)
    for step in range(5):
        p.grad = torch.full((10,), float(step), device=DEVICE)
        v.step()
    fast = slow - 0.1 * (0 + 1 + 2 + 3 + 4)
    torch.testing.assert_close(p, 0.8 * fast + 0.2 * slow)


@pytest.mark.parametrize("wrapper", [Lookahead, Scout])
@pytest.mark.parametrize("base", list(BASES))
def test_checkpoint_mid_period_resumes_identically(wrapper, base):
    params = _params()
    opt = wrapper(BASES[base](params), sync_period=4)
    for step in range(1, 7):  # 6 steps: one sync done, saved in the middle of the second period
        _step(opt, params, step)
    buffer = io.BytesIO()
    torch.save({"params": [p.clone() for p in params], "opt": opt.state_dict()}, buffer)
    for step in range(7, 12):
        _step(opt, params, step)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh_params = saved["params"]
    fresh = wrapper(BASES[base](fresh_params), sync_period=4)
    fresh.load_state_dict(saved["opt"])
    assert fresh.fast_steps == 6
    for step in range(7, 12):
        _step(fresh, fresh_params, step)
    for p, q in zip(params, fresh_params, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["slow_param"], fresh.state[q]["slow_param"])
    assert opt.fast_steps == fresh.fast_steps == 11


def _base(name, groups):
    return AdEMAMix(groups, lr=0.1) if name == "ademamix" else torch.optim.SGD(groups, lr=0.1)


def _wrapped(wrapper, base):
    # Scout at sync_rate 0: its rate is 1 − coherence, not clamped to sync_rate, so the sync depends on the snapshots
    return wrapper(base, sync_rate=0.0) if wrapper is Scout else wrapper(base)


@pytest.mark.parametrize("base", ["ademamix", "sgd"])
@pytest.mark.parametrize("wrapper", [Lookahead, Scout])
def test_scheduler_and_add_param_group(wrapper, base):
    """A group added after the first step steps and syncs exactly as if it had been there from the start without
    a gradient on that step (its slow weight is its value when added), bitwise, and so do the other params."""
    params, ref_params = _params(), _params()
    opt = _wrapped(wrapper, _base(base, params[:2]))
    # the reference: the third param in its own group from the start, at twice the lr the scheduler halves
    ref = _wrapped(wrapper, _base(base, [{"params": ref_params[:2]}, {"params": ref_params[2:], "lr": 0.02}]))
    sched, ref_sched = (torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, ref))
    _step(opt, params[:2], 1)
    _step(ref, ref_params[:2], 1)  # ref_params[2] has no gradient: not stepped
    sched.step()
    ref_sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.05
    assert opt.param_groups is opt.base_optimizer.param_groups
    opt.add_param_group({"params": [params[2]], "lr": 0.01})
    assert ref.param_groups[1]["lr"] == opt.param_groups[1]["lr"] == 0.01
    assert torch.equal(opt.state[params[2]]["slow_param"], ref.state[ref_params[2]]["slow_param"])
    for step in range(2, 14):  # two syncs (steps 6 and 12)
        _step(opt, params, step)
        _step(ref, ref_params, step)
        for i, (p, q) in enumerate(zip(params, ref_params, strict=True)):
            assert torch.equal(p, q), f"step {step} param {i}"
            assert torch.equal(opt.state[p]["slow_param"], ref.state[q]["slow_param"]), f"step {step} slow {i}"
    assert opt.state[params[2]]["slow_param"].dtype == torch.float32


def test_slow_weight_swap_for_evaluation():
    params = _params()
    opt = Lookahead(torch.optim.SGD(params, lr=0.1), sync_period=3)
    for step in range(1, 3):
        _step(opt, params, step)
    fast = [p.clone() for p in params]
    with pytest.raises(RuntimeError, match="load_slow_weights"):
        opt.restore_fast_weights()
    opt.load_slow_weights()
    assert all(torch.equal(p, opt.state[p]["slow_param"].to(p.dtype)) for p in params)
    with pytest.raises(RuntimeError, match="already loaded"):
        opt.load_slow_weights()
    opt.restore_fast_weights()
    assert all(torch.equal(p, f) for p, f in zip(params, fast, strict=True))


def test_scout_frozen_entry_and_validation():
    with pytest.raises(ValueError, match="sync_period"):
        Scout(torch.optim.SGD([torch.randn(3)], lr=0.1), sync_period=1)
    with pytest.raises(ValueError, match="sync_rate"):
        Lookahead(torch.optim.SGD([torch.randn(3)], lr=0.1), sync_rate=1.5)
    p, frozen = torch.randn(6).to(DEVICE), torch.randn(4).to(DEVICE)
    opt = Scout(torch.optim.SGD([p, frozen], lr=0.1), sync_period=3)
    for _ in range(1, 7):
        p.grad = torch.randn(6).to(DEVICE)
        p.grad[0] = 0.0  # one entry that never moves
        frozen.grad = torch.zeros(4, device=DEVICE)  # a whole tensor that never moves
        opt.step()
        assert torch.isfinite(p).all() and torch.isfinite(frozen).all()
    assert torch.isfinite(opt.last_rate())
    # the k - 1 snapshots of all params (the params at a sync are the k-th): one preallocated flat ring per bucket
    storages = {opt.snapshots(q).untyped_storage().data_ptr() for q in (p, frozen)}
    assert len(storages) == 1 and opt.snapshots(frozen).shape == (2, 4)


def test_scout_rate_is_holocrons_statistic():
    """Without constant entries the rate equals holocron's formula: max(1 − mean_j mean(std/maxdev), sync_rate)."""
    torch.manual_seed(0)
    params = [torch.randn(5).to(DEVICE), torch.randn(2, 3).to(DEVICE)]
    k = 4
    opt = Scout(torch.optim.SGD(params, lr=1.0), sync_rate=0.0, sync_period=k)
    history = [[p.clone()] for p in params]
    for _ in range(k - 1):
        for p in params:
            p.grad = (torch.randn(p.shape) * torch.rand(p.shape)).to(DEVICE)
        opt.step()
        for h, p in zip(history, params, strict=True):
            h.append(p.clone())
    for p in params:
        p.grad = torch.randn(p.shape).to(DEVICE)
    opt.base_optimizer.step()  # the k-th step, before the wrapper's statistic
    for h, p in zip(history, params, strict=True):
        h.append(p.clone())
    opt.fast_steps += 1  # last_rate(): the ring's k - 1 snapshots, then the params
    coherence = []
    for h in history:
        stack = torch.stack(h)
        updates = stack[1:] - stack[:-1]
        maxdev = (updates - updates.mean(0)).abs().max(0).values
        coherence.append((updates.std(0) / maxdev).mean())
    expected = max(1 - torch.stack(coherence).mean().item(), 0.0)
    assert opt.last_rate().item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("base", ["sgd", "ademamix"])
@pytest.mark.parametrize("wrapper", [Lookahead, Scout])
def test_repr_deepcopy_and_pickle(wrapper, base):
    """A deep copy and a pickled copy, taken after one step, are independent of the original and, stepped with
    the same gradients across a sync, equal the original bitwise (params, slow weights, base states)."""
    params = _params()
    opt = _wrapped(wrapper, _base(base, params))
    assert len(repr(opt).split("\n")) == len(repr(opt.base_optimizer).split("\n")) + 4
    _step(opt, params, 1)
    before = [p.clone() for p in params]
    clones = [copy.deepcopy((params, opt)), pickle.loads(pickle.dumps((params, opt)))]
    for params2, opt2 in clones:
        for step in range(2, 9):  # a sync at step 6
            _step(opt2, params2, step)
        assert opt2.fast_steps == 8
    assert opt.fast_steps == 1 and all(torch.equal(p, b) for p, b in zip(params, before, strict=True))  # untouched
    for step in range(2, 9):
        _step(opt, params, step)
    for params2, opt2 in clones:
        for i, (p, q) in enumerate(zip(params, params2, strict=True)):
            assert torch.equal(p, q), f"param {i}"
            assert opt.state[p].keys() == opt2.state[q].keys()
            for name, value in opt.state[p].items():
                assert torch.equal(value, opt2.state[q][name]), f"param {i} {name}"
            assert opt.state[p]["slow_param"].data_ptr() != opt2.state[q]["slow_param"].data_ptr()


SYNC_BASES = {
    "adabelief": lambda params, backend: AdaBelief(params, lr=1e-2, backend=backend),
    "lamb": lambda params, backend: LAMB(params, lr=1e-2, weight_decay=0.1, backend=backend),
}


@pytest.mark.parametrize("base", list(SYNC_BASES))
def test_fused_sync_matches_separate_and_reference(base):
    """Sync inside the base's last pass (Triton), a separate Triton sync launch, and the reference path agree
    within the parity tolerances, for an elementwise and a layer-wise base; a param without a gradient on a
    sync step is synced by a separate launch."""
    runs = {}
    for name, backend, fused in (("in-step", "triton", True), ("separate", "triton", False),
                                 ("reference", "reference", True)):
        params = _params()
        opt = Lookahead(SYNC_BASES[base](params, backend), sync_rate=0.5, sync_period=3, fused_sync=fused)
        for step in range(1, 8):
            _step(opt, params, step)
            if step == 5:  # next step (6) is a sync step where param 0 has no gradient
                params[0].grad = None
                for p, g in zip(params[1:], _grads(6, params)[1:], strict=True):
                    p.grad = g
                opt.step()
        runs[name] = (params, opt)
    # in the step and separately: the same fast weight (as stored) enters the same fp32 interpolation
    (in_step, opt_a), (separate, opt_b) = runs["in-step"], runs["separate"]
    for p, q in zip(in_step, separate, strict=True):
        assert torch.equal(p, q) and torch.equal(opt_a.state[p]["slow_param"], opt_b.state[q]["slow_param"])
    # against the reference (fp32 params: 7 steps without re-synchronisation; bf16 per step is test_parity's)
    ref_params, ref = runs["reference"]
    for p, q in zip(in_step, ref_params, strict=True):
        if p.dtype == torch.float32:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
            assert_tensor_state_close(opt_a.state[p]["slow_param"], ref.state[q]["slow_param"], f"{base} slow")


def test_triton_sync_of_a_torch_base_matches_reference():
    results = []
    for backend in ("triton", "reference"):
        params = _params()
        opt = Lookahead(torch.optim.SGD(params, lr=0.1, momentum=0.9), sync_period=2, backend=backend)
        for step in range(1, 6):
            _step(opt, params, step)
        results.append((params, opt))
    (a, oa), (b, ob) = results
    for p, q in zip(a, b, strict=True):
        # fp32 params (bf16 ones drift by interpreter truncation over several syncs; per step: test_parity)
        if p.dtype == torch.float32:  # the same torch SGD steps; only the sync differs
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
            assert_tensor_state_close(oa.state[p]["slow_param"], ob.state[q]["slow_param"], "slow")


_WRAPPER_SPOILS = {
    "fast_steps negative": lambda sd: [g.update(fast_steps=-1) for g in sd["param_groups"]],
    "fast_steps not an int": lambda sd: [g.update(fast_steps="3") for g in sd["param_groups"]],
    "sync_period 0": lambda sd: [g.update(sync_period=0) for g in sd["param_groups"]],
    "sync_rate 2": lambda sd: [g.update(sync_rate=2.0) for g in sd["param_groups"]],
    "slow weights of the wrong size": lambda sd: sd["state"][0].update(slow_param=torch.zeros(2)),
    "slow weights of ints": lambda sd: sd["state"][0].update(slow_param=sd["state"][0]["slow_param"].long()),
    "no slow weights for one param": lambda sd: sd["state"][1].pop("slow_param"),
    "snapshots of the wrong size": lambda sd: sd["state"][0].update(snapshots=torch.zeros(2)),
    "another sync_period": lambda sd: [g.update(sync_period=4) for g in sd["param_groups"]],
    "bad base state": lambda sd: sd["state"][0].update(step="x"),
}


@pytest.mark.parametrize("spoil", list(_WRAPPER_SPOILS))
@pytest.mark.parametrize("wrapper", ["lookahead", "scout"])
def test_a_bad_wrapper_state_dict_loads_nothing(wrapper, spoil):
    """The wrapper's entries (counters, slow weights, Scout's snapshots) are checked with the base's before anything
    is loaded: a bad one raises and the wrapper, its base and their state are as they were."""
    import copy

    from fusedoptim import LAMB, Lookahead, Scout

    if wrapper == "lookahead" and spoil in ("snapshots of the wrong size", "another sync_period"):
        pytest.skip("Lookahead keeps no snapshots, and may load another sync_period")
    cls = Lookahead if wrapper == "lookahead" else Scout

    def make():
        torch.manual_seed(0)
        params = [torch.randn(5), torch.randn(4, 3)]
        return params, cls(LAMB(params, lr=1e-2, backend="cpu"), sync_period=3)

    params, opt = make()
    twin_params, twin = make()
    for o, ps in ((opt, params), (twin, twin_params)):
        for _ in range(4):
            for p in ps:
                p.grad = torch.ones_like(p)
            o.step()
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        group["lr"] = 0.5  # valid, and must not land either
    if spoil != "bad base state":
        sd["state"][0]["step"] = sd["state"][0]["step"] + 7  # valid too
    _WRAPPER_SPOILS[spoil](sd)
    with pytest.raises((ValueError, KeyError)):
        opt.load_state_dict(sd)
    assert opt.fast_steps == twin.fast_steps and opt.param_groups[0]["lr"] == twin.param_groups[0]["lr"]
    assert_steps_like_twin(opt, params, twin, twin_params, steps=3)  # through a sync


# ---------------------------------------------------------------------------------------------- Scout's fused sync
SCOUT_BACKENDS = ["reference", "cpu", "triton"]


def _scout_params(dtype):
    """Ragged tensors: one of no element, one channels_last (its ring rows are in its memory order), one above a
    C++ chunk (4096) and a Triton interpreter block."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(7, 5), (1,), (0,), (4, 3, 3, 3), (5000,)]
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    params[3] = params[3].to(memory_format=torch.channels_last)
    return [p.to(DEVICE) for p in params]


def _backend_ok(backend):
    if backend == "cpu" and DEVICE.type != "cpu":
        pytest.skip("the C++ backend runs on CPU tensors")


@pytest.mark.parametrize(("dtype", "period"), [(torch.float32, 4), (torch.bfloat16, 4), (torch.float16, 4),
                                               (torch.float32, 10)])  # 10: the C++ loop for periods above 8
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_scout_ring_and_coherence_sums_equal_the_reference_bitwise(backend, dtype, period):
    """One call (C++) or launch (Triton) per bucket writes a ring row, or sums each tensor's coherence with the
    params as the last snapshot: both bitwise the reference's (optim/scout.py), constant entries, an empty tensor
    and a channels_last one included."""
    _backend_ok(backend)
    params = _scout_params(dtype)
    results = {}
    for name in ("reference", backend):
        opt = Scout(torch.optim.SGD(params, lr=0.1), sync_period=period, backend=name)
        (bucket,) = opt._holder.bucket_layout()
        ring = opt._ring(bucket)
        gen = torch.Generator().manual_seed(4)
        ring.copy_(torch.randn(ring.shape, generator=gen))
        ring[:, :10] = bucket.states["slow_param"][:10]  # entries that never moved: left out of the means
        written = ring.clone()
        executor = bucket.executor
        assert executor.name == name
        assert executor.snapshot(bucket, written, 1, False) is None
        sums = executor.snapshot(bucket, ring, -1, True)
        results[name] = (written, sums)
    (ref_ring, ref_sums), (ring, sums) = results["reference"], results[backend]
    assert torch.equal(ring, ref_ring) and torch.equal(sums, ref_sums)
    assert sums.dtype == torch.float64 and sums.shape == (5, 2)
    assert sums[2].tolist() == [0.0, 0.0] and sums[0, 1] == 35 - 10 and sums[4, 1] == 5000  # counts of entries varied
    assert (sums[:, 0] <= sums[:, 1]).all() and (sums[[0, 1, 3, 4], 0] > 0).all()  # each ratio is in (0, 1]


def _holocron_rate(opt, params):
    """The rate by holocron's formula (torch's std, mean and sums), left-out constant entries aside."""
    coherences = []
    for p in params:
        slow, snaps, p = opt.state[p]["slow_param"], opt.snapshots(p), p.detach()
        history = [slow.reshape(1, -1), snaps.reshape(snaps.shape[0], -1), p.reshape(1, -1)]
        updates = torch.diff(torch.cat(history), dim=0)
        deviation = (updates - updates.mean(0)).abs().amax(0)
        varies = deviation > 0
        if varies.any():
            coherences.append((updates.std(0)[varies] / deviation[varies]).double().mean())
    return max(1 - torch.stack(coherences).mean().item(), opt.sync_rate) if coherences else opt.sync_rate


@pytest.mark.parametrize("backend", SCOUT_BACKENDS)
def test_scout_steps_like_the_reference_on_every_backend_and_as_holocron(backend):
    """Scout around torch's SGD (the same base steps everywhere) on the C++ and Triton paths: the first sync's rate
    is bitwise the reference's (the same history), every rate is holocron's formula, and params, slow weights and
    snapshots follow the reference (each backend's interpolation is its own: torch's lerp_ fuses a multiply-add,
    the C++ one does not, as for Lookahead)."""
    _backend_ok(backend)
    runs = {}
    for name in {"reference", backend}:
        params = [p.float().requires_grad_() for p in _scout_params(torch.float32)]
        opt = Scout(torch.optim.SGD(params, lr=0.1), sync_rate=0.05, sync_period=3, backend=name)
        rates = []
        for step in range(1, 8):
            for i, (p, g) in enumerate(zip(params, _grads(step, params), strict=True)):
                p.grad = None if (i == 1 and step == 3) else g  # a param without a gradient on a sync step
            if step % 3 == 0:  # the rate the sync is about to take, against holocron's formula
                opt.base_optimizer.step()
                expected = _holocron_rate(opt, params)
                rate = opt.last_rate()
                assert rate.dtype == torch.float32 and rate.shape == () and rate.device == params[0].device
                assert rate.item() == pytest.approx(expected, rel=1e-6)
                rates.append(rate)
                opt.fast_steps += 1
                opt._after_base_step()
            else:
                opt.step()
        runs[name] = (params, opt, rates)
    ref_params, ref, ref_rates = runs["reference"]
    params, opt, rates = runs[backend]
    assert rates[0].item() == ref_rates[0].item()
    assert [r.item() for r in rates] == pytest.approx([r.item() for r in ref_rates], rel=1e-6)
    for i, (p, q) in enumerate(zip(params, ref_params, strict=True)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"param {i}")
        assert_tensor_state_close(opt.state[p]["slow_param"], ref.state[q]["slow_param"], f"slow {i}")
        assert_tensor_state_close(opt.snapshots(p), ref.snapshots(q), f"snapshots {i}")


def test_scout_launches_once_per_bucket_on_triton():
    from fusedoptim import kernels

    params = _scout_params(torch.float32) + [torch.randn(9).bfloat16().to(DEVICE)]  # two buckets: two dtypes
    opt = Scout(torch.optim.SGD(params, lr=0.1), sync_period=3, backend="triton")
    for step in range(1, 4):
        for p, g in zip(params, _grads(step, params), strict=True):
            p.grad = g
        before = dict(kernels.LAUNCH_COUNTS)
        opt.step()
        launched = {k: v - before.get(k, 0) for k, v in kernels.LAUNCH_COUNTS.items() if v != before.get(k, 0)}
        # a snapshot per bucket; at the sync the coherence sums per bucket, then the sync per bucket
        expected = {"scout_snapshot_kernel": 2} | ({"multi_tensor_step_kernel": 2} if step == 3 else {})
        assert launched == expected, f"step {step}"


def test_scout_loads_the_older_k_row_snapshots():
    """Earlier versions saved k snapshots per param; the k-th (the params before the last sync) is never read, so
    such a state dict loads, and steps as the current one."""
    params, twin_params = _params(), _params()
    opt = Scout(torch.optim.SGD(params, lr=0.1), sync_period=4)
    for step in range(1, 7):
        _step(opt, params, step)
    saved = opt.state_dict()
    assert saved["state"][0]["snapshots"].shape == (3, 7)
    older = copy.deepcopy(saved)
    for entry, p in zip(older["state"].values(), params, strict=True):
        entry["snapshots"] = torch.cat([entry["snapshots"], p.detach().float().unsqueeze(0)])
    twin = Scout(torch.optim.SGD(twin_params, lr=0.1), sync_period=4)
    for step in range(1, 7):
        _step(twin, twin_params, step)
    twin.load_state_dict(older)
    for step in range(7, 13):
        _step(opt, params, step)
        _step(twin, twin_params, step)
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p, q) and torch.equal(opt.snapshots(p), twin.snapshots(q))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scouts_streaming_snapshot_stores_write_the_same_ring(dtype, monkeypatch):
    """Rings of 2 M elements and more take their rows with streaming stores on the C++ path (past the cache); forced
    on these ragged params (tails of 1, 3 and 0 elements past the 4-wide stores, an empty tensor, channels_last),
    every row and the sums are bitwise those of plain stores, by slot and by a position read from a tensor."""
    _backend_ok("cpu")
    from fusedoptim import _cpu

    results = {}
    for row in (1 << 62, 0):  # plain stores, then streaming ones
        monkeypatch.setattr(_cpu, "STREAMING_RING_ROW", row)
        params = _scout_params(dtype)
        opt = Scout(torch.optim.SGD(params, lr=0.1), sync_period=4, backend="cpu")
        (bucket,) = opt._holder.bucket_layout()
        ring = opt._ring(bucket)
        for slot in range(3):
            with torch.no_grad():
                for p, g in zip(params, _grads(slot, params), strict=True):
                    p.add_(g)
            if slot == 2:
                assert bucket.executor.snapshot(bucket, ring, torch.tensor([slot]), True) is not None
            else:
                assert bucket.executor.snapshot(bucket, ring, slot, False) is None
        results[row] = (ring.clone(), bucket.executor.snapshot(bucket, ring, -1, True))
    (plain, plain_sums), (streamed, streamed_sums) = results[1 << 62], results[0]
    assert torch.equal(plain, streamed) and torch.equal(plain_sums, streamed_sums)
    assert (plain[:, 10:] != 0).any(dim=1).all()  # every row written
