"""pytest-benchmark front end: ``pytest benchmarks/ --benchmark-only [--bench-profile NAME]``.

The normal test run (``python -m pytest``, ``testpaths = ["tests"]``) never collects this directory.
Unlike ``tests/conftest.py`` this file does not set ``TRITON_INTERPRET``: benchmarks time compiled code.
"""

from __future__ import annotations

import pytest

from benchmarks.profiles import PROFILES


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--bench-profile", default="resnet50_l1", choices=list(PROFILES),
                     help="parameter profile of benchmarks/test_bench.py (default: resnet50_l1, 0.2 M params)")
    parser.addoption("--bench-dtypes", default="fp32,bf16", help="comma list of param dtypes (fp32, bf16, fp16)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``case`` over every implementation the registry finds on this device, per dtype;
    the ones that cannot run here are collected as skipped, with the reason."""
    if "case" not in metafunc.fixturenames:
        return
    from benchmarks.test_bench import cases

    dtypes = metafunc.config.getoption("--bench-dtypes").split(",")
    metafunc.parametrize("case", cases(dtypes))
