"""The C++ backend: builds ``csrc/`` just in time on first use (cached on disk) and runs a bucket's step in one call.

The extension is compiled by ``torch.utils.cpp_extension.load`` (ninja) into a directory per build key under the
torch extensions directory (``~/.cache/torch_extensions``) or ``$FUSEDOPTIM_BUILD_DIR``; later processes load the
cached library once its digest checks out (optim/_build_cache.py: the key, the lock, the digest). Sources are
found as the package data ``fusedoptim.csrc`` (``csrc/`` in a checkout), so an editable
install and a wheel both work. If the build fails, the reason is kept for the whole process: ``backend="auto"``
then runs the reference (with one warning) and ``backend="cpu"`` raises it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from . import _build_cache
from ._layout import check_grads_apart
from .scout import reciprocals

if TYPE_CHECKING:
    from ._backends import Run
    from ._layout import Bucket
    from ._rule import Rule

log = logging.getLogger(__name__)

#: Param dtypes the C++ kernels take (math and state in fp32). fp64 params run the reference.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

# One translation unit per optimizer, compiled in parallel by ninja (csrc/rules.h), and the bindings.
SOURCES = ("fusedoptim_cpu.cpp", "adabelief.cpp", "adan.cpp", "ademamix.cpp", "lookahead.cpp", "lars.cpp", "lamb.cpp",
            "ralars.cpp", "tadam.cpp", "adamp.cpp", "scout.cpp")
HEADERS = ("_math.h", "finalize.h", "multi_tensor.h", "adabelief.h", "adan.h", "ademamix.h", "lars.h", "lamb.h",
            "ralars.h", "tadam.h", "adamp.h", "lookahead.h", "scout.h", "rules.h")
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

def sources_dir() -> Path:
    """Where the C++ sources are: the package data ``fusedoptim.csrc`` (``csrc/`` of the checkout)."""
    from . import csrc

    return Path(csrc.__file__).resolve().parent


def build_root() -> Path:
    """Where the builds are cached, one directory per build key: ``$FUSEDOPTIM_BUILD_DIR`` when set, else torch's
    extensions directory (``~/.cache/torch_extensions/<python and torch tag>``)."""
    path = os.environ.get("FUSEDOPTIM_BUILD_DIR")
    if path:
        return Path(path)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def build_directory() -> Path:
    """This build's directory: ``fusedoptim_cpu-<key>`` under ``build_root()``, the key a hash of the sources'
    contents, the flags and torch's and Python's header directories (optim/_build_cache.py), not of the checkout's
    path."""
    key = _build_cache.build_key(sources_dir(), SOURCES + HEADERS, _CFLAGS + _LDFLAGS)
    return build_root() / f"fusedoptim_cpu-{key}"


def build(wait_s: float | None = None) -> ModuleType:
    """Compile the extension, or load it from the on-disk cache when the sources and flags are unchanged, under the
    cache's lock (a stale one is removed) and after checking the cached library's digest (optim/_build_cache.py)."""
    from torch.utils import cpp_extension

    src = sources_dir()
    missing = [name for name in SOURCES + HEADERS if not (src / name).is_file()]
    if missing:
        raise FileNotFoundError(f"C++ sources missing from {src}: {missing}")
    directory = build_directory()
    start = time.perf_counter()
    with _build_cache.build_lock(directory, wait_s, log):
        problem = _build_cache.verify_library(directory)
        if problem is not None:
            log.warning("fusedoptim: %s", problem)
        if not (directory / _build_cache.LIBRARY).exists():
            log.warning("fusedoptim: building the C++ CPU kernels in %s (first use of these sources: about 1-2 "
                        "minutes on 2 cores, once; `python -m fusedoptim.build` does it ahead of time)", directory)
        # The sources are copied in: the build's commands then name the cache directory, not the checkout, and
        # another clone of the same sources (in the same environment) finds nothing to rebuild.
        copies = directory / "src"
        copies.mkdir(exist_ok=True)
        for name in SOURCES + HEADERS:
            data = (src / name).read_bytes()
            if not (copies / name).is_file() or (copies / name).read_bytes() != data:
                (copies / name).write_bytes(data)
        module = cpp_extension.load(
            name="fusedoptim_cpu",
            sources=[str(copies / name) for name in SOURCES],
            extra_include_paths=[str(copies)],
            extra_cflags=list(_CFLAGS),
            extra_ldflags=list(_LDFLAGS),  # copies: torch appends its libraries to the list it is given
            build_directory=str(directory),
            verbose=False,
        )
        _build_cache.record_if_rebuilt(directory)
    log.info("fusedoptim: C++ CPU kernels ready in %.1f s", time.perf_counter() - start)
    return module


class ExtensionLoader:
    """Builds (or loads) the extension once per process with ``build``, and remembers a failure's reason for the
    whole process, with one warning when ``backend="auto"`` falls back to the reference because of it."""

    def __init__(self, build: Callable[[], ModuleType] = build) -> None:
        self.build = build
        self.module: ModuleType | None = None
        self.failure: str | None = None
        self.warned = False
        self._lock = threading.Lock()

    def load(self) -> ModuleType | None:
        if self.module is None and self.failure is None:
            with self._lock:
                if self.module is None and self.failure is None:
                    try:
                        self.module = self.build()
                    except Exception as exc:  # no compiler, no ninja, a failed compile: all mean "not here"
                        detail = str(exc).strip() or type(exc).__name__
                        if len(detail) > 2000:  # a compiler log can be long; its end says what failed
                            detail = "..." + detail[-2000:]
                        self.failure = f"building the C++ CPU kernels failed ({type(exc).__name__}: {detail})"
        return self.module


#: The process's loader (tests put one with a failing ``build`` in its place).
LOADER = ExtensionLoader()


def unavailable_reason() -> str | None:
    """None when the C++ kernels are built (building them on first call), else why they cannot run."""
    LOADER.load()
    return LOADER.failure


def extension() -> ModuleType:
    """The compiled extension; RuntimeError with the reason when it cannot be built."""
    module = LOADER.load()
    if module is None:
        raise RuntimeError(LOADER.failure)
    return module


def warn_fallback_once(reason: str) -> None:
    """The one warning per process when ``backend="auto"`` runs the reference on CPU tensors."""
    if not LOADER.warned:
        LOADER.warned = True
        warnings.warn(f"fusedoptim: {reason}; running the PyTorch reference path on CPU tensors instead "
                      "(slower). Install a C++ compiler and ninja, or pass backend='reference' to silence this.",
                      RuntimeWarning, stacklevel=3)


#: Elements per cache group of a two-pass step (csrc/multi_tensor.h, step_two_pass): pass A, finalize and pass B run
#: group after group, so that pass B finds in the cache what pass A read. Measured with ResNet-50 (2 threads, Zen 4,
#: 32 MB L3, in turns in one process), LARS ms per step at groups of 0.25 / 0.5 / 1 / 2 million elements: 15.4 /
#: 14.9 / 14.3 / 14.0 (the torch finalize between two whole passes: 18.9; fused AdamW 15.5). In two runs over all
#: five two-pass rules (csrc/README.md), 0.5-1 M were 2-16% faster than one group for each, and 2 M slower for
#: LAMB, whose pass B reads 12 B/element (24 MB at 2 M).
CACHE_GROUP_ELEMENTS = 1 << 20

#: Ring rows of at least this many elements (8 MB) are written with streaming stores (csrc/scout.cpp): k - 1 = 5 of
#: them outgrow a 32 MB L3, so a row is evicted before the sync reads it and a plain store's read of each line first
#: is traffic for nothing. Smaller rings may still be in cache at the sync: plain stores.
STREAMING_RING_ROW = 1 << 21

#: The ``phase`` of a two-pass step split in two (csrc/multi_tensor.h, Phase): pass A only, filling the sums; pass B
#: only, reading the factors.
PHASE_PASS_A, PHASE_PASS_B = 1, 2


class CpuExecutor:
    name = "cpu"

    def check_run(self, run: Run, owner: str, capturable: bool) -> None:
        """Phase 1: no grad shares memory with its param. capturable asks nothing more of a host path: nothing of
        it is captured in a CUDA graph, and its results equal a normal step's."""
        check_grads_apart(run.bucket, run.active, run.grads, owner)

    def unavailable(self, rule: Rule, device: torch.device, dtype: torch.dtype, *, build: bool = True) -> str | None:
        if rule.cpu is None:
            return "this optimizer has no C++ kernel yet"
        if device.type != "cpu":
            return f"the C++ kernels run on CPU tensors, not {device}"
        if dtype not in SUPPORTED_DTYPES:
            return f"the C++ kernels support {[str(d) for d in SUPPORTED_DTYPES]} params, not {dtype}"
        return unavailable_reason() if build else None

    warn_fallback_once = staticmethod(warn_fallback_once)

    def prepare_bucket(self, bucket: Bucket) -> None:
        pass  # params with gaps are updated through a contiguous copy

    @staticmethod
    def _staged(bucket: Bucket, indices: Sequence[int]) -> tuple[list[torch.Tensor], list[tuple[int, torch.Tensor]]]:
        """The params as the C++ loop reads them, flat in their segments' order: a dense param (contiguous,
        channels_last, ...) is a flat view of its own memory; one with gaps is a contiguous copy, also returned
        with its index to be written back."""
        staged, copies = [], []
        for i in indices:
            p = bucket.tensors[i]
            if p.is_contiguous():
                staged.append(p)
            elif bucket.in_place[i]:
                staged.append(p.as_strided((p.numel(),), (1,)))
            else:
                staged.append(p.contiguous())
                copies.append((i, staged[-1]))
        return staged, copies

    @staticmethod
    def _grads(run: Run) -> list[torch.Tensor]:
        """The grads of the tensors stepped, flat in their params' segment order (a copy when in another one)."""
        bucket = run.bucket
        if bucket.contiguous:
            return [run.grads[i].contiguous() for i in run.active]
        out = []
        for i in run.active:
            g = bucket.in_order(i, run.grads[i])
            out.append(g if g.is_contiguous() else g.as_strided((g.numel(),), (1,)))
        return out

    def step(self, run: Run) -> None:
        """One call, ``<rule.cpu>_step``, over the tensors with a gradient. A rule with per-tensor statistics runs
        pass A, its C++ finalize and pass B in it (by cache groups) and fills fp32 [segments, num_sums] sums and
        [segments, num_factors] factors (tensors, then the rows of tensors with rows: ``bucket.segments``); it
        updates ``bucket.tensor_states`` of the tensors stepped. With ``run.sync_rate`` Lookahead's sync runs
        inside the last pass on ``bucket.states["slow_param"]``.

        The call validates everything before it writes anything, so a failed step leaves params and states as they
        were. Params and grads are read flat in their segments' memory order (``_staged``, ``_grads``).
        """
        bucket, rule, active = run.bucket, run.rule, run.active
        ext = extension()
        skip, inv_grad_scale = run.host_amp()
        if skip:  # GradScaler found an inf or NaN: the step is not taken
            return
        bucket.advance_steps(active)
        staged, copies = self._staged(bucket, active)
        args = (staged, self._grads(run),
                [bucket.states[name] for name in bucket.rule_state_names], [bucket.offsets[i] for i in active],
                bucket.steps, list(active), list(run.kernel_hyper()), list(run.flags), run.maximize)
        sync = (None, None) if run.sync_rate is None else (bucket.states["slow_param"], run.sync_rate)
        kernel = getattr(ext, f"{rule.cpu}_step")
        if not rule.two_pass:
            kernel(*args, *sync, inv_grad_scale=inv_grad_scale, lr=run.lr)
        else:
            segments = bucket.segments
            rows = [segments.row_lengths[i] or 0 for i in active]
            first_row = [len(bucket.params) + segments.first_row[i] for i in active]
            sums = torch.empty(segments.num_segments, rule.num_sums, dtype=torch.float32)  # every entry is written
            factors = torch.empty(segments.num_segments, len(rule.factor_names), dtype=torch.float32)
            tables = (rows, first_row, sums, factors, list(bucket.tensor_states.values()), CACHE_GROUP_ELEMENTS)
            if bucket.sharding is None:
                kernel(*args, *tables, *sync, inv_grad_scale=inv_grad_scale, lr=run.lr)
            else:  # pass A's sums are partial: sum them over the ranks between the passes (rule.finalize_run)
                kernel(*args, *tables, None, None, PHASE_PASS_A, inv_grad_scale=inv_grad_scale, lr=run.lr)
                factors = rule.finalize_run(run, sums).to(torch.float32).contiguous()
                kernel(*args, *tables[:3], factors, *tables[4:], *sync, PHASE_PASS_B, inv_grad_scale=inv_grad_scale,
                       lr=run.lr)
        for i, copy in copies:
            bucket.tensors[i].copy_(copy)
        if rule.two_pass and bucket.sharding is None:
            self._keep_tables(run, sums, factors)

    @staticmethod
    def _keep_tables(run: Run, sums: torch.Tensor, factors: torch.Tensor) -> None:
        """Keeps the step's sums and factors for ``last_factors``. The C++ finalize wrote the factors of the
        tensors stepped; those of the others (and of their rows) are, as on the other paths, the shared
        ``finalize`` of their zero sums."""
        bucket = run.bucket
        if len(run.active) < len(bucket.params):
            segments = bucket.segments
            tensors = bucket.active_mask(run.active) > 0
            stepped = torch.cat([tensors, tensors[segments.row_tensor]])  # tensors, then each row as its tensor
            others, _ = run.rule.finalize(sums, bucket.steps, segments, tuple(bucket.tensor_states.values()),
                                          *run.hyper, *run.flags)
            factors = torch.where(stepped[:, None], factors, others)
        bucket.sums, bucket.factors = sums, factors

    def sync(self, bucket: Bucket, indices: tuple[int, ...], sync_rate: torch.Tensor) -> None:
        """The same loop as a sync fused into a step's last pass (``keep_step``: the params are passed as grads and
        never read), so the two agree bitwise."""
        if not indices:
            return
        staged, copies = self._staged(bucket, indices)
        extension().keep_step(staged, staged, [], [bucket.offsets[i] for i in indices], bucket.steps, list(indices),
                              [], [], False, bucket.states["slow_param"], sync_rate)
        for i, copy in copies:
            bucket.tensors[i].copy_(copy)

    def snapshot(self, bucket: Bucket, ring: torch.Tensor, slot: int | torch.Tensor,
                 coherence: bool) -> torch.Tensor | None:
        """Scout's ring row and coherence sums in one call over the bucket (csrc/scout.cpp), which reads a position
        tensor itself; params with gaps are read through a contiguous copy."""
        staged, _ = self._staged(bucket, tuple(range(len(bucket.params))))
        position = slot if isinstance(slot, torch.Tensor) else None
        return extension().scout_snapshot(staged, bucket.offsets, bucket.states["slow_param"], ring,
                                          -1 if position is not None else slot, coherence,
                                          *reciprocals(ring.shape[0] + 1), position=position,
                                          streaming=ring.shape[1] >= STREAMING_RING_ROW)


EXECUTOR = CpuExecutor()
