"""The multi-tensor kernel template: addressing, masking, casting and iteration, written once.

A *rule* (``kernels/<name>.py``) is a ``@triton.jit`` function on fp32 blocks::

    rule(param, grad, state, step, *hyper, *flags) -> (param, new_state)

where ``state`` is a tuple of the optimizer's state blocks (in ``state_names`` order), ``step`` the
tensor's step count (fp32, already advanced), ``hyper`` the optimizer's runtime fp32 scalars and
``flags`` its structural ``tl.constexpr`` options. The template below applies it to every element of
every tensor of a bucket in ONE launch, whatever the number of tensors.
"""

import triton
import triton.language as tl


@triton.jit
def _apply_rule(param_ptr, grad_ptr, state_ptrs, state_offset, mask, step, hyper,
                RULE: tl.constexpr, FLAGS: tl.constexpr, PARAM_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr):
    param = tl.load(param_ptr, mask=mask).to(tl.float32)
    grad = tl.load(grad_ptr, mask=mask).to(tl.float32)
    if MAXIMIZE:
        grad = -grad
    state = ()
    for i in tl.static_range(len(state_ptrs)):
        state = state + (tl.load(state_ptrs[i] + state_offset, mask=mask),)
    param, state = RULE(param, grad, state, step, *hyper, *FLAGS)
    tl.store(param_ptr, param.to(PARAM_DTYPE), mask=mask)
    for i in tl.static_range(len(state_ptrs)):
        tl.store(state_ptrs[i] + state_offset, state[i], mask=mask)


@triton.jit
def multi_tensor_step_kernel(
    param_ptrs,      # int64[T]: data_ptr() of each parameter (PARAM_DTYPE, contiguous); written in place
    grad_ptrs,       # int64[T]: data_ptr() of each gradient (PARAM_DTYPE, contiguous); read only
    state_offsets,   # int64[T]: start of tensor t's segment in every flat state buffer (multiple of 16)
    numels,          # int64[T]: element count of tensor t
    steps,           # fp32[T]: step count of tensor t, already advanced for this step
    chunk_tensor,    # int64[C]: the tensor that chunk c (= program c) works on
    chunk_start,     # int64[C]: first element of chunk c inside its tensor (multiple of BLOCK)
    state_ptrs,      # tuple of flat fp32 state buffers, one per state name
    hyper,           # tuple of runtime scalars, in the rule's argument order (never constexpr: no recompiles)
    RULE: tl.constexpr,         # the @triton.jit rule
    FLAGS: tl.constexpr,        # tuple of the rule's structural options (amsgrad, ...)
    PARAM_DTYPE: tl.constexpr,  # dtype of params and grads; math and state are fp32
    MAXIMIZE: tl.constexpr,
    ALIGNED: tl.constexpr,      # host-checked: every param and grad address is 16-byte aligned
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_tensor + chunk)
    start = tl.load(chunk_start + chunk)                   # int64: tensors above 2**31 elements exist
    numel = tl.load(numels + tensor)
    idx = start + tl.arange(0, BLOCK).to(tl.int64)
    param_ptr = tl.load(param_ptrs + tensor).to(tl.pointer_type(PARAM_DTYPE)) + idx
    grad_ptr = tl.load(grad_ptrs + tensor).to(tl.pointer_type(PARAM_DTYPE)) + idx
    # Hints must sit on the pointer tensor: on the int64 address or the offsets they are ignored and
    # the loads stay 32-bit (measured: 114 regs and 32-bit vs 48 regs and 128-bit, sm_90).
    if ALIGNED:
        param_ptr = tl.max_contiguous(tl.multiple_of(param_ptr, 16), BLOCK)
        grad_ptr = tl.max_contiguous(tl.multiple_of(grad_ptr, 16), BLOCK)
    state_offset = tl.max_contiguous(tl.multiple_of(tl.load(state_offsets + tensor) + idx, 16), BLOCK)
    hyper_fp32 = ()
    for i in tl.static_range(len(hyper)):
        hyper_fp32 = hyper_fp32 + (tl.cast(hyper[i], tl.float32),)  # `.to` fails on floats in the interpreter
    step = tl.load(steps + tensor)
    # A mask blocks vectorisation, so full blocks take an unmasked path and only the tail is masked.
    if start + BLOCK <= numel:
        _apply_rule(param_ptr, grad_ptr, state_ptrs, state_offset, None, step, hyper_fp32,
                    RULE, FLAGS, PARAM_DTYPE, MAXIMIZE)
    else:
        _apply_rule(param_ptr, grad_ptr, state_ptrs, state_offset, idx < numel, step, hyper_fp32,
                    RULE, FLAGS, PARAM_DTYPE, MAXIMIZE)
