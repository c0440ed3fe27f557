"""The fused backends against the reference path, for every registry case: the Triton kernels (interpreter on
CPU, compiled on GPU) and the C++ CPU kernels (csrc/).

Both sides run on the tests' one device (tests/devices.py, ``FUSEDOPTIM_TEST_DEVICE``): on cuda the compiled Triton
kernels meet the reference on CUDA tensors and the C++ runs are skipped, with the reason.

fp32: no re-synchronisation, so the bound (rtol 1e-5; atol 1e-6 for params, 1e-6 of the largest magnitude for
states and factors: tests/helpers.py's state_atol) also covers drift over the run.
bf16/fp16: params must stay within 1 ULP per step (the interpreter truncates fp32->bf16 where the reference
rounds to nearest), so after each compared step the reference takes the fused values and the next step is
again measured on its own.
"""

from __future__ import annotations

import pytest
import torch
from cases import CASES, DTYPES, FIRST_CASES
from devices import CPU_ONLY, DEVICE
from helpers import (
    PROFILES,
    assert_param_close,
    assert_state_close,
    assert_tensor_state_close,
    clone_groups,
    make_profile,
    param_groups,
    set_grads,
)

from fusedoptim import _cpu

STEPS = 6
LR_CHANGE_AT = 4  # an LR change mid-run must take effect without recompiling anything

# The 200-tensor profile checks the chunk table at scale; every option is covered by the other profiles.
# The interpreter pays ~10 ms of Python per tiny tensor per step, so at scale we run the first case of each
# optimizer for 3 steps (which still includes a step where one param has no gradient).
_SCALE_CASES = FIRST_CASES
# Memory formats: the first case of each optimizer and AdamP's others (its rows), 4 steps (both grad layouts twice).
_FORMAT_CASES = [case for case in CASES
                 if case in FIRST_CASES or case.cls.rule.two_pass and case.cls.rule.row_statistics]
_SPECIAL = ("many_small", "memory_formats")
RUNS = [("triton", case, profile, STEPS) for case in CASES for profile in PROFILES if profile not in _SPECIAL]
RUNS += [("triton", case, "many_small", 3) for case in _SCALE_CASES]
RUNS += [("triton", case, "memory_formats", 4) for case in _FORMAT_CASES]
# The C++ kernels take milliseconds, not seconds: every case on every profile.
RUNS += [("cpu", case, profile, STEPS) for case in CASES for profile in PROFILES if case.cls.rule.cpu]

# The C++ kernels take CPU tensors only: on another test device their runs are collected as skipped.
_NOT_HERE = [pytest.mark.skipif(DEVICE.type != "cpu", reason=CPU_ONLY)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("backend", "case", "profile", "steps"),
                         [pytest.param(*run, id=f"{run[0]}-{run[1].name}-{run[2]}",
                                       marks=_NOT_HERE if run[0] == "cpu" else ()) for run in RUNS])
def test_fused_matches_reference(backend, case, profile, steps, dtype, monkeypatch):
    # C++ two-pass steps run by cache groups: small ones here, so the profiles take several (ragged: 5)
    monkeypatch.setattr(_cpu, "CACHE_GROUP_ELEMENTS", 2048)
    prof = make_profile(profile, dtype)
    fused_groups, ref_groups = prof.groups, clone_groups(prof.groups)
    fused = case.make(param_groups(case.group2, fused_groups), backend=backend)
    ref = case.make(param_groups(case.group2, ref_groups), backend="reference")
    for step in range(1, steps + 1):
        if step == LR_CHANGE_AT:
            for opt in (fused, ref):
                for group in opt.param_groups:
                    group["lr"] *= 0.5
        grads = prof.grads(step, fused_groups)
        set_grads(fused_groups, grads)
        set_grads(ref_groups, grads)
        fused.step()
        ref.step()
        fused_factors, ref_factors = fused.last_factors(), ref.last_factors()
        assert len(fused_factors) == len(ref_factors)
        for gi, (fg, rg) in enumerate(zip(fused_groups, ref_groups, strict=True)):
            for ti, (pf, pr) in enumerate(zip(fg, rg, strict=True)):
                what = f"{case.name} {profile} step {step} group {gi} tensor {ti} {tuple(pf.shape)}"
                assert_param_close(pf, pr, what)
                assert_state_close(fused, pf, ref, pr, what)
                if pf in fused_factors:  # the per-tensor statistics of rules with two passes
                    for name, value in fused_factors[pf].items():
                        assert_tensor_state_close(value, ref_factors[pr][name], f"{what} {name}")
                if dtype != torch.float32:  # measure the next step on its own
                    pr.copy_(pf)
                    for name, value in fused.state[pf].items():
                        ref.state[pr][name].copy_(value)
    # the param without a gradient on steps 2 and 4 did not advance on them
    assert fused.state[fused_groups[0][1]]["step"].item() == steps - len({2, 4} & set(range(1, steps + 1)))
    assert fused.state[fused_groups[0][0]]["step"].item() == steps
