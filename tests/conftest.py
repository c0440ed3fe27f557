"""Run the Triton kernels through the CPU interpreter when the tests' device is the CPU.

Triton decides at decoration time, so TRITON_INTERPRET must be set before anything imports triton;
pytest imports this file before any test module. The device is tests/devices.py's one choice
(``FUSEDOPTIM_TEST_DEVICE``, by default cuda when there is one): on cuda the kernels are compiled.
"""

import os

import interpreter_speed  # triton is imported by install(), not here

# A ValueError here (FUSEDOPTIM_TEST_DEVICE=cuda without a GPU) stops the run before any test: asked for the GPU,
# the tests must not quietly run the interpreter instead.
from devices import DEVICE

if DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns on every compile when unset
interpreter_speed.install()  # after TRITON_INTERPRET: it imports triton
