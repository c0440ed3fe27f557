"""The Triton backend: one launch of the multi-tensor template per pass over a bucket (kernels/).

A bucket's device tables (``bucket.tables``) are a chunk table per set of tensors with a gradient (built with
torch ops, cached: it depends on nothing else, since a bucket's numels and offsets are fixed) and one pointer
table of param and grad addresses, rewritten in place with one small H2D copy when an address changes (new grads
each step under ``zero_grad(set_to_none=True)``, FSDP2's reduce-scatter outputs). The steady path's only per-tensor
Python is reading each grad's address.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ._kernels import IMPORT_ERROR, kernels
from ._layout import chunk_table_tensors
from ._rule import SYNC_PASS, KernelPass

if TYPE_CHECKING:
    from ._backends import Run
    from ._layout import Bucket
    from ._rule import Rule

#: Chunk tables kept per bucket (one per set of tensors with a gradient), oldest dropped first.
MAX_CHUNK_TABLES = 16


@dataclass
class ChunkTables:
    """The device chunk table of one set of tensors, and whether every chunk start is 16-element aligned."""

    packed: torch.Tensor
    sizes: kernels.TableSizes
    starts_aligned: bool
    empty_active: torch.Tensor | None  # fp32[T] mask of the tensors listed that have no element (no program)


@dataclass
class PointerTable:
    """A device table of param and grad addresses, and the tensors whose addresses are not 16-byte aligned."""

    key: tuple
    device: torch.Tensor
    misaligned: frozenset[int]


@dataclass
class Tables:
    """What the Triton executor keeps per bucket."""

    step_counters: torch.Tensor  # int32[T] zeros: the kernel counts each tensor's finished programs in it
    chunks: dict[tuple[int, ...], ChunkTables] = field(default_factory=dict)
    step_pointers: PointerTable | None = None
    sync_pointers: PointerTable | None = None  # the sync pass reads the params in place of grads


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
        tables, aligned = self._tables(bucket, run.active, [0 if g is None else g.data_ptr() for g in grads], "step")
        chunks = bucket.tables.chunks[run.active]
        if chunks.empty_active is not None:  # no program advances them (e.g. FSDP2's empty shards)
            bucket.steps.add_(chunks.empty_active)
        passes = rule.kernel_passes()
        factors = None
        if rule.two_pass:
            shape = (tables.sizes.segments, rule.num_sums)
            if tables.sizes.chunks:  # the segment sum writes every segment (0 for the empty ones): no fill launch
                sums = torch.empty(shape, dtype=torch.float32, device=bucket.device)
                partials = torch.empty(tables.sizes.chunks, rule.num_sums, dtype=torch.float32, device=bucket.device)
                self._launch(run, tables, aligned, passes[0], partials=partials)
                kernels.launch_segment_sum(partials, tables, sums, bucket.steps)
            else:
                sums = torch.zeros(shape, dtype=torch.float32, device=bucket.device)
            factors = rule.finalize_run(run, sums)
        if tables.sizes.chunks:
            slow = None if run.sync_rate is None else bucket.states["slow_param"]
            self._launch(run, tables, aligned, passes[-1], factors=factors, slow=slow, sync_rate=run.sync_rate)

    def sync(self, bucket: Bucket, indices: tuple[int, ...], sync_rate: torch.Tensor) -> None:
        tables, aligned = self._tables(bucket, indices, bucket.param_ptrs, "sync")  # grads unread: the params
        if tables.sizes.chunks:
            kernels.launch_step(SYNC_PASS.rule, (), tables, bucket.steps, bucket.tables.step_counters, (), (),
                                bucket.dtype, False, aligned,
                                store_param=SYNC_PASS.store_param, store_state=SYNC_PASS.store_state,
                                slow=bucket.states["slow_param"], sync_rate=sync_rate)

    @staticmethod
    def _launch(run: Run, tables: kernels.Tables, aligned: bool, kernel_pass: KernelPass,
                **kwargs: torch.Tensor | None) -> None:
        bucket = run.bucket
        kernels.launch_step(kernel_pass.rule, run.flags, tables, bucket.steps, bucket.tables.step_counters,
                            [bucket.states[name] for name in bucket.rule_state_names], run.hyper, bucket.dtype,
                            run.maximize, aligned, store_param=kernel_pass.store_param,
                            store_state=kernel_pass.store_state, advance_steps=kernel_pass.advance_steps, **kwargs)

    @staticmethod
    def _tables(bucket: Bucket, active: tuple[int, ...], grad_ptrs: list[int],
                kind: str) -> tuple[kernels.Tables, bool]:
        """The tables for these tensors and grad addresses, and whether the aligned variant may run: every address
        it hints (params, grads, chunk starts) 16-byte aligned. Rows of a per-row rule start anywhere; 16 elements
        keep both fp32 state and 16-bit params aligned."""
        if bucket.tables is None:
            bucket.tables = Tables(torch.zeros(len(bucket.params), dtype=torch.int32, device=bucket.device))
        cache: Tables = bucket.tables
        chunks = cache.chunks.get(active)
        if chunks is None:
            row_lengths = bucket.segments.row_lengths if bucket.segments is not None else None
            table = chunk_table_tensors(bucket.numels, active, kernels.block_size(bucket.dtype), row_lengths)
            packed, sizes = kernels.pack_chunk_table(bucket.offsets, table, bucket.device)
            empty = [i for i in active if bucket.numels[i] == 0]
            empty_active = bucket.active_mask(tuple(empty)) if empty else None
            chunks = ChunkTables(packed, sizes, bool((table["chunk_start"] % 16 == 0).all()), empty_active)
            if len(cache.chunks) >= MAX_CHUNK_TABLES:  # bound the cache when grad sets keep changing
                cache.chunks.pop(next(iter(cache.chunks)))
            cache.chunks[active] = chunks
        key = (tuple(bucket.param_ptrs), tuple(grad_ptrs))
        pointers = cache.step_pointers if kind == "step" else cache.sync_pointers
        if pointers is None or pointers.key != key:
            device = kernels.pack_pointers(bucket.param_ptrs, grad_ptrs, bucket.device,
                                           out=None if pointers is None else pointers.device)
            misaligned = frozenset(i for i, (p, g) in enumerate(zip(*key, strict=True)) if p % 16 or g % 16)
            pointers = PointerTable(key, device, misaligned)
            if kind == "step":
                cache.step_pointers = pointers
            else:
                cache.sync_pointers = pointers
        aligned = chunks.starts_aligned and pointers.misaligned.isdisjoint(active)
        return kernels.Tables(pointers.device, chunks.packed, chunks.sizes), aligned


EXECUTOR = TritonExecutor()
