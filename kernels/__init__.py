"""Triton kernels: the only subpackage that imports triton. The optimizers reach it through optim/_kernels.py.

``fusedoptim.kernels.<name>`` holds the rules of optimizer <name> (``@triton.jit`` functions on fp32 blocks);
``_template.py`` the multi-tensor kernels that apply them; ``_launch.py`` the launcher and the table layout.
"""

from . import adabelief, adamp, adan, ademamix, lamb, lars, lookahead, ralars, scout, tadam
from ._launch import (
    INTERPRETED,
    LAUNCH_COUNTS,
    SUPPORTED_DTYPES,
    Finalize,
    SumTables,
    Tables,
    TableSizes,
    block_size,
    device_ok,
    launch_scout_snapshot,
    launch_segment_sum,
    launch_step,
    pack_chunk_table,
    pack_pointers,
    scout_snapshot_options,
    scout_snapshot_signature,
    segment_sum_options,
    segment_sum_signature,
    split_tables,
    step_options,
    step_signature,
)
from ._template import multi_tensor_step_kernel, segment_sum_kernel

__all__ = [
    "INTERPRETED",
    "LAUNCH_COUNTS",
    "SUPPORTED_DTYPES",
    "Finalize",
    "SumTables",
    "TableSizes",
    "Tables",
    "adabelief",
    "adamp",
    "adan",
    "ademamix",
    "block_size",
    "device_ok",
    "lamb",
    "lars",
    "launch_scout_snapshot",
    "launch_segment_sum",
    "launch_step",
    "lookahead",
    "multi_tensor_step_kernel",
    "pack_chunk_table",
    "pack_pointers",
    "ralars",
    "scout",
    "scout_snapshot_options",
    "scout_snapshot_signature",
    "segment_sum_kernel",
    "segment_sum_options",
    "segment_sum_signature",
    "split_tables",
    "step_options",
    "step_signature",
    "tadam",
]
