"""fusedoptim: PyTorch optimizers whose whole update runs as a few fused kernels over all parameters.

On CUDA tensors each step is one Triton launch per bucket (param group x dtype), whatever the number
of tensors; on CPU tensors a pure-PyTorch reference runs the same rule.
"""

from ._base import BACKENDS, FusedOptimizer
from .adabelief import AdaBelief
from .adan import Adan
from .ademamix import AdEMAMix

__all__ = ["BACKENDS", "AdaBelief", "AdEMAMix", "Adan", "FusedOptimizer"]
__version__ = "0.1.0"
