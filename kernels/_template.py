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
                slow_ptr, sync_rate,
                RULE: tl.constexpr, FLAGS: tl.constexpr, PARAM_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr,
                NUM_SUMS: tl.constexpr, STORE_PARAM: tl.constexpr, STORE_STATE: tl.constexpr, SYNC: tl.constexpr):
    param = tl.load(param_ptr, mask=mask).to(tl.float32)
    grad = tl.load(grad_ptr, mask=mask).to(tl.float32)
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
    sync_rate_ptr,   # fp32[1]: the sync rate, a device scalar (Scout computes it on the device)
    # Last: placed before state_ptrs, these three cost RaLars's pass A (fp16, sm_100, ptxas-blackwell) a 4 B spill.
    segment_begin,   # int64[S]: tensor t's chunks are segment_begin[t] .. segment_end[t] - 1
    segment_end,     # int64[S]
    step_counters,   # int32[T]: zeros between launches; ADVANCE_STEPS == 2 counts each tensor's programs in it
    RULE: tl.constexpr,         # the @triton.jit rule
    FLAGS: tl.constexpr,        # tuple of the rule's structural options (amsgrad, ...)
    PARAM_DTYPE: tl.constexpr,  # dtype of params and grads; math and state are fp32
    MAXIMIZE: tl.constexpr,
    ALIGNED: tl.constexpr,      # host-checked: every param, grad and chunk start is 16-byte aligned
    BLOCK: tl.constexpr,
    NUM_SUMS: tl.constexpr = 0,
    NUM_FACTORS: tl.constexpr = 0,
    STORE_PARAM: tl.constexpr = True,
    STORE_STATE: tl.constexpr = True,
    SYNC: tl.constexpr = False,
    ADVANCE_STEPS: tl.constexpr = 0,  # the step's first pass: the rule sees step + 1; 2: this kernel stores it
):
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
        last = tl.atomic_add(step_counters + tensor, 1) == chunks - 1
        tl.store(steps + tensor, step, mask=last)
        tl.store(step_counters + tensor, 0, mask=last)
    start = tl.load(chunk_start + chunk)                   # int64: tensors above 2**31 elements exist
    end = tl.load(chunk_end + chunk)
    idx = start + tl.arange(0, BLOCK).to(tl.int64)
    param_ptr = tl.load(param_ptrs + tensor).to(tl.pointer_type(PARAM_DTYPE)) + idx
    grad_ptr = tl.load(grad_ptrs + tensor).to(tl.pointer_type(PARAM_DTYPE)) + idx
    # Hints must sit on the pointer tensor: on the int64 address or the offsets they are ignored and
    # the loads stay 32-bit (measured: 114 regs and 32-bit vs 48 regs and 128-bit, sm_90).
    state_offset = tl.load(state_offsets + tensor) + idx
    if ALIGNED:
        param_ptr = tl.max_contiguous(tl.multiple_of(param_ptr, 16), BLOCK)
        grad_ptr = tl.max_contiguous(tl.multiple_of(grad_ptr, 16), BLOCK)
        state_offset = tl.max_contiguous(tl.multiple_of(state_offset, 16), BLOCK)
    hyper_fp32 = ()
    for i in tl.static_range(len(hyper)):
        hyper_fp32 = hyper_fp32 + (tl.cast(hyper[i], tl.float32),)  # `.to` fails on floats in the interpreter
    tensor_factors = ()
    if NUM_FACTORS > 0:
        segment = tl.load(chunk_segment + chunk)
        for f in tl.static_range(NUM_FACTORS):
            tensor_factors = tensor_factors + (tl.load(factors + segment * NUM_FACTORS + f),)
    partial_ptr = partials + chunk.to(tl.int64) * NUM_SUMS
    sync_rate = 0.0
    if SYNC:
        sync_rate = tl.load(sync_rate_ptr)
    # A mask blocks vectorisation, so full blocks take an unmasked path and only the tail is masked.
    if start + BLOCK <= end:
        _apply_rule(param_ptr, grad_ptr, state_ptrs, state_offset, None, step, tensor_factors, hyper_fp32,
                    partial_ptr, slow, sync_rate, RULE, FLAGS, PARAM_DTYPE, MAXIMIZE, NUM_SUMS, STORE_PARAM,
                    STORE_STATE, SYNC)
    else:
        _apply_rule(param_ptr, grad_ptr, state_ptrs, state_offset, idx < end, step, tensor_factors, hyper_fp32,
                    partial_ptr, slow, sync_rate, RULE, FLAGS, PARAM_DTYPE, MAXIMIZE, NUM_SUMS, STORE_PARAM,
                    STORE_STATE, SYNC)


@triton.jit(do_not_specialize=["num_tensors"])
def segment_sum_kernel(
    partials,        # fp32[C, NUM_SUMS]: per-chunk sums from pass A, the chunks of a segment consecutive
    segment_begin,   # int64[S]: segment s is chunks segment_begin[s] .. segment_end[s] - 1
    segment_end,     # int64[S]
    sums,            # fp32[S, NUM_SUMS]: output
    steps,           # fp32[T]: the step of each tensor that pass A covered advances by 1 here
    num_tensors,     # segments 0 .. T - 1 are the tensors (not specialised: no recompile per bucket size)
    NUM_SUMS: tl.constexpr,
    SUMS_POW2: tl.constexpr,    # NUM_SUMS rounded up to a power of two (tl.arange needs one)
    CHUNKS: tl.constexpr,       # chunk rows added per iteration
):
    """One program per segment adds its chunks' partial sums in chunk order: deterministic, no atomics. It also
    stores the new step of each tensor pass A covered (pass A saw step + 1; pass B and the finalize read it)."""
    segment = tl.program_id(0)
    begin = tl.load(segment_begin + segment)
    end = tl.load(segment_end + segment)
    covered = (segment < num_tensors) & (end > begin)
    tl.store(steps + segment, tl.load(steps + segment, mask=covered) + 1.0, mask=covered)
    k = tl.arange(0, SUMS_POW2)
    acc = tl.zeros((CHUNKS, SUMS_POW2), dtype=tl.float32)
    for row0 in range(begin, end, CHUNKS):
        rows = row0 + tl.arange(0, CHUNKS).to(tl.int64)
        mask = (rows[:, None] < end) & (k[None, :] < NUM_SUMS)
        acc += tl.load(partials + rows[:, None] * NUM_SUMS + k[None, :], mask=mask, other=0.0)
    tl.store(sums + segment.to(tl.int64) * NUM_SUMS + k, tl.sum(acc, axis=0), mask=k < NUM_SUMS)
