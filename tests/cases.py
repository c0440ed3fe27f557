"""The one registry of optimizer cases: adding an optimizer or an option adds a line here, not a test file."""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from oracles import (
    adabelief_oracle,
    adamp_oracle,
    adan_oracle,
    ademamix_oracle,
    lamb_oracle,
    lars_oracle,
    ralars_oracle,
    tadam_oracle,
)

from fusedoptim import LAMB, LARS, AdaBelief, AdamP, Adan, AdEMAMix, FusedOptimizer, Lookahead, RaLars, Scout, TAdam

#: The independent float64 oracle of each optimizer (tests/oracles.py), called with the optimizer's own kwargs.
ORACLES: dict[type, Callable[..., torch.Tensor]] = {
    AdaBelief: adabelief_oracle,
    Adan: adan_oracle,
    AdEMAMix: ademamix_oracle,
    LARS: lars_oracle,
    LAMB: lamb_oracle,
    RaLars: ralars_oracle,
    TAdam: tadam_oracle,
    AdamP: adamp_oracle,
}


@dataclass(frozen=True)
class ErrorInput:
    """Constructor arguments the optimizer must reject (torch's ``ErrorOptimizerInput``): given over the case's
    kwargs, the constructor raises ``error`` with a message that ``match`` (a regular expression) finds."""

    kwargs: dict[str, Any]
    error: type[Exception]
    match: str


def _rejects(message: str, **kwargs: Any) -> ErrorInput:
    """A ValueError whose message contains ``message`` verbatim."""
    return ErrorInput(kwargs, ValueError, re.escape(message))


# ------------------------------------------------------------------- error inputs (optim/_validation.py)
LR_ERRORS = (
    _rejects("Invalid learning rate: -0.001 (must be finite and >= 0)", lr=-1e-3),
    _rejects("Invalid learning rate: nan", lr=math.nan),
    _rejects("Invalid learning rate: inf", lr=math.inf),
    _rejects("lr must be a non-negative number, got '0.1'", lr="0.1"),
    _rejects("lr must be a non-negative number, got True", lr=True),
    _rejects("lr must be a number or a 1-element tensor, got a tensor of shape (2,)", lr=torch.tensor([0.1, 0.2])),
    _rejects("a tensor lr must be floating-point, got torch.int64", lr=torch.tensor(1)),
)


def _non_negative(name: str, label: str | None = None) -> tuple[ErrorInput, ...]:
    """check_non_negative(label, kwargs[name]): negative, NaN, infinite, a string and a bool are rejected."""
    label = label or name
    return (
        _rejects(f"Invalid {label} value: -0.1 (must be a finite number >= 0)", **{name: -0.1}),
        _rejects(f"Invalid {label} value: nan", **{name: math.nan}),
        _rejects(f"Invalid {label} value: inf", **{name: math.inf}),
        _rejects(f"Invalid {label} value: '0.1'", **{name: "0.1"}),
        _rejects(f"Invalid {label} value: True", **{name: True}),
    )


def _betas_errors(valid: tuple[float, ...]) -> tuple[ErrorInput, ...]:
    """check_betas(betas, len(valid)): the wrong length or type, and each beta out of [0, 1)."""
    count = len(valid)
    out = [
        _rejects(f"betas must be a tuple of {count} floats, got {valid[:-1]!r}", betas=valid[:-1]),
        _rejects(f"betas must be a tuple of {count} floats, got {valid + (0.5,)!r}", betas=valid + (0.5,)),
        _rejects(f"betas must be a tuple of {count} floats, got 0.9", betas=0.9),
    ]
    for i in range(count):
        for bad in (1.0, -0.1, math.nan):
            betas = valid[:i] + (bad,) + valid[i + 1:]
            out.append(_rejects(f"Invalid beta parameter at index {i}: {bad!r} (must be in [0, 1))", betas=betas))
    return tuple(out)


SCALE_CLIP_ERRORS = (
    _rejects("scale_clip must be None or a (lo, hi) pair, got (1.0,)", scale_clip=(1.0,)),
    _rejects("scale_clip must be None or a (lo, hi) pair, got 0.5", scale_clip=0.5),
    _rejects("Invalid scale_clip lower bound value: -1.0", scale_clip=(-1.0, 2.0)),
    _rejects("Invalid scale_clip upper bound value: nan", scale_clip=(0.5, math.nan)),
    _rejects("Invalid scale_clip: lower bound 2.0 > upper bound 0.5", scale_clip=(2.0, 0.5)),
)


def _adam_errors(betas: tuple[float, ...]) -> tuple[ErrorInput, ...]:
    """check_adam: lr, the betas, eps and weight_decay."""
    return LR_ERRORS + _betas_errors(betas) + _non_negative("eps", "epsilon") + _non_negative("weight_decay")


def _warmup_errors(name: str) -> tuple[ErrorInput, ...]:
    return tuple(_rejects(f"Invalid {name}: {bad!r} (must be None or an int >= 1)", **{name: bad})
                 for bad in (0, -3, 2.5, True))


#: Each optimizer's constructor checks (optim/<name>.py), given to the first case of each optimizer.
ERRORS: dict[type, tuple[ErrorInput, ...]] = {
    AdaBelief: _adam_errors((0.9, 0.999)),
    Adan: _adam_errors((0.98, 0.92, 0.99)),
    AdEMAMix: _adam_errors((0.9, 0.999, 0.9999)) + _non_negative("alpha") + _warmup_errors("alpha_warmup")
    + _warmup_errors("beta3_warmup") + (
        _rejects("beta3_warmup starts β3 at β1, so it needs betas[0] > 0", betas=(0.0, 0.999, 0.9999),
                 beta3_warmup=10),
    ),
    LARS: LR_ERRORS + _non_negative("momentum") + _non_negative("dampening") + _non_negative("weight_decay")
    + _non_negative("trust_coefficient") + SCALE_CLIP_ERRORS + (
        _rejects("Nesterov momentum requires a momentum > 0 and zero dampening", nesterov=True),
        _rejects("Nesterov momentum requires a momentum > 0 and zero dampening", nesterov=True, momentum=0.9,
                 dampening=0.1),
    ),
    LAMB: _adam_errors((0.9, 0.999)) + SCALE_CLIP_ERRORS,
    RaLars: _adam_errors((0.9, 0.999)) + SCALE_CLIP_ERRORS,
    TAdam: _adam_errors((0.9, 0.999)) + (
        _rejects("TAdam needs betas[0] > 0 (its weight W_t divides by β1)", betas=(0.0, 0.999)),
    ) + tuple(_rejects(f"Invalid dof: {bad!r} (must be None or a number > 0, math.inf allowed)", dof=bad)
              for bad in (0, -1.0, math.nan, True, "3")),
    AdamP: _adam_errors((0.9, 0.999)) + _non_negative("delta") + _non_negative("wd_ratio"),
}


@dataclass(frozen=True)
class Case:
    name: str
    cls: type[FusedOptimizer]
    kwargs: dict[str, Any] = field(default_factory=dict)
    # hyperparameters for the second param group of the "two_groups" profile
    group2: dict[str, Any] = field(default_factory=dict)
    # constructor arguments that must be rejected (tests/test_validation.py)
    errors: tuple[ErrorInput, ...] = ()

    def make(self, params: Any, **overrides: Any) -> FusedOptimizer:
        return self.cls(params, **{**self.kwargs, **overrides})

    def full_kwargs(self) -> dict[str, Any]:
        """Every hyperparameter of the optimizer: its signature's defaults overridden by this case."""
        sig = inspect.signature(self.cls.__init__)
        defaults = {k: v.default for k, v in sig.parameters.items()
                    if k not in ("self", "params", "backend", "capturable")
                    and v.default is not inspect.Parameter.empty}
        return {**defaults, **self.kwargs}


CASES: list[Case] = [
    Case("adabelief", AdaBelief, dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.99)), errors=ERRORS[AdaBelief]),
    Case("adabelief-l2", AdaBelief, dict(lr=1e-2, weight_decay=0.1), dict(weight_decay=0.0)),
    Case("adabelief-decoupled-amsgrad", AdaBelief, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True,
                                                        amsgrad=True), dict(eps=1e-6)),
    Case("adabelief-maximize", AdaBelief, dict(lr=1e-2, maximize=True), dict(maximize=False)),
    Case("adan", Adan, dict(lr=1e-2), dict(lr=2e-2, betas=(0.9, 0.9, 0.999)), errors=ERRORS[Adan]),
    Case("adan-prox", Adan, dict(lr=1e-2, weight_decay=0.05), dict(weight_decay=0.2)),
    Case("adan-noprox-amsgrad", Adan, dict(lr=1e-2, weight_decay=0.05, no_prox=True, amsgrad=True),
         dict(no_prox=False)),
    Case("ademamix", AdEMAMix, dict(lr=1e-2), dict(alpha=2.0, betas=(0.8, 0.99, 0.999)), errors=ERRORS[AdEMAMix]),
    Case("ademamix-warmup-wd", AdEMAMix, dict(lr=1e-2, weight_decay=0.1, alpha_warmup=4, beta3_warmup=5),
         dict(alpha_warmup=None, beta3_warmup=2)),
    Case("ademamix-beta1-0-maximize", AdEMAMix, dict(lr=1e-2, betas=(0.0, 0.999, 0.9999), maximize=True)),
    Case("lars", LARS, dict(lr=0.1), dict(lr=0.05), errors=ERRORS[LARS]),
    Case("lars-momentum-wd", LARS, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2,
                                        trust_coefficient=0.02), dict(momentum=0.5)),
    Case("lars-nesterov-clip", LARS, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2,
                                          scale_clip=(0.5, 2.0)), dict(weight_decay=0.0)),
    Case("lamb", LAMB, dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.99)), errors=ERRORS[LAMB]),
    Case("lamb-wd-clip", LAMB, dict(lr=1e-2, weight_decay=0.1, scale_clip=(0.5, 2.0)), dict(weight_decay=0.0)),
    Case("lamb-holocron-maximize", LAMB, dict(lr=1e-2, weight_decay=0.1, bias_correction=False, maximize=True)),
    Case("ralars", RaLars, dict(lr=1e-2, weight_decay=0.1), dict(weight_decay=0.0, betas=(0.9, 0.99)),
         errors=ERRORS[RaLars]),
    Case("ralars-forced-clip", RaLars, dict(lr=1e-2, force_adaptive_momentum=True, scale_clip=(0.5, 2.0))),
    Case("tadam", TAdam, dict(lr=1e-2), dict(dof=3.0), errors=ERRORS[TAdam]),
    Case("tadam-wd-amsgrad", TAdam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True), dict(amsgrad=True, dof=math.inf)),
    Case("tadam-dof-inf", TAdam, dict(lr=1e-2, dof=math.inf)),
    Case("adamp", AdamP, dict(lr=1e-2), dict(lr=3e-3, delta=0.5), errors=ERRORS[AdamP]),
    Case("adamp-wd-nesterov", AdamP, dict(lr=1e-2, weight_decay=0.1, nesterov=True, delta=1.0), dict(nesterov=False)),
    Case("adamp-amsgrad-maximize", AdamP, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, wd_ratio=0.5, delta=5.0,
                                               maximize=True)),
]

CASE_IDS = [c.name for c in CASES]

#: (case, error input) parameters: every error input of every case.
ERROR_PARAMS = [(case, error) for case in CASES for error in case.errors]


def error_id(case: Case, error: ErrorInput) -> str:
    return f"{case.name}-" + ",".join(f"{k}={v!r}" for k, v in error.kwargs.items())


#: Every case by its name: tests select a case by name, never by its position in CASES.
CASE_BY_NAME: dict[str, Case] = {c.name: c for c in CASES}
assert len(CASE_BY_NAME) == len(CASES), "case names must be unique"


def case_named(name: str) -> Case:
    """The case called ``name``; a KeyError listing the known names otherwise."""
    try:
        return CASE_BY_NAME[name]
    except KeyError:
        raise KeyError(f"no case named {name!r}; known cases: {', '.join(CASE_BY_NAME)}") from None

#: The first case of each optimizer: where a test runs through the interpreter only to show that a mechanism
#: works for every optimizer (the options are covered by the parity test).
FIRST_CASES: list[Case] = list({case.cls: case for case in reversed(CASES)}.values())

#: The wrappers as the GradScaler, capturable and compile tests put them around a base (k = 3, two syncs in 7 or 8
#: steps): Lookahead syncing in the base's last pass and in a pass of its own, and Scout at rate 0 (its rate is then
#: 1 - coherence, unclamped, so that every sum counts).
SYNC_WRAPPERS: dict[str, Callable[[torch.optim.Optimizer], torch.optim.Optimizer]] = {
    "lookahead": lambda base: Lookahead(base, sync_period=3),
    "lookahead-separate": lambda base: Lookahead(base, sync_period=3, fused_sync=False),
    "scout": lambda base: Scout(base, sync_rate=0.0, sync_period=3),
}


def case_backends(backends: list[str], triton_cases: list[Case] | None = None) -> list:
    """(case, backend) parameters for every case on every backend its optimizer has (the C++ kernels exist for
    the elementwise rules only); ``triton_cases`` limits what runs through the (slow) interpreter."""
    import pytest

    return [pytest.param(case, backend, id=f"{case.name}-{backend}") for case in CASES for backend in backends
            if not (backend == "cpu" and case.cls.rule.cpu is None)
            and not (backend == "triton" and triton_cases is not None and case not in triton_cases)]


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
