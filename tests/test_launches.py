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


def test_launcher_refuses_a_tensor_on_another_device():
    """Every tensor a kernel reads through a pointer (the sync rate, masks, factors) must be on the params' device:
    a CPU sync rate passed to a CUDA kernel is an illegal address."""
    from fusedoptim.kernels._launch import check_devices

    check_devices(torch.device("cpu"), sync_rate=torch.ones(1), states=[torch.zeros(3)], factors=None)
    with pytest.raises(ValueError, match="sync_rate is on meta, the params on cpu"):
        check_devices(torch.device("cpu"), sync_rate=torch.ones(1, device="meta"))
    with pytest.raises(ValueError, match="states is on meta"):
        check_devices(torch.device("cpu"), states=[torch.zeros(3), torch.zeros(3, device="meta")])


def test_moved_grads_rewrite_only_the_pointer_table():
    """New grad tensors every step (zero_grad(set_to_none=True)) keep the chunk table and rewrite the pointer
    table in place; a new set of tensors with a gradient builds (and caches) its chunk table once."""
    case = case_named("lamb")
    params = [torch.randn(7), torch.randn(33, 31), torch.randn(1025)]
    opt = case.make(params, backend="triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    (bucket,) = opt.bucket_layout()
    chunks, pointers = bucket.tables.chunks[(0, 1, 2)], bucket.tables.step_pointers.device
    for p in params:
        p.grad = torch.randn_like(p)  # every address moves
    opt.step()
    assert bucket.tables.chunks[(0, 1, 2)] is chunks and bucket.tables.step_pointers.device is pointers
    assert pointers[4 + 1].item() == params[1].grad.data_ptr()  # grad_ptrs follow param_ptrs (3, padded to 4)
    params[0].grad = None
    opt.step()
    assert set(bucket.tables.chunks) == {(0, 1, 2), (1, 2)}


#: aten ops that launch nothing on a GPU: views, allocations without a fill, host scalars.
NOT_KERNELS = {"view", "_unsafe_view", "slice", "select", "alias", "detach", "as_strided", "unsqueeze", "squeeze",
               "t", "transpose", "expand", "permute", "unbind", "split", "reshape", "empty", "empty_strided",
               "new_empty", "scalar_tensor", "lift_fresh", "_record_function_enter_new", "_record_function_exit"}

#: Device launches per step of a bucket (Triton kernels + torch kernels) as they are today, with kept grads: the
#: elementwise rules 1 + the steps' add_; the two-pass rules 3 + add_ + the finalize's torch ops. A change that
#: adds a launch fails here; one that removes some lowers the figure.
#: Every kernel one step issues on the params' device, per bucket: elementwise rules one pass; two-pass rules pass A,
#: the segment sum with the finalize in its epilogue, pass B (they were LARS 14, LAMB 11, RaLars 39, TAdam 24 and
#: AdamP 50 with the finalize in torch).
DEVICE_LAUNCHES = {"AdaBelief": 1, "Adan": 1, "AdEMAMix": 1, "LARS": 3, "LAMB": 3, "RaLars": 3, "TAdam": 3, "AdamP": 3}


def _device_launches(opt, params, grads) -> tuple[int, dict[str, int]]:
    """Triton launches and torch kernels of one step (the Triton interpreter's own torch calls left out)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    from fusedoptim import kernels

    ops: Counter[str] = Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in NOT_KERNELS:
                ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    real = kernels.launch_step, kernels.launch_segment_sum

    def uncounted(launch):
        def run(*args, **kwargs):
            with _disable_current_modes():
                return launch(*args, **kwargs)
        return run

    for p, g in zip(params, grads, strict=True):
        p.grad = g
    before = sum(LAUNCH_COUNTS.values())
    kernels.launch_step, kernels.launch_segment_sum = map(uncounted, real)
    try:
        with Count():
            opt.step()
    finally:
        kernels.launch_step, kernels.launch_segment_sum = real
    return sum(LAUNCH_COUNTS.values()) - before, dict(ops)


@pytest.mark.parametrize("variant", ["contiguous", "channels_last", "tensor_lr"])
@pytest.mark.parametrize("amp", [False, True], ids=["plain", "gradscaler"])
@pytest.mark.parametrize("case", FIRST_CASES, ids=lambda c: c.name)
def test_device_launches_per_step(case, amp, variant):
    """GradScaler's scale and found_inf (as torch.amp.GradScaler hands them to step()) add no launch: the kernels
    read them, as they read a tensor lr. A channels_last param (with its grad, as autograd makes it) is addressed
    in place: no copy."""
    middle = torch.randn(8, 3, 3, 3).to(memory_format=torch.channels_last) if variant == "channels_last" else (
        torch.randn(33, 31))
    params = [torch.randn(7), middle, torch.randn(1025)]
    grads = [torch.randn_like(p) for p in params]
    opt = case.make(params, backend="triton", **({"lr": torch.tensor(1e-3)} if variant == "tensor_lr" else {}))
    if amp:
        opt.grad_scale, opt.found_inf = torch.full((), 2.0**16), torch.zeros(())
    _device_launches(opt, params, grads)  # lay out, build the tables
    triton, ops = _device_launches(opt, params, grads)
    assert triton == (3 if case.cls.rule.two_pass else 1)
    assert triton + sum(ops.values()) == DEVICE_LAUNCHES[case.cls.__name__], ops
    print(f"{case.cls.__name__}: {triton} Triton + {sum(ops.values())} torch {ops}")
    # moved grads add one host-to-device copy of the pointer table, nothing else
    _, moved = _device_launches(opt, params, [g.clone() for g in grads])
    assert moved.pop("copy_") == ops.get("copy_", 0) + 1 and moved == {k: v for k, v in ops.items() if k != "copy_"}
