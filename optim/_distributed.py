"""DTensor params (FSDP2's ``fully_shard``, HSDP, DTensor replication): what a bucket needs to know of sharding.

The kernels run on each rank's local shard (``to_local()``: contiguous, possibly empty, possibly uneven). What
crosses ranks is only what a rule sums per tensor: pass A's per-tensor sums are partial sums over the local
shard, added up with one ``all_reduce(SUM)`` per bucket over the process group of the mesh dimension that shards
(never over replicate dimensions: under HSDP the replicas already hold the same sums). Every rank then runs the
same finalize on the same sums, so all compute identical factors. Elementwise rules need no communication.

Supported placements: ``Shard(0)`` on at most one mesh dimension, ``Replicate()`` on the others (what FSDP2 and
HSDP make). Rows stay whole under ``Shard(0)``, so per-row statistics (AdamP's channel view) are local.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # a torch built without distributed support
    dist = DTensor = Shard = distribute_tensor = None


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's local tensor of a DTensor (an alias: writing it writes the DTensor), else ``t``."""
    return t.to_local().detach() if is_dtensor(t) else t


@dataclass(frozen=True, eq=False)
class Sharding:
    """How the params of a bucket are distributed: one mesh and placements for all of them."""

    mesh: Any
    placements: tuple[Any, ...]
    group: Any  # the process group of the mesh dimension that shards, None when every dimension replicates

    @property
    def key(self) -> tuple:
        return (id(self.mesh), self.placements)

    def distribute(self, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A DTensor with ``like``'s mesh, placements, global shape and stride over the local ``value``."""
        return DTensor.from_local(value, self.mesh, self.placements, shape=like.shape, stride=like.stride(),
                                  run_check=False)

    def all_reduce(self, t: torch.Tensor) -> None:
        """Sum ``t`` (contiguous) over the shards, in place; nothing when no dimension shards."""
        if self.group is not None:
            dist.all_reduce(t, group=self.group)


def sharding_of(p: torch.Tensor, owner: str) -> Sharding | None:
    """None for a plain tensor; for a DTensor its Sharding, or a ValueError naming the placement we cannot run
    (raised on every rank alike: placements are the same on all of them)."""
    if not is_dtensor(p):
        return None
    shard_dims = []
    for dim, placement in enumerate(p.placements):
        if placement.is_replicate():
            continue
        if type(placement) is Shard and placement.dim == 0:
            shard_dims.append(dim)
            continue
        raise ValueError(f"{owner} cannot optimize a DTensor with placements {tuple(p.placements)} (shape "
                         f"{tuple(p.shape)}): {placement} is not supported; use Shard(0) (FSDP2's fully_shard) "
                         "and Replicate()")
    if len(shard_dims) > 1:
        raise ValueError(f"{owner} cannot optimize a DTensor sharded on dim 0 over {len(shard_dims)} mesh "
                         f"dimensions (placements {tuple(p.placements)}); shard it over one")
    group = p.device_mesh.get_group(shard_dims[0]) if shard_dims else None
    return Sharding(p.device_mesh, tuple(p.placements), group)


def check_grad(p: torch.Tensor, grad: torch.Tensor, owner: str) -> torch.Tensor:
    """The local gradient of param ``p``; a ValueError when a DTensor param has a gradient distributed otherwise."""
    if is_dtensor(p):
        if not is_dtensor(grad) or tuple(grad.placements) != tuple(p.placements):
            got = tuple(grad.placements) if is_dtensor(grad) else "a plain tensor"
            raise ValueError(f"{owner}: a DTensor param with placements {tuple(p.placements)} has a gradient with "
                             f"placements {got}; the gradient must be distributed like its param")
        return grad.to_local()
    if is_dtensor(grad):
        raise ValueError(f"{owner}: a plain tensor param has a DTensor gradient")
    return grad


def local_value(value: Any, p: torch.Tensor) -> Any:
    """A loaded state value as the rank's local part of param ``p``'s layout: a DTensor is redistributed to
    ``p``'s placements if need be; a full plain tensor of a DTensor param is cut to the local shard (no
    communication); anything else is returned as it is."""
    if is_dtensor(value):
        if is_dtensor(p) and tuple(value.placements) != tuple(p.placements):
            value = value.redistribute(p.device_mesh, p.placements)
        return value.to_local()
    if (is_dtensor(p) and isinstance(value, torch.Tensor) and value.dim() > 0
            and value.numel() == p.numel()):
        return distribute_tensor(value.reshape(p.shape).to(p.device), p.device_mesh, p.placements,
                                 src_data_rank=None).to_local()
    return value
