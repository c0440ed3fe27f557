"""Triton kernels: the only subpackage that imports triton. Imported lazily by the optimizers."""

from ._launch import (
    INTERPRETED,
    LAUNCH_COUNTS,
    SUPPORTED_DTYPES,
    block_size,
    device_ok,
    launch_segment_sum,
    launch_step,
)

__all__ = [
    "INTERPRETED",
    "LAUNCH_COUNTS",
    "SUPPORTED_DTYPES",
    "block_size",
    "device_ok",
    "launch_segment_sum",
    "launch_step",
]
