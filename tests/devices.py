"""The one device choice of the tests: ``FUSEDOPTIM_TEST_DEVICE`` (``cpu`` or ``cuda``), by default ``cuda`` when
torch sees a GPU and ``cpu`` otherwise.

The tests that build their tensors through it (tests/test_parity.py through tests/helpers.py, and
tests/test_wrappers.py) run the Triton kernels on CUDA tensors, compiled, against the reference on the same
device; on ``cpu`` they run them through the Triton interpreter, as they always have. This module imports only
torch: tests/conftest.py reads it to decide ``TRITON_INTERPRET`` before anything imports triton.
"""

from __future__ import annotations

import os

import torch

#: The environment variable that chooses the device.
ENV = "FUSEDOPTIM_TEST_DEVICE"


def chosen_device_type() -> str:
    """``cpu`` or ``cuda``: ``$FUSEDOPTIM_TEST_DEVICE`` when set, else ``cuda`` if torch sees a GPU, else ``cpu``.

    Raises a ValueError for any other value, and for ``cuda`` on a machine without one: a run that asked for the
    GPU must not quietly test the interpreter instead.
    """
    chosen = os.environ.get(ENV, "").strip().lower()
    if not chosen:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if chosen not in ("cpu", "cuda"):
        raise ValueError(f"{ENV}={chosen!r}: choose cpu or cuda")
    if chosen == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{ENV}=cuda, but torch sees no CUDA device")
    return chosen


#: The device of the tests' tensors.
DEVICE = torch.device(chosen_device_type())

#: Why a test of what runs on CPU tensors only (the C++ backend) is skipped on another device.
CPU_ONLY = f"the C++ backend runs on CPU tensors; {ENV} is {DEVICE.type}"
