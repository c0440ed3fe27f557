"""The multi-tensor kernel template: addressing, masking, casting and iteration, written once.

A *rule* (``kernels/<name>.py``) is a ``@triton.jit`` function on fp32 blocks::

    rule(param, grad, state, step, *hyper, *flags) -> (param, new_state)

where ``state`` is a tuple of the optimizer's state blocks (in ``state_names`` order), ``step`` the
tensor's step count (fp32, already advanced), ``hyper`` the optimizer's runtime fp32 scalars and
``flags`` its structural ``tl.constexpr`` options. The template below applies it to every element of
every tensor of a bucket in ONE launch, whatever the number of tensors.

Rules that need per-tensor statistics (norms, a cosine, ...) run the same template twice around a
deterministic segment sum:

- pass A, ``prepare(param, grad, state, step, *hyper, *flags) -> (state, terms)``: ``terms`` is a tuple
  of NUM_SUMS elementwise blocks; the template sums each over the chunk into ``partials[chunk, k]``;
- ``segment_sum_kernel``: ``sums[t, k]`` = the partials of tensor t's chunks added in chunk order (no
  atomics: two runs are bitwise equal);
- ``finalize`` (plain torch, in ``optim/<name>.py``): ``sums`` -> per-tensor ``factors[t, f]``;
- pass B, ``apply(param, grad, state, step, *factors, *hyper, *flags) -> (param, state)``.

With SYNC, the last pass also performs Lookahead's synchronisation on the fast weights it just computed:
+8 B/param per sync (read and write the slow weight) instead of a separate pass (+16 B: θ again too).

Loads whose values a rule never uses are removed by the compiler, so a pass only moves the bytes its
rule touches; stores are explicit (STORE_PARAM, STORE_STATE).
"""

import triton
import triton.language as tl


@triton.jit
def _apply_rule(param_ptr, grad_ptr, state_ptrs, state_offset, mask, step, factors, hyper, partial_ptr,
                slow_ptr, sync_rate, inv_grad_scale,
                RULE: tl.constexpr, FLAGS: tl.constexpr, PARAM_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr,
                NUM_SUMS: tl.constexpr, STORE_PARAM: tl.constexpr, STORE_STATE: tl.constexpr, SYNC: tl.constexpr,
                AMP: tl.constexpr):
    param = tl.load(param_ptr, mask=mask).to(tl.float32)
    grad = tl.load(grad_ptr, mask=mask).to(tl.float32)
    if AMP:  # GradScaler's unscale on the fly: the grads are read once and never written
        grad = grad * inv_grad_scale
    if MAXIMIZE:
        grad = -grad
    state = ()
    for i in tl.static_range(len(state_ptrs)):
        # fp32, or a state kept in the param dtype (Adan's prev_grad): math in fp32, the store casts back
        state = state + (tl.load(state_ptrs[i] + state_offset, mask=mask).to(tl.float32),)
    if NUM_SUMS > 0:
        state, terms = RULE(param, grad, state, step, *hyper, *FLAGS)
        for k in tl.static_range(NUM_SUMS):
            term = terms[k]
            if mask is not None:
                term = tl.where(mask, term, 0.0)
            tl.store(partial_ptr + k, tl.sum(term, axis=0))
    else:
        param, state = RULE(param, grad, state, step, *factors, *hyper, *FLAGS)
    if SYNC:  # Lookahead: slow ← slow + rate·(fast − slow); fast ← slow, on the fast weights just computed
        slow = tl.load(slow_ptr + state_offset, mask=mask)
        # the fast weight as stored (rounded to the param dtype), as a separate sync would read it
        fast = param.to(PARAM_DTYPE).to(tl.float32)
        # torch.lerp's two forms (as the C++ and reference syncs): exact at rate 0 and at rate 1, where
        # slow + 1·(fast − slow) is not ("sync_rate = 1 is the base")
        slow = tl.where(sync_rate < 0.5, slow + sync_rate * (fast - slow), fast - (fast - slow) * (1.0 - sync_rate))
        tl.store(slow_ptr + state_offset, slow, mask=mask)
        param = slow
    if STORE_PARAM:
        tl.store(param_ptr, param.to(PARAM_DTYPE), mask=mask)
    if STORE_STATE:
        for i in tl.static_range(len(state_ptrs)):
            tl.store(state_ptrs[i] + state_offset, state[i], mask=mask)


@triton.jit
def _runtime_scalars(hyper, lr_ptr, LR_TENSOR: tl.constexpr):
    """The rule's runtime scalars as fp32. With LR_TENSOR = 1 the first, every rule's lr, is read from ``lr_ptr`` (a
    0-d tensor on the device, e.g. scheduled there) in place of the placeholder passed: no host read, and neither a
    float nor a tensor LR is a compile-time constant, so a new LR never compiles a kernel. With 2 every one is read
    from ``lr_ptr``, fp32[len(hyper)] (tensor betas: their scalars are computed on the device)."""
    out = ()
    for i in tl.static_range(len(hyper)):
        if (LR_TENSOR == 2) or (LR_TENSOR == 1 and i == 0):
            out = out + (tl.load(lr_ptr + i).to(tl.float32),)
        else:
            out = out + (tl.cast(hyper[i], tl.float32),)  # `.to` fails on floats in the interpreter
    return out


@triton.jit
def multi_tensor_step_kernel(
    param_ptrs,      # int64[T]: data_ptr() of each parameter (PARAM_DTYPE, contiguous); written in place
    grad_ptrs,       # int64[T]: data_ptr() of each gradient (PARAM_DTYPE, contiguous); read only
    state_offsets,   # int64[T]: start of tensor t's segment in every flat state buffer (multiple of 16)
    steps,           # fp32[T]: step count of tensor t (advanced here with ADVANCE_STEPS, else already)
    chunk_tensor,    # int64[C]: the tensor that chunk c (= program c) works on
    chunk_start,     # int64[C]: first element of chunk c inside its tensor
    chunk_end,       # int64[C]: one past its last element (at most chunk_start + BLOCK)
    chunk_segment,   # int64[C]: the row of `factors` that chunk c reads in pass B
    state_ptrs,      # tuple of flat state buffers, one per state name (fp32; param_dtype_states: PARAM_DTYPE)
    hyper,           # tuple of runtime scalars, in the rule's argument order (never constexpr: no recompiles)
    partials,        # fp32[C, NUM_SUMS]: pass A's per-chunk sums (unused when NUM_SUMS == 0)
    factors,         # fp32[S, NUM_FACTORS]: pass B's per-segment factors from finalize (unused when 0)
    slow,            # fp32 flat buffer of Lookahead's slow weights, same layout as the states (used if SYNC)
    sync_rate_ptr,   # fp32[1]: the sync rate, a device scalar (Scout computes it there); < 0: no sync (SYNC_PASS)
    # Last: placed before state_ptrs, these three cost RaLars's pass A (fp16, sm_100, ptxas-blackwell) a 4 B spill.
    segment_begin,   # int64[S]: tensor t's chunks are segment_begin[t] .. segment_end[t] - 1
    segment_end,     # int64[S]
    step_counters,   # int32[T]: zeros between launches; ADVANCE_STEPS == 2 counts each tensor's programs in it
    grad_scale,      # fp32[1]: GradScaler's scale, by which the grads arrive multiplied (read with AMP)
    found_inf,       # fp32[1]: nonzero when a grad had an inf or NaN: then the step is skipped (read with AMP)
    lr_ptr,          # fp32[1]: the learning rate, read in place of hyper[0] (LR_TENSOR 1); fp32[H]: every scalar (2)
    RULE: tl.constexpr,         # the @triton.jit rule
    FLAGS: tl.constexpr,        # tuple of the rule's structural options (amsgrad, ...)
    PARAM_DTYPE: tl.constexpr,  # dtype of params and grads; math and state are fp32
    MAXIMIZE: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_SUMS: tl.constexpr = 0,
    NUM_FACTORS: tl.constexpr = 0,
    STORE_PARAM: tl.constexpr = True,
    STORE_STATE: tl.constexpr = True,
    SYNC: tl.constexpr = False,
    ADVANCE_STEPS: tl.constexpr = 0,  # the step's first pass: the rule sees step + 1; 2: this kernel stores it
    AMP: tl.constexpr = False,  # GradScaler: unscale the grads by grad_scale, skip everything if found_inf
    LR_TENSOR: tl.constexpr = 0,  # 1: a tensor LR at lr_ptr; 2: every runtime scalar there (tensor betas)
):
    inv_grad_scale = 1.0
    if AMP:
        # A skipped step is decided here, on the device: no host sync. Every program returns before it stores
        # anything, the steps included. (Masking every element off instead costs Adan's bf16 kernel 12 registers,
        # 76 -> 88, and AdamP's pass A 16, sm_90.)
        if tl.load(found_inf) != 0:
            return
        # GradScaler's inverse scale is 1 / scale in fp64 rounded to fp32; a correctly rounded fp32 division gives
        # the same bits (double rounding through 53 bits is innocuous for a 24-bit quotient), without fp64 registers
        inv_grad_scale = tl.math.div_rn(1.0, tl.load(grad_scale))
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_tensor + chunk)
    step = tl.load(steps + tensor)
    if ADVANCE_STEPS > 0:  # 1: pass A of a two-pass rule, whose segment sum stores the new steps
        step = step + 1.0
    if ADVANCE_STEPS == 2:
        # A one-pass step needs no launch for its steps: every program of the tensor reads the old step, then
        # counts itself (acq_rel atomic); the last to count stores the new step and re-arms the counter. No
        # program reads after that store: each read precedes its own count. Tensors without a gradient have no
        # program and keep their step. The stores are predicated, not branched: per program, in the entry block.
        chunks = tl.load(segment_end + tensor) - tl.load(segment_begin + tensor)
        # The barrier orders every warp's read of the step before the count (one thread's atomic): without it a
        # lagging warp could read the step the last program already stored.
        tl.debug_barrier()
        last = tl.atomic_add(step_counters + tensor, 1, sem="acq_rel") == chunks - 1
        tl.store(steps + tensor, step, mask=last)
        tl.store(step_counters + tensor, 0, mask=last)
    start = tl.load(chunk_start + chunk)                   # int64: tensors above 2**31 elements exist
    end = tl.load(chunk_end + chunk)
    idx = start + tl.arange(0, BLOCK).to(tl.int64)
    param_addr = tl.load(param_ptrs + tensor)
    grad_addr = tl.load(grad_ptrs + tensor)
    param_ptr = param_addr.to(tl.pointer_type(PARAM_DTYPE)) + idx
    grad_ptr = grad_addr.to(tl.pointer_type(PARAM_DTYPE)) + idx
    state_offset = tl.load(state_offsets + tensor) + idx
    # Alignment is decided per chunk, here: a misaligned tensor (a view, an FSDP2 shard, a row of 147 elements)
    # sends only its own chunks down the unhinted path, and no address ever re-specialises the kernel. 16 elements
    # keep fp32 states (segments start at multiples of 16) and 16-bit params 16-byte aligned.
    aligned = (param_addr % 16 == 0) & (grad_addr % 16 == 0) & (start % 16 == 0)
    hyper_fp32 = _runtime_scalars(hyper, lr_ptr, LR_TENSOR)
    tensor_factors = ()
    if NUM_FACTORS > 0:
        segment = tl.load(chunk_segment + chunk)
        for f in tl.static_range(NUM_FACTORS):
            tensor_factors = tensor_factors + (tl.load(factors + segment * NUM_FACTORS + f),)
    partial_ptr = partials + chunk.to(tl.int64) * NUM_SUMS
    sync_rate = 0.0
    if SYNC:
        sync_rate = tl.load(sync_rate_ptr)
        if (NUM_SUMS == 0) & (NUM_FACTORS == 0) & (not STORE_STATE):  # the sync on its own (SYNC_PASS)
            # A negative rate is no sync: a wrapper counting its steps on the device (GradScaler may skip a step, a
            # captured graph replays every step alike) launches this every step, negative between syncs. Only here:
            # predicating the sync fused into a step's last pass cost AdaBelief's bf16 kernel 9 registers (59 -> 68,
            # sm_90, past the 64 of 50% occupancy), so such a wrapper syncs in this pass (+16 B/param a sync, not +8).
            if sync_rate < 0.0:
                return
    # A mask blocks vectorisation, so full aligned blocks take an unmasked path with the alignment hints; the tail
    # and misaligned chunks take the masked one, without hints (a mask keeps its accesses scalar anyway).
    if (start + BLOCK <= end) & aligned:
        # Hints must sit on the pointer tensor: on the int64 address or the offsets they are ignored and the loads
        # stay 32-bit (measured: 114 regs and 32-bit vs 48 regs and 128-bit, sm_90).
        param_ptr = tl.max_contiguous(tl.multiple_of(param_ptr, 16), BLOCK)
        grad_ptr = tl.max_contiguous(tl.multiple_of(grad_ptr, 16), BLOCK)
        state_offset = tl.max_contiguous(tl.multiple_of(state_offset, 16), BLOCK)
        _apply_rule(param_ptr, grad_ptr, state_ptrs, state_offset, None, step, tensor_factors, hyper_fp32,
                    partial_ptr, slow, sync_rate, inv_grad_scale, RULE, FLAGS, PARAM_DTYPE, MAXIMIZE, NUM_SUMS,
                    STORE_PARAM, STORE_STATE, SYNC, AMP)
    else:
        _apply_rule(param_ptr, grad_ptr, state_ptrs, state_offset, idx < end, step, tensor_factors, hyper_fp32,
                    partial_ptr, slow, sync_rate, inv_grad_scale, RULE, FLAGS, PARAM_DTYPE, MAXIMIZE, NUM_SUMS,
                    STORE_PARAM, STORE_STATE, SYNC, AMP)


@triton.jit
def _sum_rows(partials, lo, hi, NUM_SUMS: tl.constexpr, SUMS_POW2: tl.constexpr, ROWS: tl.constexpr):
    """The [SUMS_POW2] sum of rows lo .. hi - 1 of partials ([*, NUM_SUMS]), ROWS rows a step, in a fixed order."""
    k = tl.arange(0, SUMS_POW2)
    acc = tl.zeros((ROWS, SUMS_POW2), dtype=tl.float32)
    for row0 in range(lo, hi, ROWS):
        rows = row0 + tl.arange(0, ROWS).to(tl.int64)
        mask = (rows[:, None] < hi) & (k[None, :] < NUM_SUMS)
        # volatile: rows another program stored in this launch are read from L2, never a stale L1 line
        acc += tl.load(partials + rows[:, None] * NUM_SUMS + k[None, :], mask=mask, other=0.0, volatile=True)
    return tl.sum(acc, axis=0)


@triton.jit
def _columns(values, SUMS_POW2: tl.constexpr, NUM: tl.constexpr):
    """The first NUM entries of a [SUMS_POW2] block, as a tuple of scalars (what a finalize takes)."""
    k = tl.arange(0, SUMS_POW2)
    out = ()
    for i in tl.static_range(NUM):
        out = out + (tl.sum(tl.where(k == i, values, 0.0), axis=0),)
    return out


@triton.jit
def _last_to_arrive(counter, arrivals):
    """True in the one program that arrives last of ``arrivals`` at ``counter`` (int32, re-armed to 0 by it). The
    barrier first: every thread's stores of this program are ordered before the (acq_rel, GPU-scope) count, so the
    last program sees them all."""
    tl.debug_barrier()
    last = tl.atomic_add(counter, 1, sem="acq_rel") == arrivals - 1
    tl.store(counter, 0, mask=last)
    return last


@triton.jit(do_not_specialize=["num_tensors", "num_segments"])
def segment_sum_kernel(
    partials,        # fp32[C, NUM_SUMS]: per-chunk sums from pass A, the chunks of a segment consecutive
    segment_begin,   # int64[S]: segment s is chunks segment_begin[s] .. segment_end[s] - 1
    segment_end,     # int64[S]
    group_segment,   # int64[G]: program g adds chunks of this segment: its (g - segment_group[s])-th GROUP of them
    segment_group,   # int64[S]: the first program (group) of segment s; a segment without chunks has one group
    group_sums,      # fp32[G, NUM_SUMS]: scratch, the groups' sums of the segments with more than one group
    sums,            # fp32[S, NUM_SUMS]: output
    steps,           # fp32[T]: the step of each tensor that pass A covered advances by 1 here
    counters,        # int32[S + T]: zeros between launches: the groups arrived per segment, the segments per tensor
    factors,         # fp32[S, NUM_FACTORS]: output of the finalize (FINALIZE)
    tensor_states,   # tuple of fp32[T]: the rule's per-tensor states, updated by the finalize for covered tensors
    numels,          # fp32[T]: the tensors' numels (what the finalize knows of a tensor)
    fan_in,          # fp32[T]: row length of a tensor with rows, 0 for the others
    row_begin,       # int64[T]: tensor t's rows are segments row_begin[t] .. row_end[t] - 1 (ROW_STATISTICS)
    row_end,         # int64[T]
    row_tensor,      # int64[R]: the tensor of each row segment T .. T + R - 1
    failing_rows,    # int32[T]: zeros between launches: ROW_TEST's count per tensor
    found_inf,       # fp32[1]: with AMP, nonzero skips the step: no sums, steps, factors or states are stored
    hyper,           # tuple of the rule's runtime scalars
    lr_ptr,          # fp32[1]: the learning rate, read in place of hyper[0] (LR_TENSOR 1); fp32[H]: every scalar (2)
    num_tensors,     # segments 0 .. T - 1 are the tensors (not specialised: no recompile per bucket size)
    num_segments,
    NUM_SUMS: tl.constexpr,
    SUMS_POW2: tl.constexpr,    # NUM_SUMS rounded up to a power of two (tl.arange needs one)
    ROWS: tl.constexpr,         # partial rows added per step
    GROUP: tl.constexpr,        # chunks per group: a segment of more chunks is added by several programs
    FINALIZE: tl.constexpr = None,    # the rule's finalize (kernels/<name>.py); None: the host finalizes
    ROW_TEST: tl.constexpr = None,    # rules with row statistics: a row -> 0 / 1, counted per tensor
    ROW_FACTORS: tl.constexpr = None,  # rules with row statistics: a block of rows' sums -> their factors
    FLAGS: tl.constexpr = (),
    NUM_FACTORS: tl.constexpr = 0,
    ROWS_STEP: tl.constexpr = 128,    # rows whose factors ROW_FACTORS writes per step
    AMP: tl.constexpr = False,
    LR_TENSOR: tl.constexpr = 0,
):
    """A deterministic two-level sum, then the rule's finalize, in one launch.

    Level 1: program g adds up to GROUP of its segment's partial rows in chunk order. A segment of one group is then
    done; a longer one stores its groups' sums, and the last of its groups to arrive (an atomic count) adds them in
    group order: the same order, so the same bits, whichever program arrives last. On GPT-2's embedding (75k
    chunks of 512) one program per segment took 4,712 serial steps (0.25-1.8 ms inferred, beside a 1.3-1.7 ms
    step); with groups of GROUP chunks the longest chain is GROUP / ROWS + groups / ROWS steps.

    The program that completes segment s stores its sums, the new step of tensor s (pass A saw step + 1; pass B
    and the finalize read it) and, with FINALIZE, the segment's factors: per tensor ``FINALIZE(sums, step, numel,
    fan_in, failing_rows, tensor_states, *hyper, *flags) -> (factors, row_terms, tensor_states)``, the Triton
    form of the rule's torch finalize (optim/<name>.py), which stays the reference. With ROW_TEST (AdamP's channel
    view) a tensor's factors wait for its rows: each completed row adds ROW_TEST(row sums, fan_in, ...) to its
    tensor's count (integer atomics: exact in any order), and the last of a tensor's segments to complete runs the
    finalize, then ``ROW_FACTORS(row sums columns, row_terms, *hyper, *flags)`` over its rows.
    """
    if AMP:
        if tl.load(found_inf) != 0:  # a skipped step: the last step's sums and factors stay
            return
    group = tl.program_id(0)
    hyper_fp32 = _runtime_scalars(hyper, lr_ptr, LR_TENSOR)
    segment = tl.load(group_segment + group)
    begin = tl.load(segment_begin + segment)
    end = tl.load(segment_end + segment)
    first = tl.load(segment_group + segment)
    lo = begin + (group - first) * GROUP
    total = _sum_rows(partials, lo, tl.minimum(lo + GROUP, end), NUM_SUMS, SUMS_POW2, ROWS)
    k = tl.arange(0, SUMS_POW2)
    groups = tl.maximum(tl.cdiv(end - begin, GROUP), 1)
    done = groups == 1
    if groups > 1:
        tl.store(group_sums + group.to(tl.int64) * NUM_SUMS + k, total, mask=k < NUM_SUMS)
        done = _last_to_arrive(counters + segment, groups)
        if done:
            total = _sum_rows(group_sums, first, first + groups, NUM_SUMS, SUMS_POW2, ROWS)
    if done:
        tl.store(sums + segment.to(tl.int64) * NUM_SUMS + k, total, mask=k < NUM_SUMS)
        is_tensor = segment < num_tensors
        covered = is_tensor & (end > begin)
        step = tl.load(steps + segment, mask=is_tensor, other=0.0) + 1.0
        tl.store(steps + segment, step, mask=covered)
        if FINALIZE is not None:
            if ROW_TEST is None:  # one segment per tensor: it finalizes itself
                _finalize(segment, _columns(total, SUMS_POW2, NUM_SUMS), tl.where(covered, step, step - 1.0),
                          covered, factors, tensor_states, numels, fan_in, failing_rows, row_begin, row_end, sums,
                          hyper_fp32, FINALIZE, ROW_FACTORS, FLAGS, NUM_SUMS, SUMS_POW2, NUM_FACTORS, ROWS_STEP)
            else:
                tensor = tl.where(is_tensor, segment, tl.load(row_tensor + (segment - num_tensors),
                                                             mask=segment >= num_tensors, other=0))
                if segment >= num_tensors:
                    fails = ROW_TEST(_columns(total, SUMS_POW2, NUM_SUMS), tl.load(fan_in + tensor), *hyper_fp32,
                                     *FLAGS)
                    tl.atomic_add(failing_rows + tensor, fails.to(tl.int32), sem="relaxed")
                arrivals = 1 + tl.load(row_end + tensor) - tl.load(row_begin + tensor)
                if _last_to_arrive(counters + num_segments + tensor, arrivals):
                    tensor_begin = tl.load(segment_begin + tensor)
                    tensor_covered = tl.load(segment_end + tensor) > tensor_begin
                    tensor_step = tl.load(steps + tensor, volatile=True)  # stored above by the tensor's segment
                    k_sums = tl.load(sums + tensor.to(tl.int64) * NUM_SUMS + k, mask=k < NUM_SUMS, volatile=True)
                    _finalize(tensor, _columns(k_sums, SUMS_POW2, NUM_SUMS), tensor_step, tensor_covered, factors,
                              tensor_states, numels, fan_in, failing_rows, row_begin, row_end, sums, hyper_fp32,
                              FINALIZE, ROW_FACTORS, FLAGS, NUM_SUMS, SUMS_POW2, NUM_FACTORS, ROWS_STEP)


@triton.jit
def _finalize(tensor, tensor_sums, step, covered, factors, tensor_states, numels, fan_in, failing_rows, row_begin,
              row_end, sums, hyper, FINALIZE: tl.constexpr, ROW_FACTORS: tl.constexpr, FLAGS: tl.constexpr,
              NUM_SUMS: tl.constexpr, SUMS_POW2: tl.constexpr, NUM_FACTORS: tl.constexpr, ROWS_STEP: tl.constexpr):
    """Tensor ``tensor``'s finalize: its factors (and its rows', with ROW_FACTORS) and its per-tensor states."""
    old_states = ()
    for i in tl.static_range(len(tensor_states)):
        old_states = old_states + (tl.load(tensor_states[i] + tensor),)
    fails = 0
    if ROW_FACTORS is not None:
        fails = tl.atomic_xchg(failing_rows + tensor, 0, sem="acquire")  # read the count and re-arm it
    tensor_factors, row_terms, new_states = FINALIZE(tensor_sums, step, tl.load(numels + tensor),
                                                      tl.load(fan_in + tensor), fails, old_states, *hyper, *FLAGS)
    for f in tl.static_range(NUM_FACTORS):
        tl.store(factors + tensor.to(tl.int64) * NUM_FACTORS + f, tensor_factors[f].to(tl.float32))
    for i in tl.static_range(len(tensor_states)):
        tl.store(tensor_states[i] + tensor, new_states[i].to(tl.float32), mask=covered)
    if ROW_FACTORS is not None:
        k = tl.arange(0, SUMS_POW2)
        for row0 in range(tl.load(row_begin + tensor), tl.load(row_end + tensor), ROWS_STEP):
            rows = row0 + tl.arange(0, ROWS_STEP).to(tl.int64)
            in_range = rows < tl.load(row_end + tensor)
            row_sums = tl.load(sums + rows[:, None] * NUM_SUMS + k[None, :],
                               mask=in_range[:, None] & (k[None, :] < NUM_SUMS), other=0.0, volatile=True)
            columns = ()
            for i in tl.static_range(NUM_SUMS):
                columns = columns + (tl.sum(tl.where(k[None, :] == i, row_sums, 0.0), axis=1),)
            row_factors = ROW_FACTORS(columns, row_terms, *hyper, *FLAGS)
            for f in tl.static_range(NUM_FACTORS):
                tl.store(factors + rows * NUM_FACTORS + f, row_factors[f].to(tl.float32), mask=in_range)
