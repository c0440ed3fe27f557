"""The C++ CPU backend: availability and fallback, thread splitting at scale, validation before writing.

Parity with the reference over every registry case, profile and dtype is in test_parity.py.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from cases import CASES, FIRST_CASES, case_named
from helpers import assert_param_close, assert_state_close, assert_tensor_state_close

from fusedoptim import AdaBelief, Adan, _cpu


@pytest.fixture
def no_compiler(monkeypatch):
    """The extension cannot be built: as on a machine without a C++ compiler."""
    def fail():
        raise RuntimeError("g++: command not found")

    monkeypatch.setattr(_cpu, "LOADER", _cpu.ExtensionLoader(build=fail))


def _backends(opt):
    return [b.backend for b in opt.bucket_layout()]


def test_sources_are_found_from_the_installed_package():
    src = _cpu.sources_dir()
    for name in _cpu.SOURCES + _cpu.HEADERS:
        assert (src / name).is_file(), name


def test_auto_runs_the_cpu_kernels_on_cpu_tensors():
    assert _cpu.unavailable_reason() is None  # this machine has a compiler: the extension must build
    params = [torch.randn(4), torch.randn(3, dtype=torch.bfloat16), torch.randn(2, dtype=torch.float64)]
    opt = Adan(params)
    for p in params:
        p.grad = torch.randn_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    # fp64 params are not a C++ dtype: they run the reference, silently (as on the Triton side)
    assert _backends(opt) == ["cpu", "cpu", "reference"]


def test_cpu_backend_without_compiler_raises_clearly(no_compiler):
    p = torch.randn(5)
    opt = Adan([p], backend="cpu")
    p.grad = torch.randn(5)
    before = p.clone()
    with pytest.raises(RuntimeError, match=r"Adan\(backend='cpu'\) cannot run here: .*g\+\+: command not found"):
        opt.step()
    assert torch.equal(p, before)
    assert not opt.state[p] or opt.state[p]["step"].item() == 0


def test_auto_without_compiler_warns_once_and_runs_the_reference(no_compiler):
    case = case_named("adabelief")
    p, q = torch.randn(6), torch.randn(6)
    q.copy_(p)
    with pytest.warns(RuntimeWarning, match="g\\+\\+: command not found.*reference") as record:
        opts = [case.make([p]), case.make([torch.randn(3)])]  # a second optimizer must not warn again
        for opt in opts:
            for param in opt.param_groups[0]["params"]:
                param.grad = torch.ones_like(param)
            opt.step()
            opt.step()
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert all(_backends(opt) == ["reference"] for opt in opts)
    ref = case.make([q], backend="reference")
    for _ in range(2):
        q.grad = torch.ones_like(q)
        ref.step()
    assert torch.equal(p, q)


def test_cpu_backend_rejects_what_it_cannot_run():
    """At construction, as backend='triton' does: an fp64 or non-CPU param, or an optimizer without a C++ rule."""
    with pytest.raises(RuntimeError, match="backend='cpu'.*float64"):
        Adan([torch.zeros(3, dtype=torch.float64)], backend="cpu")
    with pytest.raises(RuntimeError, match="backend='cpu'.*CPU tensors.*not meta"):
        Adan([torch.empty(3, device="meta")], backend="cpu")
    with pytest.raises(RuntimeError, match="NoCppRule\\(backend='cpu'\\).*no C\\+\\+ kernel"):
        NoCppRule([torch.zeros(3)], backend="cpu")


class NoCppRule(AdaBelief):
    """An optimizer without a C++ rule (all of fusedoptim's have one)."""

    rule = dataclasses.replace(AdaBelief.rule, cpu=None)


def _big_profile(dtype, gen):
    # Several times the kernel's per-task grain (2**15): thread ranges start and end inside tensors (with 5
    # threads, ranges of 41,944 elements: one starts inside a row of the (257, 129) tensor, AdamP's rows), and the
    # bucket mixes large, tiny, 0-d and empty tensors.
    shapes = [(70001,), (), (0,), (3,), (257, 129), (1,), (40000,), (5, 0), (33, 31), (65536,)]
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


# Thread splitting does not depend on the options: one case per optimizer, the one with the most state buffers
# (all 20 case x dtype runs took 23 s on this 2-core machine; every case is in test_parity.py).
_SCALE_CASES = [c for c in CASES if c.name in ("adabelief-decoupled-amsgrad", "adan-noprox-amsgrad",
                                                 "ademamix-warmup-wd", "lars-momentum-wd", "lamb-wd-clip", "ralars",
                                                 "tadam-wd-amsgrad", "adamp-amsgrad-maximize")]


_THREADS = 5  # more than the cores is fine: the ranges are what is tested


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", _SCALE_CASES, ids=lambda c: c.name)
def test_threads_split_tensors_and_match_reference_and_one_thread(case, dtype):
    """Results do not depend on the thread count (bitwise), and match the reference.

    bf16 params are compared with the reference through their fp32 states only: among 2 x 10^5 elements a few
    land on a catastrophic cancellation (seen: 0.01111 - 0.01111 = -4.7e-9 here, -5.6e-9 in the reference),
    where 1 fp32 ulp of the update is many bf16 ulps of the result. The per-step ULP bound on bf16 params is
    checked by test_parity.py on its profiles."""
    gen = torch.Generator().manual_seed(3)
    params = _big_profile(dtype, gen)
    copies = {name: [p.clone() for p in params] for name in ("one_thread", "groups", "reference")}
    opts = {"threads": case.make(params, backend="cpu"),
            "one_thread": case.make(copies["one_thread"], backend="cpu"),
            "groups": case.make(copies["groups"], backend="cpu"),  # two-pass rules: 4 cache groups, not 1
            "reference": case.make(copies["reference"], backend="reference")}
    threads, default_group = torch.get_num_threads(), _cpu.CACHE_GROUP_ELEMENTS
    try:
        for _ in range(3):
            grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
            for name, opt in opts.items():
                torch.set_num_threads(1 if name == "one_thread" else _THREADS)
                _cpu.CACHE_GROUP_ELEMENTS = 50_000 if name == "groups" else default_group
                for p, g in zip(opt.param_groups[0]["params"], grads, strict=True):
                    p.grad = g.clone()
                opt.step()
            # rules with per-tensor statistics: pass A's sums (per tensor, and per row for AdamP) and the factors
            two, one, grouped = (_tables(opts[name]) for name in ("threads", "one_thread", "groups"))
            assert (two is None) == (not case.cls.rule.two_pass)
            if two is not None:
                for other, tables in (("threads", one), ("cache groups", grouped)):  # bitwise; TAdam's factors
                    for a, b in zip(two, tables, strict=True):  # of the empty tensors: 0/0 (ν = d = 0)
                        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True,
                                                   msg=lambda m, o=other: f"{o} changed the sums or factors: {m}")
            for i, (a, b, c, r) in enumerate(zip(params, copies["one_thread"], copies["groups"], copies["reference"],
                                                 strict=True)):
                assert torch.equal(a, b), f"tensor {i}: threads changed the result"
                assert torch.equal(a, c), f"tensor {i}: cache groups changed the result"
                for name, value in opts["threads"].state[a].items():  # bitwise; TAdam's W_t of the empty
                    for other, q in (("one_thread", b), ("groups", c)):  # tensor: 0/0 (ν = d = 0)
                        torch.testing.assert_close(value, opts[other].state[q][name], rtol=0, atol=0,
                                                   equal_nan=True, msg=f"tensor {i} {name}: {other}")
                if a.numel():  # an empty tensor has no state but TAdam's W_t, 0/0 (ν = d = 0) on both paths
                    assert_state_close(opts["threads"], a, opts["reference"], r, f"{case.name} tensor {i}")
                if dtype == torch.float32:
                    assert_param_close(a, r, f"{case.name} tensor {i}")
                else:  # measure the next step on its own
                    r.copy_(a)
                    for name, value in opts["threads"].state[a].items():
                        opts["reference"].state[r][name].copy_(value)
    finally:
        torch.set_num_threads(threads)
        _cpu.CACHE_GROUP_ELEMENTS = default_group


def _tables(opt):
    """The last step's sums and factors of every bucket, each concatenated (None for elementwise rules)."""
    buckets = [b for b in opt.bucket_layout() if b.sums is not None]
    return (torch.cat([b.sums for b in buckets]), torch.cat([b.factors for b in buckets])) if buckets else None


@pytest.mark.parametrize("case", [c for c in CASES if c.cls.rule.two_pass], ids=lambda c: c.name)
def test_cpp_finalize_is_the_shared_finalize(case):
    """The C++ step's finalize (csrc/<name>.h) is the shared ``finalize`` of optim/<name>.py that the Triton
    and reference paths run: given the step's own sums, both give the same factors and per-tensor states (TAdam's
    W_t) to a few fp32 ulps (torch's fp32 sqrt on CPU is not correctly rounded: 16% of the results of
    ``x.sqrt()`` differ from ``x.double().sqrt().float()`` by 1 ulp; the C++ one is). Over steps with and
    without a gradient for every param, 2-D params (AdamP's rows) and zero grads (the trust ratios' 0 cases)."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(70001,), (3,), (257, 129), (1,), (33, 31), (64, 3, 3, 3), (512,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    opt = case.make(params, backend="cpu")
    (bucket,) = opt.bucket_layout()
    for step in range(1, 6):
        for i, p in enumerate(params):
            p.grad = None if (step == 3 and i == 2) else torch.randn(p.shape, generator=gen) * (i != 4 or step != 2)
        before = tuple(s.clone() for s in bucket.tensor_states.values())
        opt.step()
        group = opt.param_groups[0]
        hyper, flags = opt.group_scalars(group)
        factors, states = opt.rule.finalize(bucket.sums, bucket.steps, bucket.segments, before, *hyper, *flags)
        torch.testing.assert_close(bucket.factors, factors, rtol=1e-6, atol=0, msg=lambda m, s=step: f"step {s}: {m}")
        stepped = torch.tensor([p.grad is not None for p in params])
        for new, old, cpp in zip(states, before, bucket.tensor_states.values(), strict=True):
            torch.testing.assert_close(cpp, torch.where(stepped, new, old), rtol=1e-6, atol=0)


def test_non_contiguous_param_is_updated_in_place():
    p = torch.randn(8, 6).t()
    q = p.clone()
    opt, ref = Adan([p], backend="cpu", weight_decay=0.1), Adan([q], backend="reference", weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(6, 8)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert not p.is_contiguous()
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_kernel_validates_everything_before_writing():
    """A bad tensor anywhere in the bucket fails the step before the first tensor is touched."""
    ext = _cpu.extension()
    params = [torch.randn(40), torch.randn(7)]
    grads = [torch.randn(40), torch.randn(8)]  # the second grad does not match its param
    states = [torch.zeros(64) for _ in range(4)]
    steps = torch.ones(2)
    hyper = [1e-2, 0.98, 0.92, 0.99, -0.02, -0.08, -0.01, 1e-8, 0.0]
    before = [p.clone() for p in params]
    with pytest.raises(RuntimeError, match="grad has 8 elements, its param 7"):
        ext.adan_step(params, grads, states, [0, 48], steps, [0, 1], hyper, [False, False], False)
    with pytest.raises(RuntimeError, match="outside its flat buffer"):
        ext.adan_step(params, [grads[0], torch.randn(7)], states, [0, 60], steps, [0, 1], hyper, [False, False],
                      False)
    with pytest.raises(RuntimeError, match="expected 2 flags"):
        ext.adan_step(params[:1], grads[:1], states, [0], steps, [0], hyper, [False], False)
    with pytest.raises(RuntimeError, match="fp32, bf16 or fp16"):
        ext.adan_step([torch.randn(4, dtype=torch.float64)], [torch.randn(4, dtype=torch.float64)], states, [0],
                      steps, [0], hyper, [False, False], False)
    assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True))
    assert all(not s.any() for s in states)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if c.cls.rule.cpu], ids=lambda c: c.name)
def test_low_precision_params_round_like_torch(case, dtype):
    """bf16/fp16 params: the kernel's own loads and stores are exact. The same step on fp32 copies of the params
    (same grads) must give, rounded by torch, bitwise the low-precision result, and bitwise the same states.
    The parity test's 1-ULP bound could not tell round-to-nearest-even from truncation; this can."""
    gen = torch.Generator().manual_seed(5)
    n = 4099  # vector bodies and scalar remainders
    scales = torch.tensor([1e-7, 3e-5, 1e-2, 1.0, 300.0, 2e4])  # fp16 subnormals up to near its max (65504)
    low = (torch.randn(n, generator=gen) * scales[torch.arange(n) % len(scales)]).clamp(-6e4, 6e4).to(dtype)
    high = low.float()
    opt_low, opt_high = case.make([low], backend="cpu"), case.make([high], backend="cpu")
    for _ in range(3):
        g = (torch.randn(n, generator=gen) * scales[torch.randperm(n, generator=gen) % 5]).to(dtype)  # finite
        low.grad, high.grad = g, g.float()
        opt_low.step()
        opt_high.step()
        assert low.isfinite().all()
        assert torch.equal(low, high.to(dtype)), f"{case.name}: stores differ from torch's rounding"
        for name, value in opt_low.state[low].items():
            assert torch.equal(value, opt_high.state[high][name]), name
        high.copy_(low)  # the next step starts from the same (rounded) params


def test_two_pass_kernels_validate_everything_before_writing():
    """A two-pass step checks everything before pass A writes its first state (LAMB's moments): a bad grad, rows
    for a rule without per-row statistics or rows that do not tile a tensor (AdamP), sums or factors tables of the
    wrong shape, per-tensor states that do not fit, a slow-weight buffer or sync rate that does not fit. A failed
    call changes no param, state or table entry."""
    ext = _cpu.extension()
    params = [torch.randn(40), torch.randn(6, 7)]
    grads = [torch.randn(40), torch.randn(6, 7)]
    states = [torch.zeros(96) for _ in range(2)]
    steps, index, offsets = torch.ones(2), [0, 1], [0, 48]
    hyper = [1e-2, 0.9, 0.999, -0.105, -0.001, 1e-8, 0.1, 0.0, 10.0]  # LAMB: lr, betas, log betas, eps, wd, clip
    sums, factors = torch.full((2, 2), -1.0), torch.full((2, 1), -1.0)
    slow, rate = torch.zeros(96), torch.tensor([0.5])
    before = [p.clone() for p in params]

    def lamb(**change):
        args = dict(params=params, grads=grads, states=states, offsets=offsets, steps=steps, index=index,
                    hyper=hyper, flags=[True], maximize=False, row_lengths=[0, 0], first_row=[2, 2], sums=sums,
                    factors=factors, tensor_states=[], cache_group=0)
        ext.lamb_step(**{**args, **change})

    with pytest.raises(RuntimeError, match="grad has 8 elements, its param 42"):
        lamb(grads=[grads[0], torch.randn(8)])
    with pytest.raises(RuntimeError, match="sums table of 2 columns"):
        lamb(sums=torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="factors table of 1 columns"):
        lamb(factors=torch.ones(2, 2))
    with pytest.raises(RuntimeError, match="differ in rows"):
        lamb(factors=torch.ones(3, 1))
    with pytest.raises(RuntimeError, match="outside the sums/factors table"):
        lamb(sums=torch.zeros(1, 2), factors=torch.zeros(1, 1))
    with pytest.raises(RuntimeError, match="expected 0 per-tensor states, got 1"):
        lamb(tensor_states=[torch.zeros(2)])
    with pytest.raises(RuntimeError, match="cache_group must be >= 0"):
        lamb(cache_group=-1)
    with pytest.raises(RuntimeError, match="slow-weight segment lies outside"):
        lamb(slow=torch.zeros(60), sync_rate=rate)
    with pytest.raises(RuntimeError, match="rate as an fp32 CPU tensor"):
        lamb(slow=slow, sync_rate=torch.tensor([0.5, 0.5]))
    with pytest.raises(RuntimeError, match="no per-row statistics, got rows of 7 elements"):
        lamb(row_lengths=[0, 7], first_row=[2, 2])  # only AdamP's rule takes rows
    # AdamP: hyper lr, betas, log betas, eps, weight decay, delta, wd_ratio; flags nesterov, amsgrad; 4 sums
    adamp_sums, adamp_factors = torch.full((8, 4), -1.0), torch.full((8, 2), -1.0)
    adamp_hyper = [1e-2, 0.9, 0.999, -0.105, -0.001, 1e-8, 0.1, 0.1, 0.1]

    def adamp(rows, first_row):
        ext.adamp_step(params, grads, states, offsets, steps, index, adamp_hyper, [False, False], False, rows,
                       first_row, adamp_sums, adamp_factors, [], 0)

    with pytest.raises(RuntimeError, match="rows of 5 elements do not tile"):
        adamp([0, 5], [2, 2])
    with pytest.raises(RuntimeError, match="rows lie outside"):  # 6 rows from row 4 of an 8-row table
        adamp([0, 7], [2, 4])
    # TAdam: one per-tensor state (W_t), one entry per tensor of the bucket
    tadam_hyper = [1e-2, 0.9, 0.999, -0.105, -0.001, 1e-8, 0.0, 0.0]
    with pytest.raises(RuntimeError, match="one entry per tensor"):
        ext.tadam_step(params, grads, states, offsets, steps, index, tadam_hyper, [False, False], False, [0, 0],
                       [2, 2], torch.zeros(2, 1), torch.zeros(2, 2), [torch.zeros(3)], 0)
    assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True))
    assert all(not s.any() for s in states) and not slow.any()
    assert all((t == -1).all() for t in (sums, factors, adamp_sums, adamp_factors))


def _sync_params(seed=0):
    # fp32 and bf16 buckets, a 2-D tensor (AdamP's rows), above the one-thread grain (2**15) in total
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(7, generator=gen), torch.randn(33, 31, generator=gen), torch.randn(40000, generator=gen),
            torch.randn(4, generator=gen).bfloat16(), torch.randn(5, 9, generator=gen).bfloat16()]


def _sync_run(case, backend, fused_sync, steps=7):
    from fusedoptim import Lookahead

    params = _sync_params()
    opt = Lookahead(case.make(params, backend=backend), sync_rate=0.5, sync_period=3, fused_sync=fused_sync)
    for step in range(1, steps + 1):
        gen = torch.Generator().manual_seed(100 + step)
        grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
        if step == 6:  # a sync step where one param of each bucket has no gradient: synced on its own
            grads[0] = grads[3] = None
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
    return params, opt


@pytest.mark.parametrize("case", FIRST_CASES, ids=lambda c: c.name)
def test_sync_in_the_last_pass_equals_the_separate_sync(case):
    """Lookahead on a C++ base: the sync fused into the step's last pass and the C++ sync run after the step give
    bitwise the same params and slow weights (fp32 and bf16), and both match the reference within the parity
    tolerance (fp32 params; 7 steps, 2 syncs)."""
    (fused, opt_f), (separate, opt_s), (ref, opt_r) = (_sync_run(case, "cpu", True), _sync_run(case, "cpu", False),
                                                       _sync_run(case, "reference", True))
    for i, (p, q, r) in enumerate(zip(fused, separate, ref, strict=True)):
        assert torch.equal(p, q), f"tensor {i}: fused sync differs from the separate one"
        assert torch.equal(opt_f.state[p]["slow_param"], opt_s.state[q]["slow_param"]), f"tensor {i} slow"
        if p.dtype == torch.float32:
            assert_param_close(p, r, f"{case.name} tensor {i}")
            assert_tensor_state_close(opt_f.state[p]["slow_param"], opt_r.state[r]["slow_param"],
                                      f"{case.name} tensor {i} slow")


def test_sync_of_a_torch_base_runs_the_cpp_sync():
    """Lookahead and Scout around torch.optim.SGD keep the slow weights in a holder whose sync is the C++ loop on
    CPU (a non-contiguous param included); it matches the reference sync."""
    from fusedoptim import Lookahead, Scout

    results = {}
    for wrapper in (Lookahead, Scout):
        for backend in ("auto", "reference"):
            params = _sync_params() + [torch.randn(6, 8, generator=torch.Generator().manual_seed(1)).t()]
            opt = wrapper(torch.optim.SGD(params, lr=0.1, momentum=0.9), sync_period=2, backend=backend)
            for step in range(1, 6):
                gen = torch.Generator().manual_seed(step)
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
                opt.step()
            results[wrapper, backend] = (params, opt)
        (a, oa), (b, ob) = results[wrapper, "auto"], results[wrapper, "reference"]
        assert set(_backends(oa.slow_weights)) == {"cpu"} and set(_backends(ob.slow_weights)) == {"reference"}
        assert not a[-1].is_contiguous()
        for p, q in zip(a, b, strict=True):
            if p.dtype == torch.float32:  # the same torch SGD steps; only the sync differs
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
                assert_tensor_state_close(oa.state[p]["slow_param"], ob.state[q]["slow_param"],
                                          f"{wrapper.__name__} slow")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", [c for c in _SCALE_CASES if c.cls.rule.two_pass], ids=lambda c: c.name)
def test_reference_two_pass_steps_are_bitwise_across_thread_counts(case, dtype):
    """The reference's per-tensor (and per-row) sums are added in a fixed order (optim/_reference.py:
    fixed_order_sum), so 1 and 5 threads give the same bits, as the C++ kernels do; fp64 params keep fp64 per-tensor
    states (TAdam's W_t) and sums."""
    gen = torch.Generator().manual_seed(4)
    params = _big_profile(dtype, gen)
    copies = [p.clone() for p in params]
    opts = [case.make(params, backend="reference"), case.make(copies, backend="reference")]
    threads = torch.get_num_threads()
    try:
        for _ in range(2):
            grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
            for n, opt in zip((_THREADS, 1), opts, strict=True):
                torch.set_num_threads(n)
                for p, g in zip(opt.param_groups[0]["params"], grads, strict=True):
                    p.grad = g.clone()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(params, copies, strict=True):
        assert torch.equal(a, b)
        for name, value in opts[0].state[a].items():
            torch.testing.assert_close(value, opts[1].state[b][name], rtol=0, atol=0, equal_nan=True)
            if name in case.cls.rule.tensor_states:
                assert value.dtype == dtype if dtype == torch.float64 else torch.float32
    (bucket,) = opts[0].bucket_layout()
    assert bucket.sums.dtype == torch.promote_types(dtype, torch.float32)
