"""Launcher: grid, block size per backend, alignment variant, device guard, launch counting."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._template import multi_tensor_step_kernel, segment_sum_kernel
from .scout import scout_snapshot_kernel

#: True when this process runs Triton kernels through the CPU interpreter (TRITON_INTERPRET=1 was set
#: before triton was imported). Decided once, at decoration time, by Triton itself.
INTERPRETED: bool = not isinstance(multi_tensor_step_kernel, triton.runtime.JITFunction)

# Elements per program. Compiled: 4 warps, each thread one 128-bit vector of params: 512 fp32 or 1024 bf16 / fp16
# elements. The registers a thread needs grow with its elements times the arrays the rule streams (sm_90, 4 warps,
# measured by benchmarks/compiled.py): Adan (θ, g and 4 fp32 states) at 8 fp32 elements per thread takes 80
# registers (37% occupancy) and 64 with an empty rule; at 4 it takes <= 64 (50%). Fewer than 8 bf16 elements
# per thread would make the param and grad loads narrower than 128 bits. An Adam-like rule at 2048 elements takes
# 64 registers, at 4096 123 (25% occupancy). The interpreter pays ~10 ms of Python per program for this template
# and ~0.15 µs per element, so it wants larger blocks, but not so large that tiny tensors pay for a mostly masked
# block. Measured on the Adan parity test (6 steps): 200 tensors of <= 40 elements 13.8 / 16.5 / 21.1 s and 7
# ragged tensors up to 4097 elements 3.0 / 2.2 / 3.4 s at BLOCK 1024 / 4096 / 16384.
BLOCK_COMPILED = {torch.float32: 512, torch.bfloat16: 1024, torch.float16: 1024}
NUM_WARPS = 4
BLOCK_INTERPRETED = 4096
# Compiler options of the step kernel. sched4reg: LLVM schedules for register pressure. Without it every load of a
# block is hoisted first and 16-bit params (8 elements per thread) need more registers than 50% occupancy allows
# (sm_90, 4 warps): AdaBelief bf16 with a fused sync 76 -> 61 registers, AdEMAMix bf16 72 -> 64, fp32 kernels
# unchanged or lower (benchmarks/compiled.py).
STEP_COMPILE_OPTIONS = {"num_warps": NUM_WARPS, "sched4reg": True}

#: Kernel launches by kernel name; tests read it to check launches per step.
LAUNCH_COUNTS: Counter[str] = Counter()

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

SUPPORTED_DTYPES = tuple(_TL_DTYPES)


def block_size(param_dtype: torch.dtype) -> int:
    """Elements per program of the step kernel for params of ``param_dtype``."""
    return BLOCK_INTERPRETED if INTERPRETED else BLOCK_COMPILED[param_dtype]


def device_ok(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else the reason they cannot."""
    if INTERPRETED:
        return None if device.type == "cpu" else f"the Triton interpreter runs on CPU tensors, not {device}"
    if device.type != "cuda":
        return (f"Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 before importing "
                "triton to run them on CPU through the interpreter")
    return None


def launch_step(
    rule: triton.JITFunction,
    flags: tuple,
    tables: Tables,
    steps: torch.Tensor,
    step_counters: torch.Tensor,
    states: Sequence[torch.Tensor],
    hyper: tuple[float, ...],
    param_dtype: torch.dtype,
    maximize: bool,
    *,
    partials: torch.Tensor | None = None,
    factors: torch.Tensor | None = None,
    store_param: bool = True,
    store_state: bool = True,
    slow: torch.Tensor | None = None,
    sync_rate: torch.Tensor | None = None,
    advance_steps: int = 0,
    amp: tuple[torch.Tensor, torch.Tensor] | None = None,
    lr: torch.Tensor | None = None,
) -> None:
    """One launch of the multi-tensor template over a bucket.

    ``tables``: the bucket's pointer table and the chunk table of the tensors stepped (``Tables``). With
    ``partials`` ([C, K]) this is pass A of a rule with per-tensor statistics, with ``factors`` ([S, F]) pass B;
    with ``slow`` and ``sync_rate`` (fp32[1] on the device) it also performs Lookahead's sync. With
    ``advance_steps`` (a step's first pass) the rule sees the steps of the tensors it covers plus 1, and with 2
    the kernel stores them (with 1 the segment sum does); ``step_counters`` (int32[T] zeros, the bucket's) is
    where it counts their finished programs. With ``amp``, (GradScaler's scale, found_inf), both fp32[1] on the
    device: the grads are unscaled as they are read, and a nonzero found_inf skips the launch's work. With ``lr``
    (fp32[1] on the device) the kernel reads the learning rate there instead of ``hyper[0]``.
    """
    check_devices(steps.device, tables=tables[:2], step_counters=step_counters, states=states, partials=partials,
                  factors=factors, slow=slow, sync_rate=sync_rate, amp=amp, lr=lr)
    (param_ptrs, grad_ptrs, state_offsets, segment_begin, segment_end, chunk_tensor, chunk_start, chunk_end,
     chunk_segment) = split_tables(tables)[:9]
    options = step_options(rule, flags, param_dtype, maximize,
                           num_sums=0 if partials is None else partials.shape[1],
                           num_factors=0 if factors is None else factors.shape[1],
                           store_param=store_param, store_state=store_state, sync=slow is not None,
                           advance_steps=advance_steps, amp=amp is not None, lr_tensor=lr_mode(lr))
    grad_scale, found_inf = (steps, steps) if amp is None else amp
    # Triton launches on the *current* CUDA device, which need not be the bucket's.
    guard = torch.cuda.device(steps.device) if steps.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        multi_tensor_step_kernel[(tables.sizes.chunks,)](
            param_ptrs, grad_ptrs, state_offsets, steps, chunk_tensor, chunk_start, chunk_end, chunk_segment,
            tuple(states), tuple(hyper), steps if partials is None else partials,
            steps if factors is None else factors, steps if slow is None else slow,
            steps if sync_rate is None else sync_rate, segment_begin, segment_end, step_counters, grad_scale,
            found_inf, steps if lr is None else lr, **options)
    LAUNCH_COUNTS["multi_tensor_step_kernel"] += 1


def lr_mode(lr: torch.Tensor | None) -> int:
    """The kernels' LR_TENSOR for ``lr``: 0 none, 1 the learning rate (fp32[1]), 2 every runtime scalar (fp32[H],
    tensor betas). The size is host metadata: no read."""
    return 0 if lr is None else 1 if lr.numel() == 1 else 2


def check_devices(device: torch.device, **tensors: torch.Tensor | Sequence[torch.Tensor] | None) -> None:
    """Every tensor a kernel reads through a pointer must live on the params' device: a host pointer passed to a
    CUDA kernel is an illegal address (Triton refuses it at launch; a raw pointer in a table would not be)."""
    for name, value in tensors.items():
        for t in (value,) if isinstance(value, torch.Tensor) else value or ():
            if t.device != device:
                raise ValueError(f"fusedoptim launcher: {name} is on {t.device}, the params on {device}")


def step_options(rule: triton.JITFunction, flags: tuple, param_dtype: torch.dtype, maximize: bool, *,
                 num_sums: int = 0, num_factors: int = 0, store_param: bool = True, store_state: bool = True,
                 sync: bool = False, advance_steps: int = 0, amp: bool = False, lr_tensor: int = 0) -> dict:
    """The compile-time arguments of one ``multi_tensor_step_kernel`` launch (its constexprs and compiler options):
    together with ``step_signature`` they name the specialisation that runs. The compiled-code checks
    (``benchmarks/compiled.py``) build what they compile from these two functions, so they check what is launched.
    """
    return dict(RULE=rule, FLAGS=tuple(flags), PARAM_DTYPE=_TL_DTYPES[param_dtype], MAXIMIZE=maximize,
                BLOCK=block_size(param_dtype), NUM_SUMS=num_sums, NUM_FACTORS=num_factors,
                STORE_PARAM=store_param, STORE_STATE=store_state, SYNC=sync, ADVANCE_STEPS=advance_steps, AMP=amp,
                LR_TENSOR=lr_tensor, **STEP_COMPILE_OPTIONS)


def step_signature(num_states: int, num_hyper: int,
                   state_types: tuple[str, ...] | None = None) -> dict[str, str | tuple[str, ...]]:
    """Triton's types of the runtime arguments of ``multi_tensor_step_kernel`` as ``launch_step`` passes them:
    the tables are int64, steps / partials / factors / slow / sync rate fp32 (``steps`` stands in for the
    unused ones), states pointers of ``state_types`` (default all fp32, e.g. ``("fp32", "bf16")``),
    hyperparameters fp32 scalars."""
    state_types = ("fp32",) * num_states if state_types is None else state_types
    signature: dict[str, str | tuple[str, ...]] = {name: "*i64" for name in (
        "param_ptrs", "grad_ptrs", "state_offsets", "chunk_tensor", "chunk_start", "chunk_end", "chunk_segment",
        "segment_begin", "segment_end")}
    signature.update(steps="*fp32", step_counters="*i32", partials="*fp32", factors="*fp32", slow="*fp32",
                     sync_rate_ptr="*fp32", grad_scale="*fp32", found_inf="*fp32", lr_ptr="*fp32",
                     state_ptrs=tuple(f"*{t}" for t in state_types), hyper=("fp32",) * num_hyper)
    return signature


#: The segment sum's shape. Compiled: ROWS partial rows per step (4 warps, a [128, 4] fp32 tile: 4 per thread);
#: a segment of more than GROUP chunks (512 K fp32 elements) is added by several programs, so the longest serial
#: chain is GROUP / ROWS + groups / ROWS steps: 8 + 1 for GPT-2's embedding (75 k chunks), 4,712 in one program.
#: Interpreted: one chunk per group, two rows per step, so that the small tensors of the tests take every path.
SUM_ROWS = 2 if INTERPRETED else 128
SUM_GROUP_COMPILED = 1024
SUM_GROUP = 1 if INTERPRETED else SUM_GROUP_COMPILED
#: Rows whose factors a rule with row statistics writes per step (AdamP; 4 interpreted, so the tests' rows loop).
SUM_ROW_FACTORS = 4 if INTERPRETED else 128


def segment_sum_options(num_sums: int, finalize: tuple = (), flags: tuple = (), num_factors: int = 0,
                        amp: bool = False, lr_tensor: int = 0) -> dict:
    """The compile-time arguments of one ``segment_sum_kernel`` launch (see ``step_options``); ``finalize``: the
    rule's Triton finalize, and for rules with row statistics its row test and row factors (empty: none)."""
    finalize = tuple(finalize) + (None,) * (3 - len(finalize))
    return dict(NUM_SUMS=num_sums, SUMS_POW2=triton.next_power_of_2(num_sums), ROWS=SUM_ROWS, GROUP=SUM_GROUP,
                FINALIZE=finalize[0], ROW_TEST=finalize[1], ROW_FACTORS=finalize[2], FLAGS=tuple(flags),
                NUM_FACTORS=num_factors, ROWS_STEP=SUM_ROW_FACTORS, AMP=amp, LR_TENSOR=lr_tensor, num_warps=4)


def segment_sum_signature(num_tensor_states: int = 0, num_hyper: int = 0) -> dict[str, str | tuple[str, ...]]:
    """Triton's types of ``segment_sum_kernel``'s runtime arguments as ``launch_segment_sum`` passes them."""
    signature: dict[str, str | tuple[str, ...]] = {name: "*i64" for name in (
        "segment_begin", "segment_end", "group_segment", "segment_group", "row_begin", "row_end", "row_tensor")}
    signature.update({name: "*fp32" for name in ("partials", "group_sums", "sums", "steps", "factors", "numels",
                                                 "fan_in")})
    signature.update(counters="*i32", failing_rows="*i32", found_inf="*fp32", lr_ptr="*fp32",
                     tensor_states=("*fp32",) * num_tensor_states,
                     hyper=("fp32",) * num_hyper, num_tensors="i32", num_segments="i32")
    return signature


class Finalize(NamedTuple):
    """What the segment sum needs to run a rule's finalize on the device (``segment_sum_kernel``): the rule's
    Triton finalize (and row test and row factors), its flags, hyperparameters and per-tensor states, and the
    output factors ([S, F])."""

    functions: tuple
    flags: tuple
    hyper: tuple[float, ...]
    tensor_states: tuple[torch.Tensor, ...]
    factors: torch.Tensor
    lr: torch.Tensor | None = None  # fp32[1] on the device: read in place of hyper[0]; fp32[H]: of every one


class SumTables(NamedTuple):
    """Per bucket, on the params' device: the arrival counters (int32[S + T] zeros), the tensors' numels and row
    lengths (fp32[T]), their row segments (int64[T] begin and end, int64[R] the tensor of each row) and the failing
    row counts (int32[T] zeros). The kernel leaves the zeros as it found them."""

    counters: torch.Tensor
    numels: torch.Tensor
    fan_in: torch.Tensor
    row_begin: torch.Tensor
    row_end: torch.Tensor
    row_tensor: torch.Tensor
    failing_rows: torch.Tensor


def launch_segment_sum(partials: torch.Tensor, tables: Tables, sums: torch.Tensor, steps: torch.Tensor,
                       sum_tables: SumTables, finalize: Finalize | None = None,
                       found_inf: torch.Tensor | None = None, group_sums: torch.Tensor | None = None) -> None:
    """sums[s, k] = the partials of segment s's chunks, added in a fixed order; the steps of the tensors pass A
    covered advance by 1; with ``finalize``, the factors of every segment and the per-tensor states of the covered
    tensors, in the same launch. A nonzero ``found_inf`` (fp32[1], GradScaler's) stores nothing."""
    tensors = [partials, steps, *sum_tables] + ([] if finalize is None else [finalize.factors,
                                                                             *finalize.tensor_states])
    tensors += [] if found_inf is None else [found_inf]
    tensors += [] if finalize is None or finalize.lr is None else [finalize.lr]
    check_devices(sums.device, tables=tables.chunks, tensors=tensors)
    segment_begin, segment_end, *_, segment_group, group_segment = split_tables(tables)[3:]
    # one group per segment: no group sums are stored, and partials stands in for them; ``group_sums``: the
    # caller's [groups, num_sums] scratch, kept between steps (else one is allocated)
    if tables.sizes.groups == tables.sizes.segments:
        group_sums = partials
    elif group_sums is None:
        group_sums = torch.empty(tables.sizes.groups, partials.shape[1], dtype=torch.float32, device=sums.device)
    amp = found_inf is not None
    lr = None if finalize is None else finalize.lr
    if finalize is None:
        options = segment_sum_options(partials.shape[1], amp=amp)
        factors, tensor_states, hyper = sums, (), ()
    else:
        options = segment_sum_options(partials.shape[1], finalize.functions, finalize.flags,
                                      finalize.factors.shape[1], amp=amp, lr_tensor=lr_mode(lr))
        factors, tensor_states, hyper = finalize.factors, finalize.tensor_states, finalize.hyper
    guard = torch.cuda.device(sums.device) if sums.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        segment_sum_kernel[(tables.sizes.groups,)](
            partials, segment_begin, segment_end, group_segment, segment_group, group_sums, sums, steps,
            sum_tables.counters, factors, tuple(tensor_states), sum_tables.numels, sum_tables.fan_in,
            sum_tables.row_begin, sum_tables.row_end, sum_tables.row_tensor, sum_tables.failing_rows,
            sums if found_inf is None else found_inf, tuple(hyper), sums if lr is None else lr, tables.sizes.tensors,
            tables.sizes.segments, **options)
    LAUNCH_COUNTS["segment_sum_kernel"] += 1


def launch_scout_snapshot(tables: Tables, slow: torch.Tensor, ring: torch.Tensor, slot: int | torch.Tensor,
                          period_inverses: tuple[float, float], param_dtype: torch.dtype, counters: torch.Tensor,
                          coherence: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """One launch over a bucket (kernels/scout.py): its params into row ``slot`` of Scout's ring (fp32 [k - 1, total];
    -1: none) and, with ``coherence`` = (partials fp64[C, 2], table fp64[T, 2]), each tensor's coherence sums, the
    params as the last snapshot, into the table (rows of tensors without elements are not written). ``counters``:
    int32[T] zeros, left as found. ``slot`` may be the step's position in its period, int64[1] on the device (0 ..
    k - 2: that row, k - 1: the coherence sums, which then need ``coherence``; else nothing)."""
    partials, table = (ring, ring) if coherence is None else coherence
    on_device = isinstance(slot, torch.Tensor)
    check_devices(ring.device, tables=tables[:2], slow=slow, counters=counters, partials=partials, table=table,
                  position=slot if on_device else None)
    param_ptrs, _, state_offsets, segment_begin, segment_end, chunk_tensor, chunk_start, chunk_end = (
        split_tables(tables)[:8])
    guard = torch.cuda.device(ring.device) if ring.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        scout_snapshot_kernel[(tables.sizes.chunks,)](
            param_ptrs, state_offsets, chunk_tensor, chunk_start, chunk_end, segment_begin, segment_end, slow, ring,
            partials, table, counters, ring.shape[1], -1 if on_device else slot, slot if on_device else counters,
            ring.shape[0] + 1, *period_inverses,
            **scout_snapshot_options(param_dtype, coherence is not None and not on_device, on_device))
    LAUNCH_COUNTS["scout_snapshot_kernel"] += 1


def scout_snapshot_options(param_dtype: torch.dtype, coherence: bool, position_on_device: bool) -> dict:
    """The compile-time arguments of one ``scout_snapshot_kernel`` launch (see ``step_options``)."""
    return dict(PARAM_DTYPE=_TL_DTYPES[param_dtype], BLOCK=block_size(param_dtype), SUM_ROWS=SUM_ROWS,
                COHERENCE=coherence, POSITION_ON_DEVICE=position_on_device, num_warps=NUM_WARPS)


def scout_snapshot_signature(coherence: bool, position_on_device: bool) -> dict[str, str]:
    """Triton's types of ``scout_snapshot_kernel``'s runtime arguments as ``launch_scout_snapshot`` passes them:
    without the sums, the ring stands in for their buffers and the counters for the position. The ring's row length
    and the slot are int32 below 2**31 elements (Triton's JIT types an int by its value)."""
    signature = {name: "*i64" for name in ("param_ptrs", "state_offsets", "chunk_tensor", "chunk_start", "chunk_end",
                                           "segment_begin", "segment_end")}
    sums = "*fp64" if coherence or position_on_device else "*fp32"
    signature.update(slow="*fp32", ring="*fp32", partials=sums, table=sums, counters="*i32", ring_stride="i32",
                     slot="i32", position_ptr="*i64" if position_on_device else "*i32", period="i32",
                     inv_period="fp32", inv_period_minus_one="fp32")
    return signature


class TableSizes(NamedTuple):
    """The lengths of a chunk table's parts: per tensor, per segment and per chunk."""

    tensors: int
    segments: int
    chunks: int
    groups: int  # the segment sum's programs


class Tables(NamedTuple):
    """What a launch reads of a bucket's tables, on the params' device: ``pointers`` (``pack_pointers``) and
    ``chunks`` (``pack_chunk_table``)."""

    pointers: torch.Tensor
    chunks: torch.Tensor
    sizes: TableSizes


def _even(n: int) -> int:
    """Each part of a table starts at a multiple of 2 int64 (16 bytes): Triton specialises a pointer argument on
    its 16-byte alignment, so an odd count would change the next part's alignment and compile another kernel."""
    return n + (n & 1)


def _to_device(host: torch.Tensor, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
    if device.type == "cuda":  # one async H2D copy; the pinned block is recycled safely by torch
        host = host.pin_memory()
    if out is not None:
        return out.copy_(host, non_blocking=True)
    return host.to(device, non_blocking=True)


def pack_pointers(param_ptrs: Sequence[int], grad_ptrs: Sequence[int], device: torch.device,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The pointer table: param_ptrs then grad_ptrs (T each, each part padded to even), one int64 tensor on
    ``device``, written into ``out`` in place when given (one small H2D copy when only grads moved)."""
    pad = [0] * (_even(len(param_ptrs)) - len(param_ptrs))
    return _to_device(torch.tensor(list(param_ptrs) + pad + list(grad_ptrs) + pad, dtype=torch.int64), device, out)


#: The parts of a chunk table, in order: per tensor, per segment (2), per chunk (4), per segment and per group of
#: the segment sum (``sum_groups``).
CHUNK_TABLE_PARTS = ("state_offsets", "segment_begin", "segment_end", "chunk_tensor", "chunk_start", "chunk_end",
                     "chunk_segment", "segment_group", "group_segment")


def sum_groups(segment_begin: torch.Tensor, segment_end: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """The segment sum's programs: segment s (chunks segment_begin[s] .. segment_end[s] - 1) is added by
    max(1, ceil(chunks / group)) consecutive programs from segment_group[s]; group_segment[g] is program g's
    segment. Fixed torch ops, whatever the number of segments."""
    groups = (-(-(segment_end - segment_begin) // group)).clamp(min=1)
    return dict(segment_group=torch.cumsum(groups, 0) - groups,
                group_segment=torch.repeat_interleave(torch.arange(len(groups)), groups))


def pack_chunk_table(state_offsets: Sequence[int], chunks: dict[str, torch.Tensor],
                     device: torch.device) -> tuple[torch.Tensor, TableSizes]:
    """One int64 tensor on ``device`` holding CHUNK_TABLE_PARTS in order, each padded to even, from
    ``state_offsets`` and the int64 CPU tensors of ``fusedoptim._layout.chunk_table_tensors``; ``split_tables``
    gives the views back. One H2D copy."""
    chunks = {**chunks, **sum_groups(chunks["segment_begin"], chunks["segment_end"], SUM_GROUP)}
    parts = [torch.tensor(list(state_offsets), dtype=torch.int64)] + [chunks[name] for name in CHUNK_TABLE_PARTS[1:]]
    padded = [torch.nn.functional.pad(part, (0, _even(len(part)) - len(part))) for part in parts]
    sizes = TableSizes(len(parts[0]), len(parts[1]), len(parts[3]), len(parts[-1]))
    return _to_device(torch.cat(padded), device), sizes


def split_tables(tables: Tables) -> tuple[torch.Tensor, ...]:
    """Views of the tables: param_ptrs, grad_ptrs, then CHUNK_TABLE_PARTS."""
    t, s, c, g = tables.sizes
    views = [tables.pointers[:t], tables.pointers[_even(t):_even(t) + t]]
    start = 0
    for length in (t, s, s, c, c, c, c, s, g):
        views.append(tables.chunks[start:start + length])
        start += _even(length)
    return tuple(views)
