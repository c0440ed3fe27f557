"""capturable=True: a step a CUDA graph can capture. After one warm-up step it reads no host value, allocates
nothing, rebuilds no table, and raises before writing anything if a param or grad moved; its lr is a device tensor.
On CUDA (FUSEDOPTIM_TEST_DEVICE=cuda, the GPU proof kit) a captured step is replayed against eager steps."""

from __future__ import annotations

import pytest
import torch
from cases import FIRST_CASES, SYNC_WRAPPERS, case_named
from devices import CPU_ONLY, DEVICE
from test_tensor_lr import _NoHostReads

from fusedoptim import Scout

SHAPES = [(7,), (33, 31), (1025,), (4, 3, 2, 2)]
BACKENDS = ["triton"] if DEVICE.type == "cuda" else ["triton", "cpu", "reference"]


def _params(gen):
    return [torch.randn(s, generator=gen).to(DEVICE) for s in SHAPES]


def _steps(opt, params, gen, steps, patch=None):
    """``steps`` steps with grads written into the same tensors (a graph's static inputs) and the lr scaled in
    place after each."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for _ in range(steps):
        for p in params:
            p.grad.copy_(torch.randn(p.shape, generator=gen).to(DEVICE))
        if patch is None:
            opt.step()
        else:
            with patch():
                opt.step()
        opt.param_groups[0]["lr"].mul_(0.8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FIRST_CASES, ids=lambda c: c.name)
def test_a_capturable_step_equals_a_normal_step_and_reads_nothing_on_the_host(case, backend):
    """The float lr becomes a 0-d fp32 tensor on the params' device; the steps after the warm-up call no .item(),
    .tolist(), __float__ or .cpu() (on the Triton path with GradScaler's scale and found_inf too) and equal the
    steps of a normal optimizer with the same tensor lr, bitwise."""
    gen_a, gen_b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a_params, b_params = _params(gen_a), _params(gen_b)
    capturable = case.make(a_params, backend=backend, capturable=True, lr=1e-2)
    normal = case.make(b_params, backend=backend, lr=torch.tensor(1e-2, device=DEVICE))
    lr = capturable.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.device == DEVICE and lr.dtype == torch.float32 and lr.dim() == 0
    if backend == "triton":  # GradScaler's tensors are read by the kernels (the host paths read found_inf there)
        for opt in (capturable, normal):
            opt.grad_scale, opt.found_inf = torch.ones((), device=DEVICE), torch.zeros((), device=DEVICE)
    _steps(capturable, a_params, gen_a, 1)  # warm-up: lays out the buckets, builds the tables and the C++ kernels
    _steps(normal, b_params, gen_b, 1)
    _steps(capturable, a_params, gen_a, 3, patch=_NoHostReads)
    _steps(normal, b_params, gen_b, 3)
    for p, q in zip(a_params, b_params, strict=True):
        assert torch.equal(p, q)
        for name, value in normal.state[q].items():
            assert torch.equal(capturable.state[p][name], value), name


@pytest.mark.parametrize("case", [case_named("adabelief"), case_named("lamb"), case_named("adamp")],
                         ids=lambda c: c.name)
def test_a_capturable_triton_step_allocates_nothing_and_keeps_its_tables(case):
    from torch.utils._python_dispatch import TorchDispatchMode

    from fusedoptim import kernels

    created = []

    class Factories(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if torch.Tag.nondeterministic_seeded not in func.tags and func.overloadpacket.__name__ in (
                    "empty", "empty_strided", "zeros", "ones", "full", "new_empty", "new_zeros", "clone",
                    "empty_like", "zeros_like", "_to_copy", "contiguous"):
                created.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(0)
    params = _params(gen)
    opt = case.make(params, backend="triton", capturable=True)
    _steps(opt, params, gen, 1)
    (bucket,) = opt.bucket_layout()
    tables = (bucket.tables.chunks[tuple(range(len(params)))].packed, bucket.tables.step_pointers.device)
    real = kernels.launch_step, kernels.launch_segment_sum
    uncounted = [lambda *a, _f=f, **k: _uncounted(_f, *a, **k) for f in real]
    kernels.launch_step, kernels.launch_segment_sum = uncounted
    try:
        with Factories():
            _steps_in_place(opt, params, gen)
    finally:
        kernels.launch_step, kernels.launch_segment_sum = real
    assert created == []
    assert (bucket.tables.chunks[tuple(range(len(params)))].packed, bucket.tables.step_pointers.device) == tables


def _uncounted(launch, *args, **kwargs):
    """A launch outside the dispatch mode: the interpreter's own torch calls are not the step's."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return launch(*args, **kwargs)


def _steps_in_place(opt, params, gen):
    grads = [torch.randn(p.shape, generator=gen).to(DEVICE) for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad.copy_(g)
    opt.step()


@pytest.mark.parametrize("move", ["new grad", "grad of None", "new param storage"])
def test_a_moved_grad_or_param_raises_before_anything_is_written(move):
    case = case_named("lamb")
    gen = torch.Generator().manual_seed(0)
    params = _params(gen)
    opt = case.make(params, backend="triton", capturable=True)
    _steps(opt, params, gen, 1)
    if move == "new grad":
        params[1].grad = params[1].grad.clone()  # zero_grad(set_to_none=True) and a new backward do this
        match = r"the gradient of param 1 of shape \(33, 31\) moved"
    elif move == "grad of None":
        params[2].grad = None
        match = "the set of params with a gradient changed"
    else:
        params[0].data = params[0].data.clone()
        match = "a param of this group moved"
    before = [p.clone() for p in params] + [v.clone() for p in params for v in opt.state[p].values()]
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    after = [p.clone() for p in params] + [v.clone() for p in params for v in opt.state[p].values()]
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))


def test_capturable_arguments_are_checked():
    case = case_named("adabelief")
    p = torch.randn(3, device=DEVICE)
    with pytest.raises(ValueError, match="capturable must be True or False"):
        case.make([p], capturable="yes")
    with pytest.raises(ValueError, match="a tensor lr must be an fp32 tensor on the params' device"):
        case.make([p], capturable=True, lr=torch.tensor(1e-3, dtype=torch.float64))




@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wrapper", list(SYNC_WRAPPERS))
def test_a_capturable_wrapper_step_equals_a_normal_one_and_reads_nothing_on_the_host(wrapper, backend):
    """Lookahead and Scout around a capturable base: after the warm-up, 7 steps (two syncs) read no host value and
    give the params, states, slow weights and snapshots of the same wrapper around a normal base with a tensor lr,
    bitwise; the count read afterwards (a host read) is 8."""
    case = case_named("lamb") if backend != "cpu" else case_named("adabelief")
    gen_a, gen_b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a_params, b_params = _params(gen_a), _params(gen_b)
    capturable = SYNC_WRAPPERS[wrapper](case.make(a_params, backend=backend, capturable=True, lr=1e-2))
    normal = SYNC_WRAPPERS[wrapper](case.make(b_params, backend=backend, lr=torch.tensor(1e-2, device=DEVICE)))
    assert capturable.capturable and not normal.capturable
    _steps(capturable, a_params, gen_a, 1)
    _steps(normal, b_params, gen_b, 1)
    _steps(capturable, a_params, gen_a, 7, patch=_NoHostReads)
    _steps(normal, b_params, gen_b, 7)
    assert capturable.fast_steps == normal.fast_steps == 8
    for p, q in zip(a_params, b_params, strict=True):
        assert torch.equal(p, q)
        for name, value in normal.state[q].items():
            assert torch.equal(capturable.state[p][name], value), name
        if isinstance(normal, Scout):
            assert torch.equal(capturable.snapshots(p), normal.snapshots(q))


def test_a_scheduler_drives_a_capturable_lr_in_place():
    case = case_named("lamb")
    p = torch.randn(5, device=DEVICE)
    opt = case.make([p], capturable=True, lr=0.1)
    lr = opt.param_groups[0]["lr"]
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    p.grad = torch.ones_like(p)
    opt.step()
    scheduler.step()
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.05)


def _replay_against_eager(graphed, eager, a_params, b_params, gen_a, gen_b, replays):
    """One step of ``graphed`` captured in a CUDA graph after a warm-up on a side stream, then replayed ``replays``
    times beside eager steps of ``eager``: the same new grads copied into both's static grads, and both's lr scaled
    in place after each step."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _steps(graphed, a_params, gen_a, 1)
    torch.cuda.current_stream().wait_stream(stream)
    _steps(eager, b_params, gen_b, 1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    for _ in range(replays):
        grads = [torch.randn(p.shape, generator=gen_a).to(DEVICE) for p in a_params]
        for p, q, g in zip(a_params, b_params, grads, strict=True):
            p.grad.copy_(g)
            q.grad.copy_(g)
        graph.replay()
        eager.step()
        for opt in (graphed, eager):
            opt.param_groups[0]["lr"].mul_(0.8)
    torch.cuda.synchronize()


@pytest.mark.skipif(DEVICE.type != "cuda", reason=f"CUDA graphs need CUDA; {CPU_ONLY.split(';')[1].strip()}")
@pytest.mark.parametrize("case", FIRST_CASES, ids=lambda c: c.name)
def test_a_captured_step_replays_as_eager_steps(case):
    """One step captured in a CUDA graph, replayed 4 times: the same params and states as eager steps."""
    gen_a, gen_b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a_params, b_params = _params(gen_a), _params(gen_b)
    graphed = case.make(a_params, backend="triton", capturable=True)
    eager = case.make(b_params, backend="triton", capturable=True)
    _replay_against_eager(graphed, eager, a_params, b_params, gen_a, gen_b, replays=4)
    for p, q in zip(a_params, b_params, strict=True):
        assert torch.equal(p, q)
        for name, value in eager.state[q].items():
            assert torch.equal(graphed.state[p][name], value), name


@pytest.mark.skipif(DEVICE.type != "cuda", reason=f"CUDA graphs need CUDA; {CPU_ONLY.split(';')[1].strip()}")
@pytest.mark.parametrize("wrapper", list(SYNC_WRAPPERS))
def test_a_captured_wrapper_step_replays_as_eager_steps(wrapper):
    """Lookahead and Scout around a capturable LAMB: one step captured, replayed 7 times (two syncs, at the steps the
    count on the device names) against eager steps of the same wrapper."""
    case = case_named("lamb")
    gen_a, gen_b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a_params, b_params = _params(gen_a), _params(gen_b)
    graphed = SYNC_WRAPPERS[wrapper](case.make(a_params, backend="triton", capturable=True))
    eager = SYNC_WRAPPERS[wrapper](case.make(b_params, backend="triton", capturable=True))
    _replay_against_eager(graphed, eager, a_params, b_params, gen_a, gen_b, replays=7)
    assert graphed.fast_steps == eager.fast_steps == 8
    for p, q in zip(a_params, b_params, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(graphed.state[p]["slow_param"], eager.state[q]["slow_param"])
