"""Bad input against every optimizer and backend: ``python -m benchmarks.attacks [--backends ...] [--quick]``.

Each attack takes an optimizer that has stepped once and does one thing a user must not get away with: a step
with a broken gradient or hyperparameter, a bad ``add_param_group`` or ``load_state_dict``, a closure that
raises. Every attack must raise, and leave the params, the states and the param groups bitwise as they were;
then a good step must give what an untouched twin gives. The table counts, per attack, the runs that raised
cleanly, those that raised but changed something, and those that did not raise at all (both must be 0;
tests/test_attacks.py checks it). The Triton backend runs through the interpreter on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

if __name__ == "__main__":  # the Triton backend on CPU tensors: the interpreter, decided before triton loads
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import torch


def _set_grad_data(p: torch.Tensor, value: torch.Tensor) -> None:
    p.grad.data = value  # the setter refuses a mismatched p.grad = ...; code that reuses buffers can do this


def _group(opt, **values):
    opt.param_groups[0].update(values)


def _load(opt, spoil: Callable[[dict], None]) -> None:
    sd = copy.deepcopy(opt.state_dict())
    spoil(sd)
    opt.load_state_dict(sd)


def _state_entry(sd: dict, pid: int = 1) -> dict:
    return sd["state"][pid]


class NotApplicable(Exception):
    """The attack needs what this configuration does not have (a state buffer: LARS without momentum)."""


def _first_tensor_state(sd: dict) -> str:
    for key, value in _state_entry(sd).items():
        if key != "step" and isinstance(value, torch.Tensor) and value.dim() > 0:
            return key
    raise NotApplicable


#: name -> (what it attacks, the attack on (optimizer, [vector param, matrix param])); each must raise.
ATTACKS: dict[str, tuple[str, Callable]] = {
    "fp16 grad on fp32 param": ("grad", lambda o, ps: _set_grad_data(ps[1], ps[1].grad.half())),
    "fp64 grad": ("grad", lambda o, ps: _set_grad_data(ps[1], ps[1].grad.double())),
    "1-element grad": ("grad", lambda o, ps: _set_grad_data(ps[1], torch.randn(1))),
    "transposed grad shape": ("grad", lambda o, ps: _set_grad_data(ps[1], torch.randn(ps[1].shape[::-1]))),
    "sparse grad": ("grad", lambda o, ps: setattr(ps[1], "grad", torch.eye(*ps[1].shape).to_sparse())),
    "grad aliasing its param": ("grad", lambda o, ps: _set_grad_data(ps[1], ps[1].data)),
    "lr NaN": ("hyperparameter", lambda o, ps: _group(o, lr=math.nan)),
    "lr negative": ("hyperparameter", lambda o, ps: _group(o, lr=-1e-3)),
    "lr overflows fp32": ("hyperparameter", lambda o, ps: _group(o, lr=1e39)),
    "lr a string": ("hyperparameter", lambda o, ps: _group(o, lr="0.1")),
    "lr a 2-element tensor": ("hyperparameter", lambda o, ps: _group(o, lr=torch.tensor([0.1, 0.2]))),
    "lr an int tensor": ("hyperparameter", lambda o, ps: _group(o, lr=torch.tensor(1))),
    "weight_decay NaN": ("hyperparameter", lambda o, ps: _group(o, weight_decay=math.nan)),
    "a beta of 1": ("hyperparameter", lambda o, ps: _group(o, betas=(1.0,) + tuple(o.param_groups[0]["betas"])[1:])
                    if "betas" in o.param_groups[0] else _group(o, momentum=-1.0)),
    "group overlapping a param": ("add_param_group", lambda o, ps: o.add_param_group({"params": [ps[1][1:]]})),
    "group repeating a param": ("add_param_group", lambda o, ps: o.add_param_group({"params": [ps[0]]})),
    "group with a bad lr": ("add_param_group", lambda o, ps: o.add_param_group({"params": [torch.randn(3)],
                                                                               "lr": -1.0})),
    "group of an int param": ("add_param_group", lambda o, ps: o.add_param_group({"params": [torch.ones(3).long()]})),
    "state without step": ("load_state_dict", lambda o, ps: _load(o, lambda sd: _state_entry(sd).pop(
        "step" if _first_tensor_state(sd) else "step"))),  # a state with only its step, popped, is no state
    "state without a moment": ("load_state_dict",
                               lambda o, ps: _load(o, lambda sd: _state_entry(sd).pop(_first_tensor_state(sd)))),
    "step a string": ("load_state_dict", lambda o, ps: _load(o, lambda sd: _state_entry(sd).update(step="3"))),
    "step NaN": ("load_state_dict", lambda o, ps: _load(o, lambda sd: _state_entry(sd).update(step=math.nan))),
    "state of the wrong size": ("load_state_dict", lambda o, ps: _load(o, lambda sd: _state_entry(sd).update(
        {_first_tensor_state(sd): torch.zeros(2)}))),
    "state of ints": ("load_state_dict", lambda o, ps: _load(o, lambda sd: _state_entry(sd).update(
        {_first_tensor_state(sd): _state_entry(sd)[_first_tensor_state(sd)].long()}))),
    "entry not a dict": ("load_state_dict", lambda o, ps: _load(o, lambda sd: sd["state"].update({1: [1]}))),
    "group lr negative": ("load_state_dict", lambda o, ps: _load(o, lambda sd: sd["param_groups"][0].update(lr=-1))),
    "group of another size": ("load_state_dict", lambda o, ps: _load(o, lambda sd: sd["param_groups"][0].update(
        params=sd["param_groups"][0]["params"][:1]))),
    "closure raises": ("closure", lambda o, ps: o.step(lambda: (_ for _ in ()).throw(RuntimeError("closure")))),
}

#: Which attacks are a step (the others raise in the call they make).
STEP_KINDS = ("grad", "hyperparameter")


@dataclass
class Outcome:
    attack: str
    kind: str
    case: str
    backend: str
    raised: bool
    changed: list[str]
    error: str


def _snapshot(opt, params) -> dict[str, torch.Tensor | object]:
    out: dict[str, object] = {}
    for i, p in enumerate(params):
        out[f"param {i}"] = p.detach().clone()
        for name, value in opt.state.get(p, {}).items():
            out[f"param {i} {name}"] = value.detach().clone() if isinstance(value, torch.Tensor) else value
    for g, group in enumerate(opt.param_groups):
        for key, value in group.items():
            if key != "params":
                out[f"group {g} {key}"] = value.detach().clone() if isinstance(value, torch.Tensor) else value
        out[f"group {g} params"] = [id(p) for p in group["params"]]
    out["groups"] = len(opt.param_groups)
    return out


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))
    try:
        return bool(a == b) or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    except (RuntimeError, TypeError):
        return False


def _make(case, backend):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, generator=gen), torch.randn(4, 3, generator=gen)]
    opt = case.make(params, backend=backend)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    for p in params:  # the grads of the attacked step
        p.grad = torch.randn(p.shape, generator=gen)
    return params, opt


def run_attack(name: str, case, backend: str) -> Outcome | None:
    kind, attack = ATTACKS[name]
    params, opt = _make(case, backend)
    twin_params, twin = _make(case, backend)
    groups_before = [dict(g) for g in opt.param_groups]
    before = _snapshot(opt, params)
    raised, error = False, ""
    try:
        if kind in STEP_KINDS:  # the user's own change to grads or groups, then the step, which must change nothing
            attack(opt, params)
            before = _snapshot(opt, params)
            opt.step()
        else:
            attack(opt, params)
    except NotApplicable:
        return None
    except Exception as e:  # noqa: BLE001 - every exception counts: what it changed is the question
        first = (str(e).splitlines() or [""])[0]
        raised, error = True, f"{type(e).__name__}: {first[:90]}"
    after = _snapshot(opt, params)
    changed = [key for key in before if key not in after or not _same(before[key], after[key])]
    changed += [key for key in after if key not in before]
    if raised and not changed:  # put the bad input away, then one good step must match the twin's
        for group, saved in zip(opt.param_groups, groups_before, strict=False):
            group.update(saved)
        del opt.param_groups[len(groups_before):]
        for p, q in zip(params, twin_params, strict=True):
            p.grad = torch.full_like(p, 0.25)
            q.grad = torch.full_like(q, 0.25)
        opt.step()
        twin.step()
        for i, (p, q) in enumerate(zip(params, twin_params, strict=True)):
            if not _same(p.detach(), q.detach()):
                changed.append(f"param {i} after the next good step")
    return Outcome(name, kind, case.name, backend, raised, changed, error)


def run(cases, backends, attacks=None) -> list[Outcome]:
    from fusedoptim import BackendUnavailable

    out = []
    for backend in backends:
        for case in cases:
            for name in attacks or ATTACKS:
                try:
                    outcome = run_attack(name, case, backend)
                except BackendUnavailable:
                    break
                if outcome is not None:
                    out.append(outcome)
    return out


def table(outcomes: list[Outcome]) -> str:
    lines = ["| attack | what | runs | raised, nothing changed | raised, state changed | did not raise | error |",
             "|---|---|---:|---:|---:|---:|---|"]
    for name, (kind, _) in ATTACKS.items():
        rows = [o for o in outcomes if o.attack == name]
        if not rows:
            continue
        clean = sum(o.raised and not o.changed for o in rows)
        dirty = sum(o.raised and bool(o.changed) for o in rows)
        silent = sum(not o.raised for o in rows)
        lines.append(f"| {name} | {kind} | {len(rows)} | {clean} | {dirty} | {silent} | {rows[0].error} |")
    total = len(outcomes)
    dirty = sum(o.raised and bool(o.changed) for o in outcomes)
    silent = sum(not o.raised for o in outcomes)
    lines.append(f"| **all** | | {total} | {total - dirty - silent} | {dirty} | {silent} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attacks", description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="*", default=["reference", "cpu", "triton"])
    parser.add_argument("--quick", action="store_true", help="the first case of each optimizer only (default: all)")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from cases import CASES, FIRST_CASES

    outcomes = run(FIRST_CASES if args.quick else CASES, args.backends)
    print(table(outcomes))
    bad = [o for o in outcomes if o.changed or not o.raised]
    for o in bad[:20]:
        print(f"{o.attack} / {o.case} / {o.backend}: raised={o.raised} changed={o.changed[:4]} {o.error}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
