"""The Triton backend: one launch of the multi-tensor template per pass over a bucket (kernels/).

A bucket's device tables (addresses, segment offsets, chunk table; ``kernels.pack_tables``) are rebuilt only
when a pointer or the set of tensors with a gradient changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ._kernels import IMPORT_ERROR, kernels
from ._layout import chunk_table
from ._rule import SYNC_PASS, KernelPass

if TYPE_CHECKING:
    from ._backends import Run
    from ._layout import Bucket
    from ._rule import Rule


@dataclass
class Tables:
    """A bucket's device tables for one set of tensors and addresses."""

    key: tuple
    packed: torch.Tensor
    sizes: kernels.TableSizes
    aligned: bool  # every address the aligned variant hints is 16-byte aligned


class TritonExecutor:
    name = "triton"

    def unavailable(self, rule: Rule, device: torch.device, dtype: torch.dtype, *, build: bool = True) -> str | None:
        if kernels is None:
            return IMPORT_ERROR
        reason = kernels.device_ok(device)
        if reason is None and dtype not in kernels.SUPPORTED_DTYPES:
            reason = f"the Triton kernels support {[str(d) for d in kernels.SUPPORTED_DTYPES]} params, not {dtype}"
        return reason

    def prepare_bucket(self, bucket: Bucket) -> None:
        for p in bucket.tensors:
            if not p.is_contiguous():
                raise ValueError("the Triton backend needs contiguous params (the kernel addresses them through "
                                 f"their data pointer); got one of shape {tuple(p.shape)} with strides {p.stride()}. "
                                 "Pass a contiguous tensor or use backend='reference'")

    def step(self, run: Run) -> None:
        bucket, rule = run.bucket, run.rule
        # Non-contiguous grads are read through a contiguous copy (grads are never written).
        grads = [g if g is None or g.is_contiguous() else g.contiguous() for g in run.grads]
        tables = self._tables(bucket, run.active, grads)
        passes = rule.kernel_passes()
        factors = None
        if rule.two_pass:
            sums = torch.zeros(tables.sizes.segments, rule.num_sums, dtype=torch.float32, device=bucket.device)
            if tables.sizes.chunks:
                partials = torch.empty(tables.sizes.chunks, rule.num_sums, dtype=torch.float32, device=bucket.device)
                self._launch(run, tables, passes[0], partials=partials)
                kernels.launch_segment_sum(partials, tables.packed, tables.sizes, sums)
            factors = rule.finalize_run(run, sums)
        if tables.sizes.chunks:
            slow = None if run.sync_rate is None else bucket.states["slow_param"]
            self._launch(run, tables, passes[-1], factors=factors, slow=slow, sync_rate=run.sync_rate)

    def sync(self, bucket: Bucket, indices: tuple[int, ...], sync_rate: torch.Tensor) -> None:
        tables = self._tables(bucket, indices, list(bucket.tensors))  # grads unread: the params' addresses
        if tables.sizes.chunks:
            kernels.launch_step(SYNC_PASS.rule, (), tables.packed, tables.sizes, bucket.steps, (), (), bucket.dtype,
                                False, tables.aligned, store_param=SYNC_PASS.store_param,
                                store_state=SYNC_PASS.store_state, slow=bucket.states["slow_param"],
                                sync_rate=sync_rate)

    @staticmethod
    def _launch(run: Run, tables: Tables, kernel_pass: KernelPass, **kwargs: torch.Tensor | None) -> None:
        bucket = run.bucket
        kernels.launch_step(kernel_pass.rule, run.flags, tables.packed, tables.sizes, bucket.steps,
                            [bucket.states[name] for name in bucket.rule_state_names], run.hyper, bucket.dtype,
                            run.maximize, tables.aligned, store_param=kernel_pass.store_param,
                            store_state=kernel_pass.store_state, **kwargs)

    @staticmethod
    def _tables(bucket: Bucket, active: tuple[int, ...], grads: list[torch.Tensor | None]) -> Tables:
        """The bucket's tables for these tensors and grads: the cached ones when no pointer changed."""
        grad_ptrs = [0 if g is None else g.data_ptr() for g in grads]
        key = (active, tuple(bucket.param_ptrs), tuple(grad_ptrs))
        if bucket.tables is not None and bucket.tables.key == key:
            return bucket.tables
        row_lengths = bucket.segments.row_lengths if bucket.segments is not None else None
        chunks = chunk_table(bucket.numels, active, kernels.block_size(bucket.dtype), row_lengths)
        packed, sizes = kernels.pack_tables(bucket.param_ptrs, grad_ptrs, bucket.offsets, chunks, bucket.device)
        # 16-byte alignment of every address the aligned variant hints: params, grads, and chunk starts (rows of a
        # per-row rule start anywhere; 16 elements keep both fp32 state and 16-bit params aligned).
        aligned = (all(ptr % 16 == 0 for i in active for ptr in (bucket.param_ptrs[i], grad_ptrs[i]))
                   and all(start % 16 == 0 for start in chunks.chunk_start))
        bucket.tables = Tables(key, packed, sizes, aligned)
        return bucket.tables


EXECUTOR = TritonExecutor()
