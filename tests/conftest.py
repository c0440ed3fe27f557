"""Run the Triton kernels through the CPU interpreter when there is no GPU.

Triton decides at decoration time, so TRITON_INTERPRET must be set before anything imports triton;
pytest imports this file before any test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns on every compile when unset
