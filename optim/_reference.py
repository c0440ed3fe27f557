"""The reference backend: each rule's torch form (``optim/<name>.py``), tensor by tensor, in fp32 (fp64 for fp64
params). It runs what no kernel supports (fp64 params), stands in when the C++ kernels cannot be built, and is the
oracle every other backend is tested against."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ._layout import check_grads_apart

if TYPE_CHECKING:
    from ._backends import Run
    from ._layout import Bucket
    from ._rule import Rule


#: Elements a torch reduction adds in one serial run (fixed_order_sum): below torch's parallel grain (32 768), so
#: no thread count splits it.
SUM_CHUNK = 1024


def fixed_order_sum(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The sum of each row of ``rows`` ([R, L]) in ``dtype``, bitwise the same whatever torch's thread count: rows
    are cut into SUM_CHUNK-element pieces, each added by one thread (torch parallelises a reduction with several
    outputs over its outputs, and one of fewer elements than its grain not at all), then the pieces' sums likewise.
    A plain ``sum`` splits a long row among the threads: 1-2 ulp apart between 1 and 2 threads."""
    rows = rows.to(dtype)
    while rows.shape[1] > SUM_CHUNK:
        rows = torch.nn.functional.pad(rows, (0, -rows.shape[1] % SUM_CHUNK))
        rows = rows.reshape(rows.shape[0], -1, SUM_CHUNK).sum(2)
    return rows.sum(1)


class ReferenceExecutor:
    name = "reference"

    def check_run(self, run: Run, owner: str, capturable: bool) -> None:
        """Phase 1: no grad shares memory with its param. capturable asks nothing more of a host path: nothing of
        it is captured in a CUDA graph, and its results equal a normal step's."""
        check_grads_apart(run.bucket, run.active, run.grads, owner)

    def unavailable(self, rule: Rule, device: torch.device, dtype: torch.dtype, *, build: bool = True) -> None:
        return None  # torch runs anywhere

    def prepare_bucket(self, bucket: Bucket) -> None:
        pass

    def step(self, run: Run) -> None:
        if run.found_inf is None:
            self._step(run)
            return
        # GradScaler: its inverse scale as a device scalar (rounded through fp64 as its own unscale), and a step with
        # an inf or NaN not taken, decided on the device as on the compiled paths (reading found_inf on the host
        # would be a sync on CUDA): what the step overwrites is kept, then selected back.
        bucket = run.bucket
        run.inv_grad_scale = run.grad_scale.double().reciprocal().float().reshape(())
        overwritten = [bucket.tensors[i] for i in run.active] + [*bucket.states.values(), bucket.steps]
        kept = [t.clone() for t in overwritten]
        self._step(run)  # the finalize keeps its sums, factors and per-tensor states itself (finalize_run)
        skipped = run.found_inf.reshape(()) > 0
        for t, old in zip(overwritten, kept, strict=True):
            t.copy_(torch.where(skipped, old, t))

    def _step(self, run: Run) -> None:
        run.bucket.advance_steps(run.active)
        factors = run.rule.finalize_run(run, self._prepare(run)) if run.rule.two_pass else None
        self._apply(run, factors)
        if run.sync_rate is not None:
            self.sync(run.bucket, run.active, run.sync_rate)

    def sync(self, bucket: Bucket, indices: tuple[int, ...], sync_rate: torch.Tensor) -> None:
        rate = sync_rate.reshape(())
        synced = rate >= 0  # a negative rate is no sync (a wrapper counting its steps on the device), read there
        for i in indices:
            p, slow = bucket.tensors[i], bucket.view("slow_param", i)
            slow.copy_(torch.where(synced, slow.lerp(p.detach().to(slow.dtype), rate.to(slow.dtype)), slow))
            p.copy_(torch.where(synced, slow.to(p.dtype), p))

    def snapshot(self, bucket: Bucket, ring: torch.Tensor, slot: int | torch.Tensor,
                 coherence: bool) -> torch.Tensor | None:
        """Scout: the params into row ``slot`` of the bucket's ring (-1: none); with ``coherence``, the fp64
        [tensors, 2] coherence sums of the ring and the params (optim/scout.py), tensor by tensor. A position tensor
        is read on the device: the row is written where the position names one, and the sums always computed."""
        from . import scout  # here: scout imports this module (fixed_order_sum)

        on_device = isinstance(slot, torch.Tensor)
        if on_device:
            stored = slot < ring.shape[0]  # positions 0 .. k - 2 (skipped steps come as k and above)
            row = slot.clamp(max=ring.shape[0] - 1)
            coherence = True
        rows = []
        for i, tensor in enumerate(bucket.tensors):
            snapshots = scout.ring_view(bucket, ring, i)
            if on_device:
                kept = snapshots.index_select(0, row)
                snapshots.index_copy_(0, row, torch.where(stored, tensor.to(ring.dtype).unsqueeze(0), kept))
            elif slot >= 0:
                snapshots[slot].copy_(tensor)
            if coherence:
                rows.append(scout.coherence(bucket.view("slow_param", i), snapshots, tensor.detach())
                            if tensor.numel() else torch.zeros(2, dtype=torch.float64, device=bucket.device))
        if not coherence:
            return None
        return torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.float64, device=bucket.device)

    @staticmethod
    def _inputs(run: Run, i: int) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        bucket = run.bucket
        dtype = torch.promote_types(bucket.dtype, torch.float32)
        grad = run.grads[i].to(dtype)
        if run.found_inf is not None:  # GradScaler's unscale, as it does it (fp32 times the fp32 inverse)
            grad = grad * run.inv_grad_scale
        return (bucket.tensors[i].detach().to(dtype), -grad if run.maximize else grad,
                tuple(bucket.view(name, i) for name in bucket.rule_state_names))

    def _prepare(self, run: Run) -> torch.Tensor:
        bucket, rule, segments = run.bucket, run.rule, run.bucket.segments
        prepare = rule.reference[0]
        # fp32 sums (fp64 for fp64 params), added in an order that does not depend on the thread count
        sums = torch.zeros(segments.num_segments, rule.num_sums, dtype=torch.promote_types(bucket.dtype, torch.float32),
                           device=bucket.device)
        for i in run.active:
            param, grad, state = self._inputs(run, i)
            new_state, terms = prepare(param, grad, state, bucket.steps[i], *run.hyper, *run.flags)
            if rule.prepare_writes_state:
                for old, new in zip(state, new_state, strict=True):
                    old.copy_(new)
            sums[i] = torch.stack([fixed_order_sum(term.reshape(1, -1), sums.dtype)[0] for term in terms])
            row_length = segments.row_lengths[i]
            if row_length is not None:
                first = len(bucket.params) + segments.first_row[i]
                rows = torch.stack([fixed_order_sum(term.reshape(-1, row_length), sums.dtype) for term in terms], 1)
                sums[first:first + rows.shape[0]] = rows
        return sums

    def _apply(self, run: Run, factors: torch.Tensor | None) -> None:
        bucket, segments = run.bucket, run.bucket.segments
        update = run.rule.reference[-1]
        for i in run.active:
            param, grad, state = self._inputs(run, i)
            shape, views = param.shape, state
            if factors is None:
                tensor_factors = ()
            elif segments.row_lengths[i] is None:
                tensor_factors = tuple(factors[i])
            else:  # per-row factors: the rule sees the tensor as [rows, row_length] and factors as [rows, 1]
                first = len(bucket.params) + segments.first_row[i]
                tensor_factors = tuple(factors[first:first + shape[0]].T[:, :, None])
                param, grad = param.reshape(shape[0], -1), grad.reshape(shape[0], -1)
                state = tuple(s.reshape(shape[0], -1) for s in state)
            param, new_state = update(param, grad, state, bucket.steps[i], *tensor_factors, *run.hyper, *run.flags)
            bucket.tensors[i].copy_(param.reshape(shape))
            for old, new in zip(views, new_state, strict=True):
                old.copy_(new.reshape(shape))


EXECUTOR = ReferenceExecutor()
