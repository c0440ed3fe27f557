"""The benchmark's comparisons through pytest-benchmark: one test per (optimizer, implementation, dtype).

    pytest benchmarks/ --benchmark-only                            # ResNet-50 stem + layer1, fp32 and bf16
    pytest benchmarks/ --benchmark-only --bench-profile resnet50   # the full profile
    pytest benchmarks/ --benchmark-only -k adan --benchmark-group-by=group

Same registry, parameters and gradients as ``python -m benchmarks``; pytest-benchmark does the timing
(wall clock, with a device synchronisation per step on CUDA). Each (profile, dtype) is one benchmark
group, so its table compares every implementation with torch's three AdamW variants.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.harness import DTYPES, fresh_copies, make_params
from benchmarks.profiles import PROFILES, numel
from benchmarks.registry import ALGORITHMS, Algorithm, Impl, bytes_per_step, implementations

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cases(dtypes: list[str]) -> list:
    """One pytest param per implementation; what cannot run here is a skipped param with its reason."""
    out = []
    for dtype in dtypes:
        for algo in ALGORITHMS:
            found, missing = implementations(algo, DEVICE, DTYPES[dtype])
            out += [pytest.param((algo, impl, dtype), id=f"{algo.name}-{impl.impl}-{dtype}") for impl in found]
            out += [pytest.param(None, id=f"{algo.name}-{impl}-{dtype}", marks=pytest.mark.skip(reason=why))
                    for impl, why in missing]
    return out


def test_step(benchmark, case: tuple[Algorithm, Impl, str], request: pytest.FixtureRequest) -> None:
    algo, impl, dtype = case
    profile = request.config.getoption("--bench-profile")
    shapes = PROFILES[profile]()
    params, grads = make_params(shapes, DTYPES[dtype], DEVICE)
    opt = impl.make(fresh_copies(params, grads))
    opt.step()  # the first step allocates state and compiles: not part of the steady-state time
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    sync()
    benchmark.group = f"{profile} {dtype}"
    benchmark.extra_info.update(optimizer=algo.name, impl=impl.impl, profile=profile, dtype=dtype,
                                bytes_per_param=bytes_per_step(algo, params) / numel(shapes))

    def step() -> None:
        opt.step()
        sync()

    benchmark(step)
    assert all(torch.isfinite(p).all() for group in opt.param_groups for p in group["params"])
