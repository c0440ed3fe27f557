"""An optimizer's update rule, declared once: its states, and its Triton, C++ and torch forms.

The three forms of a rule take the same arguments in the same order (``kernels/<name>.py``, ``csrc/<name>.h``,
``optim/<name>.py``), so one declaration names all three. Elementwise rules are one pass,
``update(param, grad, state, step, *hyper, *flags) -> (param, state)``. Rules with per-tensor statistics
(``TwoPassRule``) run pass A, ``prepare(...) -> (state, terms)``, whose terms are summed per tensor; the
``finalize`` turns the sums into per-tensor factors; pass B, ``apply(param, grad, state, step, *factors, *hyper,
*flags) -> (param, state)``, uses them (docs/design.md#two-pass-scheme).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ._kernels import kernels

if TYPE_CHECKING:
    from ._backends import Run


@dataclass(frozen=True)
class KernelPass:
    """One Triton launch of a step over a bucket: which rule, and what the template does around it."""

    rule: Any              # the @triton.jit rule function
    num_sums: int          # > 0: pass A, emitting that many per-chunk sums
    num_factors: int       # > 0: pass B, reading that many per-segment factors
    store_param: bool
    store_state: bool
    last: bool             # the step's last pass: where a Lookahead sync is fused (SYNC)
    #: the step's first pass: the rule sees the steps + 1 of the tensors it covers; 2: it stores them (one pass), 1:
    #: the segment sum does (pass A, which then needs no atomic)
    advance_steps: int = 0


@dataclass(frozen=True, kw_only=True)
class Rule:
    """An elementwise rule (one pass per step).

    Attributes:
        cpu: the C++ rule, ``csrc/<cpu>.h``, run by the extension's ``<cpu>_step``; None when there is none.
        states: the flat state buffers every param group has, in the rule's argument order.
        optional_states: (state, group key) pairs: the state follows the others when ``group[key]`` is truthy
            (amsgrad's ``max_exp_avg_sq``, LARS's ``momentum_buffer``).
        param_dtype_states: states kept in the param dtype instead of fp32: copies of the gradient (Adan's
            ``prev_grad``), which that dtype holds exactly (2 B/param less to move for 16-bit params).
        reference: the torch form, one function per pass.
        triton: the ``@triton.jit`` form, one function per pass; None where triton is not importable.
    """

    two_pass: ClassVar[bool] = False

    cpu: str | None
    states: tuple[str, ...] = ()
    optional_states: tuple[tuple[str, str], ...] = ()
    param_dtype_states: tuple[str, ...] = ()
    reference: tuple[Callable[..., Any], ...]
    triton: tuple[Any, ...] | None

    def state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The state buffers of a param group, in the rule's argument order."""
        return self.states + tuple(name for name, key in self.optional_states if group[key])

    def state_dtype(self, name: str, param_dtype: torch.dtype) -> torch.dtype:
        """fp32 (fp64 for fp64 params), or the param dtype for the ``param_dtype_states``."""
        return param_dtype if name in self.param_dtype_states else torch.promote_types(param_dtype, torch.float32)

    def kernel_passes(self) -> tuple[KernelPass, ...]:
        """The multi-tensor launches of one step per bucket, in order. The Triton path launches exactly these; the
        compiled-code checks (benchmarks/compiled.py) compile exactly these."""
        if self.triton is None:
            return ()
        return (KernelPass(self.triton[-1], 0, 0, True, True, True, advance_steps=2),)


@dataclass(frozen=True, kw_only=True)
class TwoPassRule(Rule):
    """A rule with per-tensor statistics: pass A, a deterministic per-tensor sum, ``finalize``, pass B.

    Attributes:
        num_sums: the terms pass A emits per element, summed per segment into fp32 ``[segments, num_sums]``.
        finalize: ``(sums, steps, segments, tensor_states, *hyper, *flags) -> (factors, tensor_states)`` in torch,
            shared by the Triton and reference paths (the C++ step runs its copy in csrc/<cpu>.h, tested against
            it); never calls ``.item()``.
        factor_names: the columns of the ``[segments, len(factor_names)]`` factors pass B reads.
        tensor_states: per-tensor scalar states that finalize updates (TAdam's ``W_t``).
        prepare_writes_state, apply_writes_state: which pass stores the states.
        row_statistics: params with ndim > 1 also get one segment per row (AdamP's channel view).
        triton_finalize: the finalize in Triton (``kernels/<name>.py``), run by the segment sum on the device, and for
            rules with row statistics its row test and row factors; the torch ``finalize`` stays the reference and
            runs for sharded params (their sums are all-reduced first) and tensors without elements.
        shard_terms: for a rule whose finalize also needs per-tensor figures of its local row sums (AdamP: how many
            rows fail the channel test), ``(sums, segments, *hyper, *flags) -> fp32[T]``: on sharded params they are
            summed over the ranks with the tensors' sums (one all-reduce) and passed to finalize as
            ``shard_terms=``; unsharded, finalize computes them itself.
    """

    two_pass: ClassVar[bool] = True

    num_sums: int
    finalize: Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, ...]]]
    factor_names: tuple[str, ...]
    tensor_states: tuple[str, ...] = ()
    prepare_writes_state: bool = True
    apply_writes_state: bool = False
    row_statistics: bool = False
    shard_terms: Callable[..., torch.Tensor] | None = None
    triton_finalize: tuple[Any, ...] | None = None

    def kernel_passes(self) -> tuple[KernelPass, ...]:
        if self.triton is None:
            return ()
        prepare, apply = self.triton
        return (KernelPass(prepare, self.num_sums, 0, False, self.prepare_writes_state, False, advance_steps=1),
                KernelPass(apply, 0, len(self.factor_names), True, self.apply_writes_state, True))

    def finalize_run(self, run: Run, sums: torch.Tensor) -> torch.Tensor:
        """Pass A's [segments, num_sums] sums -> pass B's factors, with the shared ``finalize`` (the Triton and
        reference paths); updates the per-tensor states of the tensors stepped and keeps sums and factors on the
        bucket (``last_factors``)."""
        bucket = run.bucket
        extra = self.sum_over_shards(run, sums) if bucket.sharding is not None else {}
        factors, tensor_states = self.finalize(sums, bucket.steps, bucket.segments,
                                               tuple(bucket.tensor_states.values()), *run.hyper, *run.flags, **extra)
        all_active = len(run.active) == len(bucket.params)
        skipped = None if run.found_inf is None else run.found_inf > 0  # GradScaler's skip, on the device
        for old, new in zip(bucket.tensor_states.values(), tensor_states, strict=True):
            new = new if all_active else torch.where(bucket.active_mask(run.active) > 0, new, old)
            old.copy_(new if skipped is None else torch.where(skipped, old, new))
        if skipped is not None and bucket.factors is not None and bucket.factors.shape == factors.shape:
            sums, factors = torch.where(skipped, bucket.sums, sums), torch.where(skipped, bucket.factors, factors)
        bucket.sums, bucket.factors = sums, factors
        return factors


    def sum_over_shards(self, run: Run, sums: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sharded params (optim/_distributed.py): the tensors' rows of ``sums`` (the first T, contiguous) hold
        partial sums over the local shards; add them up over the ranks in place, with one all-reduce. Row
        segments stay local (rows are whole under Shard(0)). Returns what finalize takes besides."""
        bucket = run.bucket
        num_tensors = len(bucket.params)
        if self.shard_terms is None:
            bucket.sharding.all_reduce(sums[:num_tensors])
            return {}
        terms = self.shard_terms(sums, bucket.segments, *run.hyper, *run.flags)
        packed = torch.cat([sums[:num_tensors], terms[:, None].to(sums.dtype)], 1)
        bucket.sharding.all_reduce(packed)
        sums[:num_tensors] = packed[:, :-1]
        return {"shard_terms": packed[:, -1]}


def keep(param, grad, state, step):
    """Lookahead's sync on its own: the step keeps the param, and the template's SYNC does the work."""
    return param, state


#: The rule of the slow weights of a wrapper whose base is not a fusedoptim optimizer: it never steps, it syncs.
SYNC_RULE = Rule(cpu="keep", reference=(keep,), triton=None if kernels is None else (kernels.lookahead.keep,))

#: Lookahead's standalone sync (params without a gradient, and bases that are not fusedoptim optimizers): the
#: template's SYNC around ``keep``. It reads no optimizer state, so it is launched with none: one specialisation
#: for every base.
SYNC_PASS = None if kernels is None else KernelPass(kernels.lookahead.keep, 0, 0, True, False, True)
