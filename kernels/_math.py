"""Scalar helpers shared by the Triton rules (mirrored in torch by ``fusedoptim._math``)."""

import triton
import triton.language as tl


@triton.jit
def one_minus_exp(x):
    """1 - exp(x) for x <= 0, accurate to a few fp32 ulps.

    ``1 - exp(x)`` cancels catastrophically near 0: for a bias correction 1 - 0.999**1 it is off by
    1.3e-5 relative in fp32, more than the whole fp32 parity budget (1e-5). Below |x| = 0.25 we use the
    Taylor series of expm1 to x^8 (truncation < 0.25^8 / 9! = 4e-11 relative); above it 1 - exp(x) >= 0.22
    and the plain form loses nothing. Multiplies and adds only, so the GPU and the interpreter agree.
    """
    series = x * (1.0 + x * (1 / 2 + x * (1 / 6 + x * (1 / 24 + x * (
        1 / 120 + x * (1 / 720 + x * (1 / 5040 + x * (1 / 40320))))))))
    return -tl.where(x > -0.25, series, tl.exp(x) - 1.0)


@triton.jit
def bias_correction(log_beta, step):
    """1 - beta**step from log(beta) (computed on the host in fp64) and the per-tensor step."""
    return one_minus_exp(step * log_beta)
