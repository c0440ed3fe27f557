"""One kernel launch per bucket (param group x dtype) per step, whatever the number of tensors."""

from __future__ import annotations

import pytest
import torch
from cases import FIRST_CASES, case_named

from fusedoptim.kernels import LAUNCH_COUNTS


def _launches_per_step(opt, params, steps=2):
    before = LAUNCH_COUNTS["multi_tensor_step_kernel"]
    for _ in range(steps):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    return (LAUNCH_COUNTS["multi_tensor_step_kernel"] - before) / steps


ELEMENTWISE_FIRST_CASES = [case for case in FIRST_CASES if not case.cls.rule.two_pass]


@pytest.mark.parametrize("case", ELEMENTWISE_FIRST_CASES, ids=lambda c: c.name)
def test_launches_do_not_grow_with_tensor_count(case):
    counts = {}
    for n in (10, 1000):
        params = [torch.zeros(3) for _ in range(n)]
        counts[n] = _launches_per_step(case.make(params, backend="triton"), params, steps=1)
    assert counts == {10: 1, 1000: 1}


def test_one_launch_per_bucket():
    case = case_named("adabelief")
    groups = [
        {"params": [torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16), torch.zeros(5)]},  # 2 dtypes: 2 buckets
        {"params": [torch.zeros(6)], "lr": 0.1},                                             # 1 bucket
    ]
    params = [p for g in groups for p in g["params"]]
    assert _launches_per_step(case.make(groups, backend="triton"), params) == 3


def test_no_launch_for_a_bucket_without_gradients():
    case = case_named("adabelief")
    a, b = torch.zeros(4), torch.zeros(4, dtype=torch.float16)
    opt = case.make([a, b], backend="triton")
    before = LAUNCH_COUNTS["multi_tensor_step_kernel"]
    a.grad = torch.ones(4)
    opt.step()
    assert LAUNCH_COUNTS["multi_tensor_step_kernel"] - before == 1
    assert opt.state[b]["step"].item() == 0
