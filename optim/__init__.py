"""fusedoptim: PyTorch optimizers whose whole update runs as a few fused kernels over all parameters.

On CUDA tensors each step is one Triton launch per bucket (param group x dtype), whatever the number
of tensors; on CPU tensors fused C++ kernels (built just in time from csrc/) do the same, with a
pure-PyTorch reference of the same rule as the fallback and the tests' oracle.
"""

from ._base import BACKENDS, FusedOptimizer
from .adabelief import AdaBelief
from .adan import Adan
from .ademamix import AdEMAMix

__all__ = ["BACKENDS", "AdaBelief", "AdEMAMix", "Adan", "FusedOptimizer"]
__version__ = "0.1.0"
