"""The rule of a standalone Lookahead sync: the template's SYNC step does the work (kernels/_template.py)."""

import triton
import triton.language as tl  # noqa: F401  (the interpreter needs triton.language in a jit function's globals)


@triton.jit
def keep(param, grad, state, step):
    return param, state
