"""Scout's ring of snapshots and coherence sums: one launch per bucket (optim/scout.py is the reference, with the
same fp32 operations in the same order; csrc/scout.h the C++ one).

Program c covers chunk c of the bucket's chunk table (the step kernels' table). In the first k - 1 steps of a
period it writes its params into row ``slot`` of the ring (k - 1 rows); at the sync (COHERENCE, or position k - 1
read on the device) it computes each
element's ratio std(U) / max |U - mean| over the k updates U_s (slow weight to first snapshot, between snapshots,
last snapshot to the params, the k-th snapshot, never stored), and stores the chunk's fp64 ratio sum and count of
varying entries. The last program of a tensor to finish (an arrival counter, as the step kernel counts
its steps) adds its tensor's chunk partials in chunk order, so the per-tensor sums are the same in every run:
no atomics on the sums, no second launch.
"""

import triton
import triton.language as tl


@triton.jit
def _load(ptr, mask, FULL: tl.constexpr):
    if FULL:  # a full aligned block: unmasked, so that it loads 128 bits at a time
        return tl.load(ptr)
    return tl.load(ptr, mask=mask, other=0.0)


@triton.jit
def _store(ptr, value, mask, FULL: tl.constexpr):
    if FULL:
        tl.store(ptr, value)
    else:
        tl.store(ptr, value, mask=mask)


@triton.jit
def _row(ring, s, offset, ring_stride, BLOCK: tl.constexpr, FULL: tl.constexpr):
    """Row s of the ring at ``offset``, with the alignment hints of a full block (the rows are 16-aligned)."""
    at = s * ring_stride + offset
    if FULL:
        at = tl.max_contiguous(tl.multiple_of(at, 16), BLOCK)
    return ring + at


@triton.jit
def _snapshot(ring, s, offset, mask, param, ring_stride, period, BLOCK: tl.constexpr, FULL: tl.constexpr):
    """Snapshot s of the period: row s of the ring, the params for the last."""
    if s == period - 1:
        now = param
    else:
        now = _load(_row(ring, s, offset, ring_stride, BLOCK, FULL), mask, FULL)
    return now


@triton.jit
def coherence(slow, ring, offset, mask, param, ring_stride, period, inv_period, inv_period_minus_one,
              BLOCK: tl.constexpr, FULL: tl.constexpr):
    """Per element: (ratio, varies) as fp32 blocks (0 where masked off)."""
    previous = _load(slow + offset, mask, FULL)
    # the updates' sum telescopes
    mean = (param - previous) * inv_period
    deviation = tl.zeros_like(mean)
    squares = tl.zeros_like(mean)
    for s in range(period):
        now = _snapshot(ring, s, offset, mask, param, ring_stride, period, BLOCK, FULL)
        d = (now - previous) - mean
        deviation = tl.maximum(deviation, tl.abs(d))
        squares = squares + d * d  # from 0: the first square exactly, as the others start from it
        previous = now
    varies = deviation > 0.0
    # correctly rounded sqrt and division, as torch and C++ round them (tl.sqrt and `/` are approximate on GPU)
    ratio = tl.math.div_rn(tl.sqrt_rn(squares * inv_period_minus_one), tl.where(varies, deviation, 1.0))
    return tl.where(varies, ratio, 0.0), tl.where(varies, 1.0, 0.0)


@triton.jit
def _chunk(param_ptr, offset, mask, slow, ring, partials, chunk, slot, coherent, ring_stride, period, inv_period,
           inv_period_minus_one, PARAM_DTYPE: tl.constexpr, BLOCK: tl.constexpr, FULL: tl.constexpr):
    """One chunk: its params into row ``slot`` (if one of the ring's), and with ``coherent`` its partial sums."""
    param = _load(param_ptr, mask, FULL).to(tl.float32)
    if (slot >= 0) & (slot < period - 1):
        _store(_row(ring, slot, offset, ring_stride, BLOCK, FULL), param, mask, FULL)
    if coherent:
        ratio, varies = coherence(slow, ring, offset, mask, param, ring_stride, period, inv_period,
                                  inv_period_minus_one, BLOCK, FULL)
        tl.store(partials + 2 * chunk, tl.sum(ratio.to(tl.float64), axis=0))
        tl.store(partials + 2 * chunk + 1, tl.sum(varies.to(tl.float64), axis=0))


@triton.jit
def scout_snapshot_kernel(
    param_ptrs,      # int64[T]: data_ptr() of each param (PARAM_DTYPE, dense in its segment order)
    state_offsets,   # int64[T]: start of tensor t's segment in the slow weights and in every row of the ring
    chunk_tensor,    # int64[C], chunk_start, chunk_end: the step kernels' chunk table
    chunk_start,
    chunk_end,
    segment_begin,   # int64[T]: tensor t's chunks are segment_begin[t] .. segment_end[t] - 1
    segment_end,
    slow,            # fp32 flat: the slow weights
    ring,            # fp32 [k - 1, ring_stride]: the snapshots, row s taken at step s + 1 of the period
    partials,        # fp64[C, 2]: each chunk's ratio sum and count (COHERENCE)
    table,           # fp64[T, 2]: each tensor's sums, written by its last program (COHERENCE)
    counters,        # int32[T]: zeros between launches: each tensor's finished programs
    ring_stride,
    slot,            # the row the params go into (-1: none)
    position_ptr,    # int64[1] (POSITION_ON_DEVICE): the step's place in its period, read in place of slot
    period,
    inv_period,      # fp32 1/k and 1/(k-1) (optim/scout.py: reciprocals)
    inv_period_minus_one,
    PARAM_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    SUM_ROWS: tl.constexpr,  # partials the last program adds per step
    COHERENCE: tl.constexpr,
    # A wrapper counting its steps on the device: position 0 .. k - 2 snapshots into that row, k - 1 is the sync
    # (the coherence sums), anything else (a step GradScaler skipped) does nothing. Uniform branches: a step reads
    # only what its position needs.
    POSITION_ON_DEVICE: tl.constexpr = False,
):
    coherent = COHERENCE
    if POSITION_ON_DEVICE:
        slot = tl.load(position_ptr)
        if (slot < 0) | (slot >= period):
            return
        coherent = slot == period - 1
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_tensor + chunk)
    start = tl.load(chunk_start + chunk)
    end = tl.load(chunk_end + chunk)
    idx = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < end
    param_addr = tl.load(param_ptrs + tensor)
    param_ptr = param_addr.to(tl.pointer_type(PARAM_DTYPE)) + idx
    offset = tl.load(state_offsets + tensor) + idx
    # As in the step kernels: a mask keeps accesses scalar, so a full aligned block (segments and ring rows start at
    # multiples of 16 elements) takes an unmasked path with alignment hints, 128 bits at a time; the rest is masked.
    # Before (masked everywhere): 32-bit fp32 and 16-bit bf16 accesses on sm_90.
    if (start + BLOCK <= end) & (param_addr % 16 == 0) & (start % 16 == 0) & (ring_stride % 16 == 0):
        # the hints on the pointer tensor (kernels/_template.py)
        param_ptr = tl.max_contiguous(tl.multiple_of(param_ptr, 16), BLOCK)
        offset = tl.max_contiguous(tl.multiple_of(offset, 16), BLOCK)
        _chunk(param_ptr, offset, mask, slow, ring, partials, chunk, slot, coherent, ring_stride, period,
               inv_period, inv_period_minus_one, PARAM_DTYPE, BLOCK, True)
    else:
        _chunk(param_ptr, offset, mask, slow, ring, partials, chunk, slot, coherent, ring_stride, period,
               inv_period, inv_period_minus_one, PARAM_DTYPE, BLOCK, False)
    if coherent:
        first = tl.load(segment_begin + tensor)
        last_chunk = tl.load(segment_end + tensor)
        # every thread's store precedes the count (one thread's acq_rel atomic): the last program sees them all
        tl.debug_barrier()
        if tl.atomic_add(counters + tensor, 1, sem="acq_rel") == last_chunk - first - 1:
            ratio_sum = tl.zeros((SUM_ROWS,), dtype=tl.float64)
            count = tl.zeros((SUM_ROWS,), dtype=tl.float64)
            for row0 in range(first, last_chunk, SUM_ROWS):
                rows = row0 + tl.arange(0, SUM_ROWS).to(tl.int64)
                # volatile: partials other programs stored are read from L2, never from a stale L1 line
                ratio_sum += tl.load(partials + 2 * rows, mask=rows < last_chunk, other=0.0, volatile=True)
                count += tl.load(partials + 2 * rows + 1, mask=rows < last_chunk, other=0.0, volatile=True)
            tl.store(table + 2 * tensor, tl.sum(ratio_sum, axis=0))
            tl.store(table + 2 * tensor + 1, tl.sum(count, axis=0))
            tl.store(counters + tensor, 0)
