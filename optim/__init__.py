"""fusedoptim: PyTorch optimizers whose whole update runs as a few fused kernels over all parameters.

On CUDA tensors each step is one Triton launch per bucket (param group x dtype), whatever the number
of tensors; on CPU tensors fused C++ kernels (built just in time from csrc/) do the same, with a
pure-PyTorch reference of the same rule as the fallback and the tests' oracle.
"""

from ._backends import BACKENDS, BackendUnavailable
from ._base import FusedOptimizer
from ._layout import Bucket
from ._rule import Rule, TwoPassRule
from .adabelief import AdaBelief
from .adamp import AdamP
from .adan import Adan
from .ademamix import AdEMAMix
from .lamb import LAMB
from .lars import LARS
from .ralars import RaLars
from .tadam import TAdam
from .wrappers import Lookahead, Scout

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "Bucket",
    "LAMB",
    "LARS",
    "AdaBelief",
    "AdamP",
    "AdEMAMix",
    "Adan",
    "FusedOptimizer",
    "Lookahead",
    "RaLars",
    "Rule",
    "Scout",
    "TAdam",
    "TwoPassRule",
]
__version__ = "0.1.0"
