"""The fused C++ CPU backend: builds ``csrc/`` just in time on first use (cached on disk) and runs a bucket's step.

The extension is compiled by ``torch.utils.cpp_extension.load`` (ninja) into the torch extensions directory
(``~/.cache/torch_extensions``), or into ``$FUSEDOPTIM_BUILD_DIR`` when set; later processes load the cached
library. Sources are found as the package data ``fusedoptim.csrc`` (``csrc/`` in a checkout), so an editable
install and a wheel both work. If the build fails, the reason is kept for the whole process: ``backend="auto"``
then runs the reference (with one warning) and ``backend="cpu"`` raises it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

log = logging.getLogger(__name__)

#: Param dtypes the C++ kernels take (math and state in fp32). fp64 params run the reference.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

# One translation unit per optimizer, compiled in parallel by ninja (csrc/rules.h), and the bindings.
_SOURCES = ("fusedoptim_cpu.cpp", "adabelief.cpp", "adan.cpp", "ademamix.cpp", "lookahead.cpp", "lars.cpp", "lamb.cpp",
            "ralars.cpp", "tadam.cpp", "adamp.cpp")
_HEADERS = ("_math.h", "finalize.h", "multi_tensor.h", "adabelief.h", "adan.h", "ademamix.h", "lars.h", "lamb.h",
            "ralars.h", "tadam.h", "adamp.h", "lookahead.h", "rules.h")
# -O3 vectorises the elementwise loops (`omp simd`); -fopenmp is what makes at::parallel_for use more than
# one thread in a header-only build. -fno-math-errno lets std::sqrt become one vector instruction: with errno
# semantics GCC emits a scalar sqrtss plus a libm call per element and nothing vectorises (AdaBelief 82 ms vs
# torch fused AdamW 26 ms per ResNet-50 step); it changes no result. -fno-trapping-math lets the fp16
# conversions' float ops be computed unconditionally, so fp16 loops vectorise too; it changes no value either
# (nothing here reads floating-point exception flags). -ffp-contract=off: the vectorised body and the scalar
# remainder of a loop must compute the same ops, or an element's result depends on where a thread's range
# starts (seen: 2 threads vs 1 differed in the last bit on a 40000-element tensor); as a bonus the rules then
# round like the reference's separate torch ops. No -ffast-math: AdEMAMix with β1 = 0 has
# log β1 = -inf, and parity with the reference (fp32 rtol 1e-5) leaves no room for reassociated sums.
_CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
_LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_extension: ModuleType | None = None
_failure: str | None = None
_warned = False


def sources_dir() -> Path:
    """Where the C++ sources are: the package data ``fusedoptim.csrc`` (``csrc/`` of the checkout)."""
    from . import csrc

    return Path(csrc.__file__).resolve().parent


def build_dir() -> Path | None:
    """``$FUSEDOPTIM_BUILD_DIR`` when set (created if missing), else None: torch's extensions directory."""
    path = os.environ.get("FUSEDOPTIM_BUILD_DIR")
    if not path:
        return None
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def _build() -> ModuleType:
    """Compile the extension, or load it from the on-disk cache when the sources and flags are unchanged."""
    from torch.utils import cpp_extension

    src = sources_dir()
    missing = [name for name in _SOURCES + _HEADERS if not (src / name).is_file()]
    if missing:
        raise FileNotFoundError(f"C++ sources missing from {src}: {missing}")
    bdir = build_dir()
    start = time.perf_counter()
    module = cpp_extension.load(
        name="fusedoptim_cpu",
        sources=[str(src / name) for name in _SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=_CFLAGS,
        extra_ldflags=_LDFLAGS,
        build_directory=None if bdir is None else str(bdir),
        verbose=False,
    )
    log.info("fusedoptim: C++ CPU kernels ready in %.1f s", time.perf_counter() - start)
    return module


def _extension_or_none() -> ModuleType | None:
    global _extension, _failure
    if _extension is None and _failure is None:
        with _lock:
            if _extension is None and _failure is None:
                try:
                    _extension = _build()
                except Exception as exc:  # no compiler, no ninja, a failed compile: all mean "not here"
                    detail = str(exc).strip() or type(exc).__name__
                    if len(detail) > 2000:  # a compiler log can be long; its end says what failed
                        detail = "..." + detail[-2000:]
                    _failure = f"building the C++ CPU kernels failed ({type(exc).__name__}: {detail})"
    return _extension


def unavailable_reason() -> str | None:
    """None when the C++ kernels are built (building them on first call), else why they cannot run."""
    _extension_or_none()
    return _failure


def extension() -> ModuleType:
    """The compiled extension; RuntimeError with the reason when it cannot be built."""
    module = _extension_or_none()
    if module is None:
        raise RuntimeError(_failure)
    return module


def warn_fallback_once(reason: str) -> None:
    """The one warning per process when ``backend="auto"`` runs the reference on CPU tensors."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"fusedoptim: {reason}; running the PyTorch reference path on CPU tensors instead "
                      "(slower). Install a C++ compiler and ninja, or pass backend='reference' to silence this.",
                      RuntimeWarning, stacklevel=2)


#: Elements per cache group of a two-pass step (csrc/multi_tensor.h, step_two_pass): pass A, finalize and pass B run
#: group after group, so that pass B finds in the cache what pass A read. Measured with ResNet-50 (2 threads, Zen 4,
#: 32 MB L3, in turns in one process), LARS ms per step at groups of 0.25 / 0.5 / 1 / 2 million elements: 15.4 /
#: 14.9 / 14.3 / 14.0 (the torch finalize between two whole passes: 18.9; fused AdamW 15.5). In two runs over all
#: five two-pass rules (csrc/README.md), 0.5-1 M were 2-16% faster than one group for each, and 2 M slower for
#: LAMB, whose pass B reads 12 B/element (24 MB at 2 M).
CACHE_GROUP_ELEMENTS = 1 << 20


def step(bucket: Any, active: tuple[int, ...], grads: list[torch.Tensor | None], hyper: tuple[float, ...],
         flags: tuple[bool, ...], maximize: bool, rule_name: str, *, num_sums: int = 0, num_factors: int = 0,
         sync_rate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One fused step over the tensors of ``bucket`` that have a gradient (steps already advanced).

    One call, ``<rule_name>_step``. A rule with per-tensor statistics (``num_sums`` > 0) runs pass A, its C++
    finalize and pass B in it (by cache groups) and returns the fp32 [segments, num_sums] sums and [segments,
    num_factors] factors (tensors, then the rows of tensors with rows: ``bucket.segments``; the factors of tensors
    without a gradient are not written); it updates ``bucket.tensor_states`` of the tensors stepped. With
    ``sync_rate`` (fp32[1]) Lookahead's sync runs inside the last pass on ``bucket.states["slow_param"]``.

    The call validates everything before it writes anything, so a failed step leaves params and states as they
    were. Non-contiguous grads are read through a contiguous copy (grads are never written); non-contiguous params
    are updated through a contiguous copy that is written back.
    """
    ext = extension()
    params = [bucket.params[i] for i in active]
    staged = [p if p.is_contiguous() else p.contiguous() for p in params]
    args = (staged, [grads[i].contiguous() for i in active], [bucket.states[name] for name in bucket.rule_state_names],
            [bucket.offsets[i] for i in active], bucket.steps, list(active), list(hyper), list(flags), maximize)
    sync = (None, None) if sync_rate is None else (bucket.states["slow_param"], sync_rate)
    tables = None
    if not num_sums:
        getattr(ext, f"{rule_name}_step")(*args, *sync)
    else:
        segments = bucket.segments
        rows = [segments.row_lengths[i] or 0 for i in active]
        first_row = [len(bucket.params) + segments.first_row[i] for i in active]
        tables = (torch.empty(segments.num_segments, num_sums, dtype=torch.float32),  # every entry is written
                  torch.empty(segments.num_segments, num_factors, dtype=torch.float32))
        getattr(ext, f"{rule_name}_step")(*args, rows, first_row, *tables, list(bucket.tensor_states.values()),
                                          CACHE_GROUP_ELEMENTS, *sync)
    for p, s in zip(params, staged, strict=True):
        if s is not p:
            p.copy_(s)
    return tables


def sync(bucket: Any, indices: tuple[int, ...], sync_rate: torch.Tensor) -> None:
    """Lookahead's sync of the listed tensors of a bucket on its own: slow ← slow + rate·(θ − slow); θ ← slow,
    with the fp32 slow weights in ``bucket.states["slow_param"]``. The same loop as a sync fused into a step's
    last pass (``keep_step``: the params are passed as grads and never read), so the two agree bitwise."""
    if not indices:
        return
    params = [bucket.params[i] for i in indices]
    staged = [p if p.is_contiguous() else p.contiguous() for p in params]
    extension().keep_step(staged, staged, [], [bucket.offsets[i] for i in indices], bucket.steps, list(indices), [],
                          [], False, bucket.states["slow_param"], sync_rate)
    for p, s in zip(params, staged, strict=True):
        if s is not p:
            p.copy_(s)
