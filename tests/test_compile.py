"""torch.compile: a fused step is one ``fusedoptim::step`` custom op (optim/_compile.py), so ``torch.compile(opt.step,
fullgraph=True)`` traces it whole on every backend, and a tensor lr changed every step compiles nothing new."""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import FIRST_CASES, SYNC_WRAPPERS, case_named
from torch._dynamo.utils import counters

from fusedoptim import Lookahead, Scout

# torch._inductor warns as it is imported (torch.jit.script_method in torch.utils.mkldnn): torch's, not a step's
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

SHAPES = [(7,), (33, 31), (4, 3, 2, 2)]
WARM_UP = 2  # the first step lays the buckets out: the second one traces again with the flat buffers


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import torch._inductor.compile_fx  # noqa: F401 - imported here: its import warns (torch's DeprecationWarnings)

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _scale_lr(optimizer, value):
    optimizer.param_groups[0]["lr"].mul_(value)  # in place: the tensor the graph reads


def _compiled_vs_eager(make, steps=5, change=_scale_lr, in_graph=False):
    """``steps`` steps of ``make(params)`` compiled (``torch.compile(opt.step, fullgraph=True)``) against the eager
    steps of a twin on the same grads, with ``change(optimizer, value)`` applied to both after each step (a 0-d
    ``value`` new each step), or with ``in_graph`` inside the compiled function, before the step. No warning may be
    raised ("Dynamo does not know how to trace the builtin ..." and the like). The params and every tensor state must
    be equal bitwise (Scout's snapshots too); returns the compiled optimizer and the graphs after each step."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in SHAPES]
    compiled_params, eager_params = [p.clone() for p in start], [p.clone() for p in start]
    opt, eager = make(compiled_params), make(eager_params)

    def changed_step(optimizer, value):
        change(optimizer, value)
        optimizer.step()

    step = torch.compile(changed_step if in_graph else opt.step, fullgraph=True)
    graphs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(steps):
            for p, q in zip(compiled_params, eager_params, strict=True):
                g = torch.randn(p.shape, generator=gen)
                p.grad, q.grad = g.clone(), g.clone()
            value = torch.tensor(0.8 ** (i + 1))
            if in_graph:
                step(opt, value)
                changed_step(eager, value)
            else:
                step()
                eager.step()
                for o in (opt, eager):
                    change(o, value)
            graphs.append(_graphs())
    for p, q in zip(compiled_params, eager_params, strict=True):
        assert torch.equal(p, q)
        for name, state in eager.state[q].items():
            if isinstance(state, torch.Tensor):
                assert torch.equal(opt.state[p][name], state), name
        if isinstance(opt, Scout):
            assert torch.equal(opt.snapshots(p), eager.snapshots(q))
    return opt, eager, graphs


_RUNS = [(case, "cpu") for case in FIRST_CASES]
_RUNS += [(case_named(name), backend) for name in ("adabelief", "lamb", "adamp") for backend in ("triton", "reference")]


@pytest.mark.parametrize(("case", "backend"), [pytest.param(c, b, id=f"{c.name}-{b}") for c, b in _RUNS])
def test_compiled_step_is_one_graph_and_equals_the_eager_step(case, backend):
    _, _, graphs = _compiled_vs_eager(lambda params: case.make(params, backend=backend, lr=torch.tensor(1e-2)))
    assert graphs[WARM_UP - 1] == graphs[-1], f"graphs per step {graphs}: a tensor lr change recompiled"


def test_a_compiled_training_step_that_calls_step():
    """Forward, backward, step and zero_grad in one compiled function: Dynamo breaks at backward and at zero_grad,
    as it does with torch's optimizers, never in the step, and compiles nothing after warm-up whatever the lr does."""
    case = case_named("lamb")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    twin.load_state_dict(model.state_dict())
    opt = case.make(model.parameters(), backend="cpu", lr=torch.tensor(1e-2))
    twin_opt = case.make(twin.parameters(), backend="cpu", lr=torch.tensor(1e-2))
    x = torch.randn(32, 8)

    def train_step(net, optimizer):
        loss = net(x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    compiled = torch.compile(train_step)
    graphs = []
    for _ in range(5):
        compiled(model, opt)
        train_step(twin, twin_opt)
        for o in (opt, twin_opt):
            o.param_groups[0]["lr"].mul_(0.5)
        graphs.append(_graphs())
    assert graphs[WARM_UP] == graphs[-1], graphs
    breaks = list(counters["graph_break"])
    # torch's own breaks only, as with torch.optim: backward, and zero_grad (torch marks it not to be traced)
    assert breaks and all("Tensor.backward()" in r or "Optimizer.zero_grad" in r for r in breaks), breaks
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the compiled forward may round differently


@pytest.mark.parametrize("wrapped", [False, True], ids=["optimizer", "lookahead"])
def test_a_compiled_step_takes_gradscalers_scale_and_found_inf(wrapped):
    """GradScaler sets grad_scale and found_inf on the optimizer before step(); the compiled step passes them to the
    op (Dynamo writes attributes back after the graph): a scaled step equals the plain one, an inf one is skipped
    (through Lookahead at k = 2: not counted, so the sync comes at the second step taken)."""
    case = case_named("adabelief")
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in SHAPES]
    scaled, plain = [p.clone() for p in start], [p.clone() for p in start]
    opt, eager = case.make(scaled, backend="cpu"), case.make(plain, backend="cpu")
    if wrapped:
        opt, eager = Lookahead(opt, sync_period=2), Lookahead(eager, sync_period=2)

    def step(optimizer, grad_scale, found_inf):
        optimizer.grad_scale, optimizer.found_inf = grad_scale, found_inf
        optimizer.step()

    compiled = torch.compile(step, fullgraph=True)
    for found in (0.0, 1.0, 0.0):
        grads = [torch.randn(p.shape, generator=gen) for p in start]
        for p, q, g in zip(scaled, plain, grads, strict=True):
            p.grad, q.grad = g * 1024.0, g.clone()
        before = [p.clone() for p in scaled]
        compiled(opt, torch.tensor(1024.0), torch.tensor(found))
        if found:
            assert all(torch.equal(p, b) for p, b in zip(scaled, before, strict=True))
        else:
            eager.step()
            assert all(torch.equal(p, q) for p, q in zip(scaled, plain, strict=True))
    if wrapped:
        assert opt.fast_steps == eager.fast_steps == 2
        assert all(torch.equal(opt.state[p]["slow_param"], eager.state[q]["slow_param"])
                   for p, q in zip(scaled, plain, strict=True))


#: Wrappers under torch.compile: the whole wrapper step (its count, Scout's ring, the base's step) is one op; and
#: Lookahead around torch's AdamW (its slow weights apart from the base).
WRAPPERS = [*SYNC_WRAPPERS, "lookahead-torch"]


@pytest.mark.parametrize(("wrapper", "backend"), [
    pytest.param(w, b, id=f"{w}-{b}") for w in WRAPPERS for b in ("cpu", "reference", "triton")
    if not (w == "lookahead-torch" and b != "cpu")])  # torch's base: its slow weights sync on the C++ path
def test_a_compiled_wrapper_step_equals_the_eager_step(wrapper, backend):
    """torch.compile(wrapper.step, fullgraph=True) with a tensor lr changed every step: 8 steps (two syncs) equal the
    eager steps bitwise (params, states, slow weights, Scout's snapshots, the count), with no warning and no graph
    after the warm-up. Traced as Python, the counter would be a constant of the graph."""

    def make(params):
        if wrapper == "lookahead-torch":
            return Lookahead(torch.optim.AdamW(params, lr=torch.tensor(1e-2), foreach=False), sync_period=3)
        return SYNC_WRAPPERS[wrapper](case_named("adabelief").make(params, backend=backend, lr=torch.tensor(1e-2)))

    opt, eager, graphs = _compiled_vs_eager(make, steps=8)
    assert opt.fast_steps == eager.fast_steps == 8
    assert graphs[WARM_UP - 1] == graphs[-1], f"graphs per step {graphs}: a tensor lr change recompiled"


def _set_betas(optimizer, value):
    betas = optimizer.param_groups[0]["betas"]
    betas[0].copy_(value)  # copied from a graph input (see WRITTEN_IN_GRAPH)
    betas[1].copy_(1 - 0.01 * value)  # computed


def test_a_compiled_step_with_tensor_betas_reads_them_each_step():
    """Tensor betas (and lr), filled in place every step, are op inputs: the compiled steps equal the eager ones and
    compile no graph after the warm-up."""
    _, _, graphs = _compiled_vs_eager(lambda params: case_named("lamb").make(
        params, backend="cpu", lr=torch.tensor(1e-2), betas=(torch.tensor(0.9), torch.tensor(0.99))), change=_set_betas)
    assert graphs[WARM_UP - 1] == graphs[-1], graphs


def _replace_grad(optimizer, value):
    p = optimizer.param_groups[0]["params"][1]
    p.grad = p.grad * (1e-7 * value)  # small: eps decides its bits


#: What a compiled training step may write before ``optimizer.step()``, each a way the op could miss it: an lr copied
#: from a graph input (Inductor leaves that copy to the graph's epilogue, after the op), betas copied and computed, a
#: grad scaled in place (clip_grad_norm_ does) and a grad replaced (Dynamo sets p.grad after the graph).
WRITTEN_IN_GRAPH = {
    "lr-copied": lambda optimizer, value: optimizer.param_groups[0]["lr"].copy_(value),
    "betas": _set_betas,
    "grad-scaled": lambda optimizer, value: optimizer.param_groups[0]["params"][0].grad.mul_(value),
    "grad-replaced": _replace_grad,
}


@pytest.mark.parametrize("written", list(WRITTEN_IN_GRAPH))
@pytest.mark.parametrize(("wrapper", "backend"), [("none", "cpu"), ("none", "reference"), ("lookahead", "cpu")])
def test_values_written_in_the_compiled_function_before_the_step_reach_it(wrapper, backend, written):
    """The op steps with the values the graph hands it, not with what the optimizer holds when the op runs: read off
    the optimizer, a compiled ``lr.copy_(x); opt.step()`` stepped with the last step's lr, and a replaced grad with
    the last step's grad."""
    def make(params):
        base = case_named("adabelief").make(params, backend=backend, lr=torch.tensor(1e-2),
                                            betas=(torch.tensor(0.9), torch.tensor(0.99)))
        return base if wrapper == "none" else SYNC_WRAPPERS[wrapper](base)

    _compiled_vs_eager(make, steps=4, change=WRITTEN_IN_GRAPH[written], in_graph=True)


def test_the_op_refuses_copies_of_what_the_optimizer_holds():
    """Handed copies of the params (or states) it writes, the step would write the optimizer's tensors and the graph
    copy its stale inputs over them afterwards: the op raises instead, before writing anything."""
    params = [torch.randn(s) for s in SHAPES]
    opt = case_named("adabelief").make(params, backend="cpu")
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()  # lays the buckets out
    before = [p.clone() for p in params]
    states = opt._written_tensors()
    for copied_params, copied_states in (([p.clone() for p in params], states), (params, [s.clone() for s in states])):
        with pytest.raises(RuntimeError, match="does not hand AdaBelief's step the params and states it holds"):
            torch.ops.fusedoptim.step(opt._handle, copied_params, [p.grad for p in params], copied_states, [],
                                      None, None)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
