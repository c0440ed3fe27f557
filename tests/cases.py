"""The one registry of optimizer cases: adding an optimizer or an option adds a line here, not a test file."""

from __future__ import annotations

import inspect
import math
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

from fusedoptim import LAMB, LARS, AdaBelief, AdamP, Adan, AdEMAMix, FusedOptimizer, RaLars, TAdam

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
class Case:
    name: str
    cls: type[FusedOptimizer]
    kwargs: dict[str, Any] = field(default_factory=dict)
    # hyperparameters for the second param group of the "two_groups" profile
    group2: dict[str, Any] = field(default_factory=dict)

    def make(self, params: Any, **overrides: Any) -> FusedOptimizer:
        return self.cls(params, **{**self.kwargs, **overrides})

    def full_kwargs(self) -> dict[str, Any]:
        """Every hyperparameter of the optimizer: its signature's defaults overridden by this case."""
        sig = inspect.signature(self.cls.__init__)
        defaults = {k: v.default for k, v in sig.parameters.items()
                    if k not in ("self", "params", "backend") and v.default is not inspect.Parameter.empty}
        return {**defaults, **self.kwargs}


CASES: list[Case] = [
    Case("adabelief", AdaBelief, dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.99))),
    Case("adabelief-l2", AdaBelief, dict(lr=1e-2, weight_decay=0.1), dict(weight_decay=0.0)),
    Case("adabelief-decoupled-amsgrad", AdaBelief, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True,
                                                        amsgrad=True), dict(eps=1e-6)),
    Case("adabelief-maximize", AdaBelief, dict(lr=1e-2, maximize=True), dict(maximize=False)),
    Case("adan", Adan, dict(lr=1e-2), dict(lr=2e-2, betas=(0.9, 0.9, 0.999))),
    Case("adan-prox", Adan, dict(lr=1e-2, weight_decay=0.05), dict(weight_decay=0.2)),
    Case("adan-noprox-amsgrad", Adan, dict(lr=1e-2, weight_decay=0.05, no_prox=True, amsgrad=True),
         dict(no_prox=False)),
    Case("ademamix", AdEMAMix, dict(lr=1e-2), dict(alpha=2.0, betas=(0.8, 0.99, 0.999))),
    Case("ademamix-warmup-wd", AdEMAMix, dict(lr=1e-2, weight_decay=0.1, alpha_warmup=4, beta3_warmup=5),
         dict(alpha_warmup=None, beta3_warmup=2)),
    Case("ademamix-beta1-0-maximize", AdEMAMix, dict(lr=1e-2, betas=(0.0, 0.999, 0.9999), maximize=True)),
    Case("lars", LARS, dict(lr=0.1), dict(lr=0.05)),
    Case("lars-momentum-wd", LARS, dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2,
                                        trust_coefficient=0.02), dict(momentum=0.5)),
    Case("lars-nesterov-clip", LARS, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2,
                                          scale_clip=(0.5, 2.0)), dict(weight_decay=0.0)),
    Case("lamb", LAMB, dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.99))),
    Case("lamb-wd-clip", LAMB, dict(lr=1e-2, weight_decay=0.1, scale_clip=(0.5, 2.0)), dict(weight_decay=0.0)),
    Case("lamb-holocron-maximize", LAMB, dict(lr=1e-2, weight_decay=0.1, bias_correction=False, maximize=True)),
    Case("ralars", RaLars, dict(lr=1e-2, weight_decay=0.1), dict(weight_decay=0.0, betas=(0.9, 0.99))),
    Case("ralars-forced-clip", RaLars, dict(lr=1e-2, force_adaptive_momentum=True, scale_clip=(0.5, 2.0))),
    Case("tadam", TAdam, dict(lr=1e-2), dict(dof=3.0)),
    Case("tadam-wd-amsgrad", TAdam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True), dict(amsgrad=True, dof=math.inf)),
    Case("tadam-dof-inf", TAdam, dict(lr=1e-2, dof=math.inf)),
    Case("adamp", AdamP, dict(lr=1e-2), dict(lr=3e-3, delta=0.5)),
    Case("adamp-wd-nesterov", AdamP, dict(lr=1e-2, weight_decay=0.1, nesterov=True, delta=1.0), dict(nesterov=False)),
    Case("adamp-amsgrad-maximize", AdamP, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, wd_ratio=0.5, delta=5.0,
                                               maximize=True)),
]

CASE_IDS = [c.name for c in CASES]

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


def case_backends(backends: list[str], triton_cases: list[Case] | None = None) -> list:
    """(case, backend) parameters for every case on every backend its optimizer has (the C++ kernels exist for
    the elementwise rules only); ``triton_cases`` limits what runs through the (slow) interpreter."""
    import pytest

    return [pytest.param(case, backend, id=f"{case.name}-{backend}") for case in CASES for backend in backends
            if not (backend == "cpu" and case.cls.rule.cpu is None)
            and not (backend == "triton" and triton_cases is not None and case not in triton_cases)]


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
