r"""Scout's coherence (holocron's Scout wrapper, ``fusedoptim.Scout`` in optim/wrappers.py): the reference.

At a sync, each element has k = ``sync_period`` updates :math:`U_i`, from the slow weight to the first snapshot of
the ring, between consecutive snapshots, and from the last to the params: the ring holds the fast weights of the
first k - 1 steps of the period, and the params at the sync are the k-th (never stored). Per element, in fp32 and
in this order (the C++ kernel in csrc/scout.h and the Triton kernel in kernels/scout.py compute the same operations
in the same order)::

    mean      = (params - slow) * (1/k)                                        (the sum of the U_i telescopes)
    deviation = max_i |U_i - mean|
    std       = sqrt(((U_0 - mean)^2 + ... + (U_{k-1} - mean)^2) * (1/(k-1)))    (unbiased)
    ratio     = std / deviation if deviation > 0 else 0                          (varies = deviation > 0)

and per tensor the fp64 sum of its ratios and the count of its entries that varied. ``rate`` turns the per-tensor
sums of every bucket into the sync rate, on the device.
"""

from __future__ import annotations

import functools
import struct
from typing import TYPE_CHECKING

import torch

from ._reference import fixed_order_sum

if TYPE_CHECKING:
    from ._layout import Bucket


def ring_view(bucket: Bucket, ring: torch.Tensor, i: int) -> torch.Tensor:
    """Tensor i's snapshots in a bucket's ring (flat [k - 1, total], laid out like the state buffers): [k - 1,
    *shape], each in the tensor's memory order, as its slow weights are (``bucket.view``)."""
    return ring.as_strided((ring.shape[0], *bucket.tensors[i].shape), (ring.shape[1], *bucket.strides[i]),
                           ring.storage_offset() + bucket.offsets[i])


@functools.cache
def reciprocals(period: int) -> tuple[float, float]:
    """1/k and 1/(k-1) as the kernels multiply by them: fp32 (the mean and the variance are products, not
    quotients, so that every backend rounds them alike). Rounded by ``struct``: no tensor is read at a step."""
    return tuple(struct.unpack("<f", struct.pack("<f", 1.0 / n))[0] for n in (period, period - 1))


def coherence(slow: torch.Tensor, snapshots: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """fp64[2]: the sum of one tensor's ratios and the count of its entries that varied, from its slow weights, its
    k - 1 snapshots ([k - 1, *shape]) and its params (the last snapshot), fp32 (fp64 for fp64 params)."""
    period = snapshots.shape[0] + 1
    inv_period, inv_period_minus_one = reciprocals(period)
    history = torch.cat([slow.reshape(1, -1), snapshots.reshape(period - 1, -1),
                         params.reshape(1, -1).to(slow.dtype)])
    updates = [history[i + 1] - history[i] for i in range(period)]
    mean = (history[period] - history[0]) * inv_period  # the updates' sum telescopes
    deviation = (updates[0] - mean).abs()
    squares = (updates[0] - mean) * (updates[0] - mean)
    for update in updates[1:]:
        deviation = torch.maximum(deviation, (update - mean).abs())
        squares = squares + (update - mean) * (update - mean)
    # torch's fp32 sqrt is not correctly rounded on CPU (1 ulp off in 859 of 5000 elements here); through fp64 it
    # is, as C++'s std::sqrt and Triton's sqrt_rn are
    variance = squares * inv_period_minus_one
    std = variance.double().sqrt().to(variance.dtype)
    varies = deviation > 0
    ratio = torch.where(varies, std / torch.where(varies, deviation, 1.0), 0.0)
    return torch.stack([fixed_order_sum(ratio.reshape(1, -1), torch.float64)[0], varies.sum().double()])


def rate(table: torch.Tensor, sync_rate: float) -> torch.Tensor:
    """The sync rate (fp32 0-d, on the table's device) from the per-tensor sums (fp64 [tensors, 2]: ratio sum,
    count): max(1 - the mean over the tensors that varied of their mean ratio, sync_rate), and sync_rate when none
    varied. No host read."""
    count = table[:, 1]
    counted = count > 0
    coherence_per_tensor = table[:, 0] / count.clamp(min=1)
    mean = (coherence_per_tensor * counted).sum() / counted.sum().clamp(min=1)
    return torch.where(counted.any(), torch.clamp(1.0 - mean, min=sync_rate), sync_rate).to(torch.float32)
