"""The flat multi-tensor layout: buckets and their flat state, padded segment offsets, the chunk table."""

from __future__ import annotations

import math
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._distributed import Sharding, local, local_value

#: Every tensor's segment in a flat state buffer starts at a multiple of this many elements (64 bytes
#: of fp32), so segment starts are 16-byte aligned and the compiled kernel keeps 128-bit accesses.
SEGMENT_ALIGN = 16


def padded_offsets(numels: Sequence[int], align: int = SEGMENT_ALIGN) -> tuple[list[int], int]:
    """Start of each segment in a flat buffer, each a multiple of ``align``, and the buffer's total length."""
    offsets, total = [], 0
    for n in numels:
        offsets.append(total)
        total += -(-n // align) * align
    return offsets, total


def _dense(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether these strides lay ``shape`` out without gaps or overlap, in some order of the dims."""
    expected = 1
    for d in sorted((d for d in range(len(shape)) if shape[d] != 1), key=lambda d: stride[d]):  # innermost first
        if stride[d] != expected:
            return False
        expected *= shape[d]
    return True


def memory_strides(tensor: torch.Tensor, rows_first: bool = False) -> tuple[int, ...]:
    """The strides of tensor's flat state segments: its own when it is dense and non-overlapping (contiguous,
    channels_last, any permutation), so that a param, its grad and its states share one memory order and the
    kernels read all of them as flat arrays; contiguous strides otherwise (a view with gaps: read through a copy).
    ``rows_first`` (AdamP's per-row statistics): only orders whose dim 0 is outermost, in which each row is one
    contiguous range (channels_last keeps it); a transposed weight gets contiguous strides."""
    shape, stride = tuple(tensor.shape), tuple(tensor.stride())
    contiguous = tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))
    if tensor.is_contiguous() or not tensor.numel() or not _dense(shape, stride):
        return contiguous
    if rows_first and shape[0] != 1 and any(stride[d] > stride[0] for d in range(1, len(shape)) if shape[d] != 1):
        return contiguous
    return stride


def same_memory_order(tensor: torch.Tensor, strides: tuple[int, ...]) -> bool:
    """Whether ``tensor`` (of the segment's shape) is laid out by ``strides`` (dense ones) but on dims of size 1,
    which never move an address: its data pointer then addresses it in its segment's order."""
    stride = tensor.stride()
    return stride == strides or all(n == 1 or a == b for n, a, b in zip(tensor.shape, stride, strides, strict=True))


def byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte] of the memory ``t`` addresses (its span: all of it when dense)."""
    begin = t.data_ptr()
    if t.numel() == 0:
        return begin, begin
    return begin, begin + t.element_size() * (1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride(),
                                                                                          strict=True)))


def check_grads_apart(bucket: Bucket, active: Sequence[int], grads: Sequence[torch.Tensor | None],
                      owner: str) -> None:
    """A grad must not share memory with its param: the kernels write the param while they read the grad (seen as
    ``p.grad.data = p.data`` in code that reuses buffers). ValueError, before anything is written."""
    for i in active:
        grad, param = grads[i], bucket.tensors[i]
        if grad is None or not grad.numel():
            continue
        g0, g1 = byte_span(grad)
        p0, p1 = byte_span(param)
        if g0 < p1 and p0 < g1:
            raise ValueError(f"{owner}: the gradient of param {i} of shape {tuple(param.shape)} shares memory with "
                             "its param; the step would read a gradient it is overwriting. Give it its own tensor")


def chunk_table_tensors(numels: Sequence[int], tensors: Sequence[int], block: int,
                        row_lengths: Sequence[int | None] | None = None) -> dict[str, torch.Tensor]:
    """The chunk table of the listed tensors, as int64 CPU tensors, built with a fixed number of torch ops
    whatever the number of tensors, rows or chunks (the Triton path rebuilds it when the set of tensors with a
    gradient changes; tests/test_layout.py checks it against a plain loop).

    Chunk c covers elements [chunk_start[c], chunk_end[c]) of tensor chunk_tensor[c], at most ``block`` of them;
    pass B reads its factors at row chunk_segment[c]. Segment s is chunks segment_begin[s] .. segment_end[s] - 1:
    segments 0..T-1 are the tensors; ``row_lengths[t]`` (None: no rows) splits tensor t into rows that are
    segments of their own, after the T tensor segments (AdamP's channel view), and chunks restart at every row.
    """
    num_tensors = len(numels)
    numel = torch.tensor(list(numels), dtype=torch.int64)
    row = torch.tensor([0 if row_lengths is None or r is None else r for r in (row_lengths or [None] * num_tensors)],
                       dtype=torch.int64)
    rows = torch.where(row > 0, numel // row.clamp(min=1), 0)
    first_row = torch.cumsum(rows, 0) - rows
    active = torch.tensor(list(tensors), dtype=torch.int64)
    # pieces: each active tensor whole, or each of its rows; a piece is cut into chunks of at most `block`
    pieces = rows[active].clamp(min=1)
    piece_tensor = torch.repeat_interleave(active, pieces)
    piece_first = torch.cumsum(pieces, 0) - pieces
    piece_row = torch.arange(int(pieces.sum())) - torch.repeat_interleave(piece_first, pieces)
    has_rows = rows[piece_tensor] > 0
    length = torch.where(has_rows, row[piece_tensor], numel[piece_tensor])
    piece_start = piece_row * length
    piece_segment = torch.where(has_rows, num_tensors + first_row[piece_tensor] + piece_row, piece_tensor)
    chunks = -(-length // block)
    chunk_piece = torch.repeat_interleave(torch.arange(len(length)), chunks)
    chunk_begin = torch.cumsum(chunks, 0) - chunks  # first chunk of each piece
    start = piece_start[chunk_piece] + (torch.arange(len(chunk_piece)) - chunk_begin[chunk_piece]) * block
    end = torch.minimum(start + block, (piece_start + length)[chunk_piece])
    segment_begin = torch.zeros(num_tensors + int(rows.sum()), dtype=torch.int64)
    segment_end = torch.zeros_like(segment_begin)
    row_pieces = has_rows.nonzero().squeeze(1)
    segment_begin[piece_segment[row_pieces]] = chunk_begin[row_pieces]
    segment_end[piece_segment[row_pieces]] = (chunk_begin + chunks)[row_pieces]
    last_piece = piece_first + pieces - 1
    segment_begin[active] = chunk_begin[piece_first]
    segment_end[active] = (chunk_begin + chunks)[last_piece]
    return dict(chunk_tensor=piece_tensor[chunk_piece], chunk_start=start, chunk_end=end,
                chunk_segment=piece_segment[chunk_piece], segment_begin=segment_begin, segment_end=segment_end)


@dataclass(eq=False)
class SegmentLayout:
    """What finalize knows of a bucket: sums[s] is tensor s for s < T, then one row per row of each tensor with
    rows (``row_lengths`` not None; AdamP's channel view), in tensor order."""

    numels: torch.Tensor       # fp32[T]: the params' numels (a DTensor's global numel)
    row_lengths: list[int | None]
    row_tensor: torch.Tensor   # int64[R]: the tensor of each row segment
    first_row: list[int]       # host: index of tensor t's first row among the R rows
    fan_in: torch.Tensor       # fp32[T]: row length of params with rows (ndim > 1), 0 for the others

    @property
    def num_segments(self) -> int:
        return len(self.row_lengths) + self.row_tensor.numel()

    @classmethod
    def of(cls, params: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], row_statistics: bool,
           device: torch.device) -> SegmentLayout:
        """The layout of ``params`` (global shapes: a tensor's numel and fan-in are the whole param's, as a rule's
        finalize needs them) whose local parts are ``tensors`` (the rows a rank holds: all of them, but for a
        DTensor sharded on dim 0)."""
        fan_in = [p.numel() // p.shape[0] if row_statistics and p.dim() > 1 and p.numel() else 0 for p in params]
        row_lengths = [f if f and t.numel() else None for f, t in zip(fan_in, tensors, strict=True)]
        row_tensor = [i for i, t in enumerate(tensors) if row_lengths[i] is not None for _ in range(t.shape[0])]
        first_row = [0] * len(tensors)
        for i in range(1, len(tensors)):
            first_row[i] = first_row[i - 1] + (tensors[i - 1].shape[0] if row_lengths[i - 1] else 0)
        return cls(torch.tensor([p.numel() for p in params], dtype=torch.float32).to(device), row_lengths,
                   torch.tensor(row_tensor, dtype=torch.int64).to(device), first_row,
                   torch.tensor(fan_in, dtype=torch.float32).to(device))


@dataclass(eq=False)
class Bucket:
    """The tensors of one param group that share a dtype, with their flat state (``FusedOptimizer.bucket_layout``).

    ``states[name]`` is one flat buffer per state name (fp32 for fp32/bf16/fp16 params), holding tensor i's
    segment at ``offsets[i]`` (a multiple of 16 elements); ``steps[i]`` is tensor i's step count.
    ``optimizer.state[p][name]`` and ``optimizer.state[p]["step"]`` are views into these buffers (for a DTensor
    param, DTensors over the views, distributed like ``p``). The kernels see ``tensors``: the params, or a DTensor
    param's local shard; ``numels`` and ``offsets`` are theirs. Rules with
    per-tensor statistics add per-tensor scalar states (TAdam's ``W_t``), the segment layout finalize sees, and the
    last step's per-segment ``sums`` and ``factors`` (device tensors: reading them never synchronises).
    """

    params: list[torch.Tensor]
    tensors: list[torch.Tensor]        # what the kernels update: each param, or its local shard (a DTensor's)
    sharding: Sharding | None          # the params' mesh and placements (DTensors), None for plain tensors
    dtype: torch.dtype
    device: torch.device
    executor: Any                      # the backend that steps it (optim/_backends.py)
    state_names: tuple[str, ...]       # every flat buffer (the rule's states, then Lookahead's slow_param)
    rule_state_names: tuple[str, ...]  # the ones the rule reads and writes
    numels: list[int]
    offsets: list[int]
    states: dict[str, torch.Tensor]
    steps: torch.Tensor
    param_ptrs: list[int]
    strides: list[tuple[int, ...]] = field(default_factory=list)  # each segment's (memory_strides)
    nbytes: list[int] = field(default_factory=list)  # each tensor's bytes
    in_place: list[bool] = field(default_factory=list)  # tensor i is addressed in its segment's order
    contiguous: bool = True  # every segment has contiguous strides (the grads' fast path)
    tensor_states: dict[str, torch.Tensor] = field(default_factory=dict)
    segments: SegmentLayout | None = None
    sums: torch.Tensor | None = None
    factors: torch.Tensor | None = None
    tables: Any = None  # what the executor keeps per bucket (the Triton path: its device tables)
    active_masks: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)

    @property
    def backend(self) -> str:
        return self.executor.name

    def advance_steps(self, active: tuple[int, ...]) -> None:
        """Add 1 to the steps of the listed tensors (one launch)."""
        self.steps.add_(1.0 if len(active) == len(self.params) else self.active_mask(active))

    def view(self, name: str, i: int) -> torch.Tensor:
        """Tensor i's segment of state buffer ``name``, shaped like its local tensor and in its memory order."""
        return self.states[name].as_strided(self.tensors[i].shape, self.strides[i], self.offsets[i])

    def in_order(self, i: int, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (tensor i's grad) in tensor i's segment order: itself, or a copy (grads are never written)."""
        if same_memory_order(tensor, self.strides[i]):
            return tensor
        return torch.empty_strided(tensor.shape, self.strides[i], dtype=tensor.dtype,
                                   device=tensor.device).copy_(tensor)

    def active_mask(self, active: tuple[int, ...]) -> torch.Tensor:
        """fp32[T] on the bucket's device: 1 for the listed tensors, 0 for the others (cached per set)."""
        mask = self.active_masks.get(active)
        if mask is None:
            host = torch.zeros(len(self.params), dtype=torch.float32)
            host[list(active)] = 1.0
            mask = self.active_masks[active] = host.to(self.device)
            if len(self.active_masks) > 64:  # bound the cache when grad sets keep changing
                self.active_masks.pop(next(iter(self.active_masks)))
        return mask


def build_bucket(params: list[torch.Tensor], sharding: Sharding | None, executor: Any, rule: Any,
                 names: tuple[str, ...], rule_names: tuple[str, ...]) -> Bucket:
    """A bucket over ``params`` (one dtype, device and sharding) with zeroed flat buffers for ``names``."""
    tensors = [local(p) for p in params]
    dtype, device = tensors[0].dtype, tensors[0].device
    numels = [t.numel() for t in tensors]
    offsets, total = padded_offsets(numels)
    states = {name: torch.zeros(total, dtype=rule.state_dtype(name, dtype), device=device) for name in names}
    bucket = Bucket(params, tensors, sharding, dtype, device, executor, names, rule_names, numels, offsets, states,
                    torch.zeros(len(params), dtype=torch.float32, device=device), [t.data_ptr() for t in tensors])
    bucket.nbytes = [t.numel() * t.element_size() for t in tensors]
    bucket.strides = [memory_strides(t, rule.two_pass and rule.row_statistics) for t in tensors]
    bucket.in_place = [same_memory_order(t, s) for t, s in zip(tensors, bucket.strides, strict=True)]
    bucket.contiguous = all(t.is_contiguous() for t in tensors)
    if rule.two_pass:
        # fp32, as the compiled kernels read them; fp64 for fp64 params (the reference's), like their other states
        bucket.tensor_states = {name: torch.zeros(len(params), dtype=torch.promote_types(dtype, torch.float32),
                                                  device=device)
                                for name in rule.tensor_states}
        bucket.segments = SegmentLayout.of(params, tensors, rule.row_statistics, device)
    return bucket


def adopt_state(bucket: Bucket, state: MutableMapping[torch.Tensor, dict[str, Any]]) -> None:
    """Copy whatever ``state[p]`` holds (loaded, deep-copied, older buffers; DTensors or full tensors for a DTensor
    param) into the bucket's flat buffers, then make ``state[p]`` views into them. Never casts state down."""
    for i, p in enumerate(bucket.params):
        old = {name: local_value(value, p) for name, value in state.get(p, {}).items()}
        if "step" in old:
            bucket.steps[i] = old["step"] if isinstance(old["step"], torch.Tensor) else float(old["step"])
        new = dict(state.get(p, {}))
        new["step"] = bucket.steps[i]
        for name, values in bucket.tensor_states.items():
            if name in old:
                values[i] = old[name].reshape(()) if isinstance(old[name], torch.Tensor) else float(old[name])
            new[name] = values[i]
        for name in bucket.state_names:
            view = bucket.view(name, i)
            if name in old:
                view.copy_(old[name].reshape(view.shape))
            new[name] = view if bucket.sharding is None else bucket.sharding.distribute(view, p)
        state[p] = new
