"""The Triton backend: one launch of the multi-tensor template per pass over a bucket (kernels/).

A bucket's device tables (``bucket.tables``) are a chunk table per set of tensors with a gradient (built with
torch ops, cached: it depends on nothing else, since a bucket's numels and offsets are fixed) and one pointer
table of param and grad addresses, rewritten in place with one small H2D copy when an address changes (new grads
each step under ``zero_grad(set_to_none=True)``, FSDP2's reduce-scatter outputs). The steady path's only per-tensor
Python is reading each grad's address.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ._kernels import IMPORT_ERROR, kernels
from ._layout import check_grads_apart, chunk_table_tensors
from ._rule import SYNC_PASS, KernelPass
from .scout import reciprocals

if TYPE_CHECKING:
    from ._backends import Run
    from ._layout import Bucket
    from ._rule import Rule

#: Chunk tables kept per bucket (one per set of tensors with a gradient), oldest dropped first.
MAX_CHUNK_TABLES = 16


@dataclass
class ChunkTables:
    """The device chunk table of one set of tensors."""

    packed: torch.Tensor
    sizes: kernels.TableSizes
    empty_active: torch.Tensor | None  # fp32[T] mask of the tensors listed that have no element (no program)
    partials: torch.Tensor | None = None  # pass A's [chunks, num_sums] sums, kept: a step allocates nothing
    group_sums: torch.Tensor | None = None  # the segment sum's scratch, kept likewise
    scout: tuple[torch.Tensor, torch.Tensor] | None = None  # Scout's fp64 [C, 2] partials and [T, 2] sums, kept


@dataclass
class PointerTable:
    """A device table of param and grad addresses."""

    key: tuple
    device: torch.Tensor


@dataclass
class Tables:
    """What the Triton executor keeps per bucket."""

    step_counters: torch.Tensor  # int32[T] zeros: the kernel counts each tensor's finished programs in it
    staging: dict[int, torch.Tensor]  # a contiguous copy of each param with gaps, stepped in its place
    param_ptrs: tuple[int, ...]  # what the kernels update: the params' addresses, or their staging copies'
    source_ptrs: list[int]  # the params' addresses these were made for (bucket.param_ptrs)
    chunks: dict[tuple[int, ...], ChunkTables] = field(default_factory=dict)
    step_pointers: PointerTable | None = None
    sync_pointers: PointerTable | None = None  # the sync pass reads the params in place of grads
    sums: kernels.SumTables | None = None  # what the segment sum reads of a two-pass bucket


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
        pass  # params with gaps (bucket.in_place False) are stepped in a staging copy (Tables.staging)

    @staticmethod
    def _kernel_grads(run: Run) -> list[torch.Tensor | None]:
        """The grads as the kernels read them: grads in another memory order than their param's through a copy in
        its order (grads are never written)."""
        bucket = run.bucket
        if bucket.contiguous:
            return [g if g is None or g.is_contiguous() else g.contiguous() for g in run.grads]
        return [g if g is None else bucket.in_order(i, g) for i, g in enumerate(run.grads)]

    def check_run(self, run: Run, owner: str, capturable: bool) -> None:
        """Phase 1 (nothing written yet): the grads as the kernels will read them and their addresses. When these
        moved (new grads each step under ``zero_grad(set_to_none=True)``), no grad may share memory with its param.
        capturable: after the first step (the warm-up, outside any graph, which builds the tables) the chunk table
        and grad addresses must be as they were, since a captured graph replays the copies and launches with the
        addresses it saw."""
        bucket = run.bucket
        cache: Tables | None = bucket.tables
        run.kernel_grads = self._kernel_grads(run)
        run.grad_ptrs = _addresses(run.kernel_grads, len(run.active) == len(bucket.params))
        last = None if cache is None or cache.step_pointers is None else cache.step_pointers.key[1]
        if last is None or last != run.grad_ptrs:
            # The kernels' grads are dense in their param's order (or copies): a grad overlaps its param exactly
            # when their addresses are closer than its bytes. One pass over three lists: 12 µs for 161 tensors.
            if any(-n < g - p < n for g, p, n in zip(run.grad_ptrs, bucket.param_ptrs, bucket.nbytes, strict=True)):
                check_grads_apart(bucket, run.active, run.grads, owner)  # raises, naming the param
        if not capturable or last is None:
            return
        prefix = f"{owner}(capturable=True)"
        if run.active not in cache.chunks:
            raise RuntimeError(f"{prefix}: the set of params with a gradient changed ({len(run.active)} of "
                               f"{len(bucket.params)} now): a captured step would update the old set")
        if last != run.grad_ptrs:
            moved = next(i for i, (a, b) in enumerate(zip(last, run.grad_ptrs, strict=True)) if a != b)
            raise RuntimeError(f"{prefix}: the gradient of param {moved} of shape {tuple(bucket.params[moved].shape)} "
                               "moved since the last step (a new tensor, or a copy because it is not in its param's "
                               "memory order); a captured step would read the old address. Keep grads in place: "
                               "zero_grad(set_to_none=False), or backward into static grads")

    def step(self, run: Run) -> None:
        """After ``check_run``, which read the grads as the kernels take them (``run.kernel_grads``, kept alive
        through the launches, and their addresses)."""
        bucket = run.bucket
        cache = _stage_in(bucket)
        self._step(run)
        if cache.staging:
            _stage_out(cache, bucket)

    def _step(self, run: Run) -> None:
        bucket, rule = run.bucket, run.rule
        tables = self._tables(bucket, run.active, run.grad_ptrs, "step")
        chunks = bucket.tables.chunks[run.active]
        if chunks.empty_active is not None:  # no program advances them (e.g. FSDP2's empty shards)
            taken = chunks.empty_active if run.found_inf is None else chunks.empty_active * (run.found_inf == 0)
            bucket.steps.add_(taken)
        passes = rule.kernel_passes()
        factors = None
        if rule.two_pass:
            factors = self._sum_and_finalize(run, tables, chunks)
        if tables.sizes.chunks:
            slow = None if run.sync_rate is None else bucket.states["slow_param"]
            self._launch(run, tables, passes[-1], factors=factors, slow=slow, sync_rate=run.sync_rate)

    def _sum_and_finalize(self, run: Run, tables: kernels.Tables, chunks: ChunkTables) -> torch.Tensor:
        """Pass A, then one launch that sums per segment, advances the steps and (with the rule's Triton finalize)
        computes the factors on the device: 3 launches a step with pass B. Sharded params finalize in torch after
        their sums are all-reduced, as do buckets with tensors of no element (their steps advance apart)."""
        bucket, rule = run.bucket, run.rule
        shape = (tables.sizes.segments, rule.num_sums)
        if not tables.sizes.chunks:
            return rule.finalize_run(run, torch.zeros(shape, dtype=torch.float32, device=bucket.device))
        # The segment sum writes every segment (0 for the empty ones), so the last step's sums and factors buffers
        # are reused: no fill launch, no allocation; a step GradScaler skips leaves them as they were.
        sums = self._buffer(bucket.sums, shape, run)
        if chunks.partials is None or chunks.partials.shape[1] != rule.num_sums:  # once per set: no allocation a step
            chunks.partials = torch.empty(tables.sizes.chunks, rule.num_sums, dtype=torch.float32, device=bucket.device)
        partials = chunks.partials
        self._launch(run, tables, rule.kernel_passes()[0], partials=partials)
        on_device = rule.triton_finalize is not None and bucket.sharding is None and chunks.empty_active is None
        finalize = None
        if on_device:
            factors = self._buffer(bucket.factors, (tables.sizes.segments, len(rule.factor_names)), run)
            finalize = kernels.Finalize(rule.triton_finalize, tuple(run.flags), run.kernel_hyper(),
                                        tuple(bucket.tensor_states.values()), factors, run.lr)
        if chunks.group_sums is None and tables.sizes.groups != tables.sizes.segments:
            chunks.group_sums = torch.empty(tables.sizes.groups, rule.num_sums, dtype=torch.float32,
                                            device=bucket.device)
        kernels.launch_segment_sum(partials, tables, sums, bucket.steps, self._sum_tables(bucket), finalize,
                                   run.found_inf, group_sums=chunks.group_sums)
        if not on_device:
            return rule.finalize_run(run, sums)
        bucket.sums, bucket.factors = sums, finalize.factors
        return finalize.factors

    @staticmethod
    def _buffer(last: torch.Tensor | None, shape: tuple[int, int], run: Run) -> torch.Tensor:
        """The last step's sums or factors buffer when it fits, else a new one (zeros under GradScaler, whose
        skipped step writes nothing)."""
        if last is not None and tuple(last.shape) == shape and last.is_contiguous():
            return last
        new = torch.zeros if run.found_inf is not None else torch.empty
        return new(shape, dtype=torch.float32, device=run.bucket.device)

    @staticmethod
    def _sum_tables(bucket: Bucket) -> kernels.SumTables:
        """The segment sum's per-bucket tables (built once: a bucket's tensors and rows are fixed)."""
        cache: Tables = bucket.tables
        if cache.sums is None:
            num_tensors, segments, device = len(bucket.params), bucket.segments, bucket.device
            rows = [0 if r is None else n // r for n, r in zip(bucket.numels, segments.row_lengths, strict=True)]
            row_begin = torch.tensor([num_tensors + f for f in segments.first_row], dtype=torch.int64)
            cache.sums = kernels.SumTables(
                counters=torch.zeros(segments.num_segments + num_tensors, dtype=torch.int32, device=device),
                numels=segments.numels, fan_in=segments.fan_in, row_begin=row_begin.to(device),
                row_end=(row_begin + torch.tensor(rows, dtype=torch.int64)).to(device),
                row_tensor=segments.row_tensor, failing_rows=torch.zeros(num_tensors, dtype=torch.int32, device=device))
        return cache.sums

    def sync(self, bucket: Bucket, indices: tuple[int, ...], sync_rate: torch.Tensor) -> None:
        cache = _stage_in(bucket)
        self._sync(bucket, indices, sync_rate)
        if cache.staging:
            _stage_out(cache, bucket)

    def _sync(self, bucket: Bucket, indices: tuple[int, ...], sync_rate: torch.Tensor) -> None:
        tables = self._tables(bucket, indices, bucket.tables.param_ptrs, "sync")  # grads unread: the params
        if tables.sizes.chunks:
            kernels.launch_step(SYNC_PASS.rule, (), tables, bucket.steps, bucket.tables.step_counters, (), (),
                                bucket.dtype, False,
                                store_param=SYNC_PASS.store_param, store_state=SYNC_PASS.store_state,
                                slow=bucket.states["slow_param"], sync_rate=sync_rate)

    def snapshot(self, bucket: Bucket, ring: torch.Tensor, slot: int | torch.Tensor,
                 coherence: bool) -> torch.Tensor | None:
        """Scout's ring row and coherence sums: one launch over the bucket (kernels/scout.py), which reads a position
        tensor itself. The sums buffer is the bucket's, kept between syncs (rows of tensors without elements stay 0):
        read it before the next sync."""
        cache = _stage_in(bucket)  # params with gaps are read from their staging copies
        indices = tuple(range(len(bucket.params)))
        tables = self._tables(bucket, indices, cache.param_ptrs, "sync")
        sums = None
        if coherence or isinstance(slot, torch.Tensor):
            chunks = cache.chunks[indices]
            if chunks.scout is None:
                chunks.scout = (torch.zeros(tables.sizes.chunks, 2, dtype=torch.float64, device=bucket.device),
                                torch.zeros(len(bucket.params), 2, dtype=torch.float64, device=bucket.device))
            sums = chunks.scout
        if tables.sizes.chunks:
            kernels.launch_scout_snapshot(tables, bucket.states["slow_param"], ring, slot,
                                          reciprocals(ring.shape[0] + 1), bucket.dtype, cache.step_counters, sums)
        return None if sums is None else sums[1]

    @staticmethod
    def _launch(run: Run, tables: kernels.Tables, kernel_pass: KernelPass,
                **kwargs: torch.Tensor | None) -> None:
        bucket = run.bucket
        kernels.launch_step(kernel_pass.rule, run.flags, tables, bucket.steps, bucket.tables.step_counters,
                            [bucket.states[name] for name in bucket.rule_state_names], run.kernel_hyper(), bucket.dtype,
                            run.maximize, store_param=kernel_pass.store_param,
                            store_state=kernel_pass.store_state, advance_steps=kernel_pass.advance_steps,
                            amp=None if run.found_inf is None else (run.grad_scale, run.found_inf), lr=run.lr,
                            **kwargs)

    @staticmethod
    def _tables(bucket: Bucket, active: tuple[int, ...], grad_ptrs: Sequence[int], kind: str) -> kernels.Tables:
        """The tables for these tensors and grad addresses. Alignment is the kernel's business, per chunk."""
        cache: Tables = bucket.tables
        chunks = cache.chunks.get(active)
        if chunks is None:
            row_lengths = bucket.segments.row_lengths if bucket.segments is not None else None
            table = chunk_table_tensors(bucket.numels, active, kernels.block_size(bucket.dtype), row_lengths)
            packed, sizes = kernels.pack_chunk_table(bucket.offsets, table, bucket.device)
            empty = [i for i in active if bucket.numels[i] == 0]
            chunks = ChunkTables(packed, sizes, bucket.active_mask(tuple(empty)) if empty else None)
            if len(cache.chunks) >= MAX_CHUNK_TABLES:  # bound the cache when grad sets keep changing
                cache.chunks.pop(next(iter(cache.chunks)))
            cache.chunks[active] = chunks
        key = (tuple(cache.param_ptrs), tuple(grad_ptrs))
        pointers = cache.step_pointers if kind == "step" else cache.sync_pointers
        if pointers is None or pointers.key != key:
            device = kernels.pack_pointers(cache.param_ptrs, grad_ptrs, bucket.device,
                                           out=None if pointers is None else pointers.device)
            pointers = PointerTable(key, device)
            if kind == "step":
                cache.step_pointers = pointers
            else:
                cache.sync_pointers = pointers
        return kernels.Tables(pointers.device, chunks.packed, chunks.sizes)


def _addresses(grads: list[torch.Tensor | None], all_present: bool) -> tuple[int, ...]:
    """The grads' data pointers (0 for None); map keeps the loop in C when every tensor has one (161: 4 µs)."""
    if all_present:
        return tuple(map(torch.Tensor.data_ptr, grads))
    return tuple(0 if g is None else g.data_ptr() for g in grads)


def _stage_in(bucket: Bucket) -> Tables:
    """The bucket's tables, made or refreshed when its params moved, with each param with gaps copied into its
    staging copy (a view of a larger tensor: rare, and never a channels_last or permuted param, which are
    addressed in place): two copies of that tensor a step, against a kernel that would need strides."""
    cache: Tables | None = bucket.tables
    ptrs = bucket.param_ptrs
    if cache is None or cache.source_ptrs is not ptrs:  # a new list when the params move (_base.py)
        staging = {i: torch.empty(t.shape, dtype=t.dtype, device=t.device)
                   for i, t in enumerate(bucket.tensors) if not bucket.in_place[i]}
        # a tuple: the pointer table's key takes it as it is, each step
        param_ptrs = tuple(staging[i].data_ptr() if i in staging else ptr for i, ptr in enumerate(ptrs))
        if cache is None:
            cache = bucket.tables = Tables(torch.zeros(len(bucket.params), dtype=torch.int32, device=bucket.device),
                                           staging, param_ptrs, ptrs)
        else:
            cache.staging, cache.param_ptrs, cache.source_ptrs = staging, param_ptrs, ptrs
    for i, copy in cache.staging.items():
        copy.copy_(bucket.tensors[i])
    return cache


def _stage_out(cache: Tables, bucket: Bucket) -> None:
    """The staged params written back, once the kernels ran (a step that raised leaves the params as they were)."""
    for i, copy in cache.staging.items():
        bucket.tensors[i].copy_(copy)


EXECUTOR = TritonExecutor()
