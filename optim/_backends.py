"""The backends: one executor each (``_reference.py``, ``_triton.py``, ``_cpu.py``) behind one interface.

The optimizer validates a step, picks an executor per bucket once (when the bucket is laid out), and calls it;
an executor knows how to run a rule over a bucket, and nothing about param groups or state dicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import torch

if TYPE_CHECKING:
    from ._layout import Bucket
    from ._rule import Rule

Backend = Literal["auto", "triton", "cpu", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "cpu", "reference")


class BackendUnavailable(RuntimeError):
    """The backend asked for cannot run these params here; the message says why."""


@dataclass
class Run:
    """One bucket's work in one step: the tensors with a gradient (``active``), their grads, the group's runtime
    scalars and structural flags, and Lookahead's sync rate (fp32[1] on the params' device) when the step ends
    with a sync."""

    bucket: Bucket
    rule: Rule
    active: tuple[int, ...]
    grads: list[torch.Tensor | None]
    hyper: tuple[float, ...]
    flags: tuple[bool, ...]
    maximize: bool
    sync_rate: torch.Tensor | None = None
    #: GradScaler's scale (the grads arrive multiplied by it) and found_inf (nonzero: skip the step), fp32[1] on the
    #: params' device; None without a GradScaler (``FusedOptimizer._step_supports_amp_scaling``)
    grad_scale: torch.Tensor | None = None
    found_inf: torch.Tensor | None = None
    inv_grad_scale: float | torch.Tensor = 1.0  # 1 / grad_scale: C++'s from host_amp, the reference's a 0-d tensor
    #: a tensor learning rate (the group's "lr" is a tensor) as fp32[1] on the params' device, read by the kernels;
    #: ``hyper[0]`` is then its 0-d view, for the torch code (the reference, the torch finalize). With tensor betas,
    #: every runtime scalar as fp32[H] (``FusedOptimizer._hyper_on``), ``hyper`` holding views of the tensor ones
    lr: torch.Tensor | None = None
    kernel_grads: list[torch.Tensor | None] | None = None  # the grads as the Triton kernels read them, once checked
    grad_ptrs: tuple[int, ...] | None = None  # and their addresses (0: no grad)

    def kernel_hyper(self) -> tuple[float, ...]:
        """The runtime scalars as the compiled kernels take them: floats, with placeholders for those read from
        ``lr`` on the device (fp32[1]: the lr; fp32[H]: all of them)."""
        if self.lr is None:
            return self.hyper
        if self.lr.numel() == 1:
            return (0.0, *self.hyper[1:])
        return tuple(0.0 if isinstance(h, torch.Tensor) else h for h in self.hyper)

    def host_amp(self) -> tuple[bool, float]:
        """(skip the step, the inverse scale to multiply the grads by), read on the host by the C++ executor: a CPU
        tensor's value costs no device sync. The inverse is rounded through fp64, as GradScaler's own unscale
        computes it."""
        if self.found_inf is None:
            return False, 1.0
        return bool(self.found_inf.item()), float(self.grad_scale.double().reciprocal().float())


class Executor(Protocol):
    """What every backend provides."""

    name: str

    def unavailable(self, rule: Rule, device: torch.device, dtype: torch.dtype, *, build: bool = True) -> str | None:
        """None when it can run ``rule`` on params of ``device`` and ``dtype``, else why not. ``build=False``
        answers from what is known without building anything (the C++ extension is built at the first step)."""

    def prepare_bucket(self, bucket: Bucket) -> None:
        """Check that the bucket's params suit the backend (ValueError if not), before any state is adopted."""

    def step(self, run: Run) -> None:
        """Called after ``check_run`` on the same run. Every pass of one step over the bucket, after advancing the
        steps of ``run.active`` (the rules see the new steps; the Triton kernels advance them themselves): params
        and states updated, and for a two-pass rule ``bucket.sums`` / ``bucket.factors`` and the per-tensor
        states; with ``run.sync_rate``, Lookahead's sync of the tensors stepped."""

    def sync(self, bucket: Bucket, indices: tuple[int, ...], sync_rate: torch.Tensor) -> None:
        """Lookahead's sync of the listed tensors: slow ← slow + rate·(θ − slow); θ ← slow. A negative rate (read on
        the device) is no sync: what a wrapper counting its steps there passes between syncs."""

    def snapshot(self, bucket: Bucket, ring: torch.Tensor, slot: int | torch.Tensor,
                 coherence: bool) -> torch.Tensor | None:
        """Scout: write the bucket's params into row ``slot`` (-1: none) of its ring of snapshots (flat [k - 1,
        total], laid out like the state buffers); with ``coherence``, return the fp64 [tensors, 2] coherence sums of
        the ring (optim/scout.py), on the device. One call or launch per bucket. ``slot`` may instead be the step's
        position in its period, int64[1] on the device, read there: 0 .. k - 2 is that row, k - 1 the sums (the
        params being the last snapshot), k and above nothing (a skipped step); the sums are then always returned,
        meaningful at position k - 1 only."""

    def check_run(self, run: Run, owner: str, capturable: bool) -> None:
        """Phase 1 of a step, before anything is written: raise if a grad shares memory with its param (ValueError)
        or, with ``capturable``, if the step would change what a captured graph holds (RuntimeError)."""


def executor(name: str) -> Executor:
    """The executor of backend ``name`` ("reference", "triton" or "cpu")."""
    from . import _cpu, _reference, _triton

    return {"reference": _reference.EXECUTOR, "triton": _triton.EXECUTOR, "cpu": _cpu.EXECUTOR}[name]


def select(backend: str, rule: Rule, device: torch.device, dtype: torch.dtype, owner: str, *,
           build: bool = True) -> Executor:
    """The executor that runs ``rule`` for params of ``device`` and ``dtype`` under ``backend``.

    auto: CUDA tensors run the Triton kernels; CPU tensors the C++ kernels, or the reference (one warning per
    process) when they cannot be built; what neither supports (fp64) runs the reference. A named backend that
    cannot run raises BackendUnavailable, naming ``owner`` and the reason.
    """
    if backend != "auto":
        chosen = executor(backend)
        reason = chosen.unavailable(rule, device, dtype, build=build)
        if reason is not None:
            raise BackendUnavailable(f"{owner}(backend={backend!r}) cannot run here: {reason}")
        return chosen
    triton, cpu = executor("triton"), executor("cpu")
    if device.type == "cuda" and triton.unavailable(rule, device, dtype) is None:
        return triton
    if device.type == "cpu" and cpu.unavailable(rule, device, dtype, build=False) is None:
        reason = cpu.unavailable(rule, device, dtype)
        if reason is None:
            return cpu
        cpu.warn_fallback_once(reason)
    return executor("reference")
