"""state_dict: torch's per-parameter format, fp32 state kept with low-precision params, exact resumption."""

from __future__ import annotations

import io

import pytest
import torch
from cases import FIRST_CASES, case_backends, case_named
from helpers import assert_steps_like_twin

BACKENDS = ["reference", "triton", "cpu"]


def _run(case, backend, dtype, steps, start_params=None, state=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = start_params or [torch.randn(s, generator=gen).to(dtype) for s in [(5,), (1030,), (4, 3)]]
    opt = case.make([{"params": params[:2]}, {"params": params[2:], "lr": 3e-3}], backend=backend)
    if state is not None:
        opt.load_state_dict(state)
    return params, opt


def _steps(opt, params, dtype, first, last):
    for step in range(first, last):
        gen = torch.Generator().manual_seed(100 + step)
        for i, p in enumerate(params):
            p.grad = None if (i == 0 and step == 1) else torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("case", "backend"), case_backends(BACKENDS, triton_cases=FIRST_CASES))
def test_save_load_continue_is_identical(case, backend, dtype):
    k, n = 3, 6
    params, opt = _run(case, backend, dtype, k)
    _steps(opt, params, dtype, 0, k)
    buffer = io.BytesIO()
    torch.save({"params": [p.clone() for p in params], "optim": opt.state_dict()}, buffer)
    _steps(opt, params, dtype, k, n)  # the uninterrupted run

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh_params = saved["params"]
    _, fresh = _run(case, backend, dtype, 0, start_params=fresh_params, state=saved["optim"])
    for p in fresh_params:  # loaded state is visible at once, fp32 whatever the param dtype (a grad copy: its dtype)
        for name, value in fresh.state[p].items():
            assert value.dtype == (p.dtype if name in fresh.rule.param_dtype_states else torch.float32), name
    _steps(fresh, fresh_params, dtype, k, n)
    for a, b in zip(params, fresh_params, strict=True):
        assert torch.equal(a, b)
        for name in opt.state[a]:
            assert torch.equal(opt.state[a][name], fresh.state[b][name]), name


def test_state_dict_has_torch_format_and_views():
    case = case_named("adabelief")
    p = torch.randn(10)
    opt = case.make([p])
    p.grad = torch.randn(10)
    opt.step()
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert sd["param_groups"][0]["params"] == [0]
    assert sd["state"][0]["step"].item() == 1.0
    assert sd["state"][0]["exp_avg"].shape == (10,)
    # the state tensors are views of the flat buffers: writing the flat buffer shows through
    (bucket,) = opt.bucket_layout()
    bucket.states["exp_avg"].fill_(7.0)
    assert torch.equal(opt.state[p]["exp_avg"], torch.full((10,), 7.0))


def test_load_rejects_mismatched_state_without_changing_anything():
    case = case_named("adabelief")
    p = torch.randn(10)
    opt = case.make([p])
    p.grad = torch.randn(10)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    bad = opt.state_dict()
    bad["state"] = {0: {**bad["state"][0], "exp_avg": torch.zeros(11)}}  # (torch's state_dict shares the dicts)
    with pytest.raises(ValueError, match="exp_avg"):
        opt.load_state_dict(bad)
    for k, v in before.items():
        assert torch.equal(opt.state[p][k], v)
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict({"state": {}, "param_groups": []})


def test_loads_torch_adam_state_dict_into_bf16_params_without_casting_down():
    """A checkpoint of torch.optim.Adam (fp32 params) loads into AdEMAMix on bf16 params once the state Adam does not
    have is given (a missing one is a KeyError naming it, as torch raises, not a silent zero); state stays fp32."""
    from fusedoptim import AdEMAMix

    p32 = torch.randn(6)
    adam = torch.optim.Adam([p32], lr=1e-2)
    p32.grad = torch.randn(6)
    adam.step()
    sd = adam.state_dict()
    sd["param_groups"][0]["betas"] = (0.9, 0.999, 0.9999)
    pb = p32.detach().to(torch.bfloat16)
    ours = AdEMAMix([pb], lr=1e-2)
    sd["param_groups"][0]["lr"] = 5e-3
    with pytest.raises(KeyError, match="param 0 \\(shape \\(6,\\)\\) has no 'exp_avg_slow'"):
        ours.load_state_dict(sd)
    assert not ours.state and ours.param_groups[0]["lr"] == 1e-2  # nothing loaded
    sd["state"][0]["exp_avg_slow"] = torch.zeros(6)  # the slow EMA starts at zero, said explicitly
    ours.load_state_dict(sd)
    assert ours.state[pb]["exp_avg"].dtype == torch.float32
    assert torch.equal(ours.state[pb]["exp_avg"], adam.state[p32]["exp_avg"])
    assert ours.state[pb]["step"].item() == 1.0
    assert torch.equal(ours.state[pb]["exp_avg_slow"], torch.zeros(6))  # not in Adam's state: starts at zero


def _spoil(sd, kind, case):
    entry = sd["state"][1]
    first = next(n for n in entry if n != "step" and n not in case.cls.rule.__dict__.get("tensor_states", ()))
    if kind == "no step":
        del entry["step"]
    elif kind == "no state":
        del entry[first]
    elif kind == "step not a number":
        entry["step"] = "3"
    elif kind == "step nan":
        entry["step"] = torch.tensor(float("nan"))
    elif kind == "state of the wrong size":
        entry[first] = entry[first].reshape(-1)[:-1]
    elif kind == "integer state":
        entry[first] = entry[first].long()
    elif kind == "entry not a dict":
        sd["state"][1] = [1, 2]
    elif kind == "bad hyperparameter":
        sd["param_groups"][0]["lr"] = -1.0
    elif kind == "group of another size":
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    return {"no step": KeyError, "no state": KeyError}.get(kind, ValueError)


_SPOILS = ["no step", "no state", "step not a number", "step nan", "state of the wrong size", "integer state",
           "entry not a dict", "bad hyperparameter", "group of another size"]


def _stateful_first_cases():
    """The first case of each optimizer that keeps a state buffer (LARS without momentum keeps only its steps)."""
    from cases import CASES

    out = {}
    for case in CASES:
        opt = case.make([torch.zeros(1)])
        if case.cls not in out and opt.group_state_names(opt.param_groups[0]):
            out[case.cls] = case
    return list(out.values())


@pytest.mark.parametrize("kind", _SPOILS)
@pytest.mark.parametrize("case", _stateful_first_cases(), ids=lambda c: c.name)
def test_a_bad_state_dict_loads_nothing(case, kind):
    """load_state_dict is all or nothing: a bad entry raises, naming what is wrong, and the optimizer keeps its
    groups and state and steps on exactly as an untouched twin does."""
    import copy

    params = [torch.randn(5), torch.randn(4, 3)]
    twin_params = [p.clone() for p in params]
    opt, twin = case.make(params, backend="cpu"), case.make(twin_params, backend="cpu")
    for o, ps in ((opt, params), (twin, twin_params)):
        for p in ps:
            p.grad = torch.ones_like(p)
        o.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = 0.5  # a valid change, which must not land either
    error = _spoil(sd, kind, case)
    with pytest.raises(error):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == twin.param_groups[0]["lr"]
    assert_steps_like_twin(opt, params, twin, twin_params)
