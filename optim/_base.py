"""FusedOptimizer: everything an optimizer needs that is not its update rule, written once.

Layers (one place each): the rule (``kernels/<name>.py`` for Triton, ``reference_update`` in
``fusedoptim/<name>.py`` for torch) → the multi-tensor template (``kernels/_template.py``) → the
launcher (``kernels/_launch.py``) → this class: validation, buckets, flat state, dispatch, state_dict.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from . import _cpu
from ._layout import chunk_table, padded_offsets

Backend = Literal["auto", "triton", "cpu", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "cpu", "reference")


class KernelPass(NamedTuple):
    """One Triton launch of a step over a bucket: which rule, and what the template does around it."""

    rule: tuple[str, str]  # (kernels module, rule function)
    num_sums: int          # > 0: pass A, emitting that many per-chunk sums
    num_factors: int       # > 0: pass B, reading that many per-segment factors
    store_param: bool
    store_state: bool
    last: bool             # the step's last pass: where a Lookahead sync is fused (SYNC)


@dataclass(eq=False)
class SegmentLayout:
    """What finalize knows of a bucket: sums[s] is tensor s for s < T, then one row per row of each tensor with
    rows (``row_lengths`` not None; AdamP's channel view), in tensor order."""

    numels: torch.Tensor       # fp32[T]
    row_lengths: list[int | None]
    row_tensor: torch.Tensor   # int64[R]: the tensor of each row segment
    first_row: list[int]       # host: index of tensor t's first row among the R rows
    fan_in: torch.Tensor       # fp32[T]: row length of tensors with rows, 0 for the others

    @property
    def num_segments(self) -> int:
        return len(self.row_lengths) + self.row_tensor.numel()


@dataclass(eq=False)
class Bucket:
    """The tensors of one param group that share a dtype, with their flat state.

    ``states[name]`` is one flat buffer per state name (fp32 for fp32/bf16/fp16 params), holding each
    tensor's segment at ``offsets[i]`` (a multiple of 16 elements); ``steps[i]`` is tensor i's step count.
    ``optimizer.state[p][name]`` and ``optimizer.state[p]["step"]`` are views into these buffers.
    """

    params: list[torch.Tensor]
    dtype: torch.dtype
    device: torch.device
    backend: str
    state_names: tuple[str, ...]      # every flat buffer (the rule's states, then Lookahead's slow_param)
    rule_state_names: tuple[str, ...]  # the ones the rule reads and writes
    numels: list[int]
    offsets: list[int]
    states: dict[str, torch.Tensor]
    steps: torch.Tensor
    param_ptrs: list[int]
    # Rules with per-tensor statistics: per-tensor scalar states (e.g. TAdam's W_t), the segment layout that
    # finalize sees, and the last step's per-segment sums and factors (readable for logging, no sync).
    tensor_states: dict[str, torch.Tensor] = field(default_factory=dict)
    segments: SegmentLayout | None = None
    sums: torch.Tensor | None = None
    factors: torch.Tensor | None = None
    sizes: tuple[int, int, int] = (0, 0, 0)  # tensors, segments, chunks of the current tables
    # Device-side tables of the last launch, rebuilt only when a pointer or the set of active tensors changes.
    table_key: tuple = ()
    tables: torch.Tensor | None = None
    num_chunks: int = 0
    aligned: bool = True
    active_masks: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)


class FusedOptimizer(Optimizer):
    """Base class of the fused optimizers.

    A subclass declares its ``state_names``, its two rules (``kernel_rule``: module and function name
    in ``fusedoptim.kernels``; ``reference_update``: the same rule in torch ops) and how a param group
    turns into the rule's runtime scalars (``_hyper``) and structural options (``_flags``).

    Semantics shared by all optimizers:

    - State is fp32 for fp32/bf16/fp16 params (fp64 for fp64 params) and lives in one flat buffer per
      state name and bucket (param group x dtype); ``state[p]`` holds views, so ``state_dict()`` has
      torch's per-parameter format.
    - Step counts are per tensor: a param whose ``.grad`` is None is skipped and its step does not advance.
    - ``maximize=True`` ascends; ``p.grad`` is never modified.
    - All params of one param group must be on one device; a group may mix dtypes.
    """

    state_names: ClassVar[tuple[str, ...]] = ()
    kernel_rule: ClassVar[tuple[str, str]]
    cpu_rule: ClassVar[str | None] = None  # the C++ rule in csrc/<cpu_rule>.h, run by `<cpu_rule>_step`
    reference_update: ClassVar[Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, ...]]]]
    # Rules with per-tensor statistics (two passes): pass A's rules, how many sums it emits per tensor, the
    # finalize that turns the [T, num_sums] sums into [T, len(factor_names)] factors for pass B (whose rules
    # are kernel_rule / reference_update), and per-tensor scalar states. num_sums == 0: one elementwise pass.
    num_sums: ClassVar[int] = 0
    kernel_prepare: ClassVar[tuple[str, str]]
    reference_prepare: ClassVar[Callable[..., tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]]
    finalize: ClassVar[Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, ...]]]]
    factor_names: ClassVar[tuple[str, ...]] = ()
    tensor_state_names: ClassVar[tuple[str, ...]] = ()
    prepare_writes_state: ClassVar[bool] = False
    apply_writes_state: ClassVar[bool] = True
    #: Rules that need per-row (channel) statistics of params with ndim > 1 as well (AdamP).
    row_statistics: ClassVar[bool] = False
    #: States kept in the param dtype instead of fp32: copies of the gradient (Adan's ``prev_grad``), which the
    #: param dtype holds exactly (2 B/param less to store, and to read and write every step, for 16-bit params).
    param_dtype_states: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: ParamsT, defaults: dict[str, Any], *, backend: Backend = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self._layouts: dict[int, tuple[tuple, list[Bucket]]] = {}
        self._slow_attached = False  # a Lookahead keeps its slow weights in our buckets (attach_slow_weights)
        self._pending_sync: torch.Tensor | None = None
        super().__init__(params, defaults)

    @classmethod
    def kernel_passes(cls) -> tuple[KernelPass, ...]:
        """The multi-tensor launches of one step per bucket, in order (a segment sum runs between two passes).
        The Triton path launches exactly these; the compiled-code checks compile exactly these."""
        apply = KernelPass(cls.kernel_rule, 0, len(cls.factor_names), True, cls.apply_writes_state, True)
        if not cls.num_sums:
            return (apply,)
        return (KernelPass(cls.kernel_prepare, cls.num_sums, 0, False, cls.prepare_writes_state, False), apply)

    # ----------------------------------------------------------------- subclass hooks
    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        """State buffers this group needs (a subclass adds optional ones, e.g. for amsgrad)."""
        return self.state_names

    def _hyper(self, group: dict[str, Any]) -> tuple[float, ...]:
        """Runtime scalars of the rule, in its argument order (fp32-rounded, computed in fp64)."""
        raise NotImplementedError

    def _flags(self, group: dict[str, Any]) -> tuple[bool, ...]:
        """Structural options of the rule (``tl.constexpr`` in the kernel)."""
        return ()

    def state_dtype(self, name: str, param_dtype: torch.dtype) -> torch.dtype:
        """The dtype of state ``name`` for params of ``param_dtype``: fp32 (fp64 for fp64 params), or the param
        dtype for the ``param_dtype_states``."""
        return param_dtype if name in self.param_dtype_states else torch.promote_types(param_dtype, torch.float32)

    def bytes_per_param(self, group: dict[str, Any], param_dtype: torch.dtype) -> int:
        """Bytes a minimal fused step moves per parameter element of ``group`` (the benchmarks' bytes model):
        read and write the param, read the grad, read and write every state (fp32, or fp64 for fp64 params;
        the ``param_dtype_states`` in the param dtype).

        E.g. AdaBelief on fp32 params: 3 x 4 + 2 states x 2 x 4 = 28 B, torch's fused AdamW figure.
        """
        param_bytes = torch.empty(0, dtype=param_dtype).element_size()
        return 3 * param_bytes + sum(2 * torch.empty(0, dtype=self.state_dtype(name, param_dtype)).element_size()
                                     for name in self._state_names(group))

    # ----------------------------------------------------------------- param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if isinstance(p, torch.Tensor) and not p.is_floating_point():
                raise ValueError(f"{type(self).__name__} can only optimize floating-point tensors, got {p.dtype}")
        devices = {p.device for p in params if isinstance(p, torch.Tensor)}
        if len(devices) > 1:
            raise ValueError(f"all params of one param group must be on one device, got {sorted(map(str, devices))}; "
                             "put params on other devices in their own param group")
        if self.backend == "triton":
            for p in params:
                if isinstance(p, torch.Tensor):
                    self._check_triton(p.device, p.dtype)
        if self.backend == "cpu":  # what is known without building the extension (that happens at the first step)
            for p in params:
                supported = p.device.type == "cpu" and p.dtype in _cpu.SUPPORTED_DTYPES
                reason = self._cpu_unsupported() or (
                    None if supported else f"the C++ kernels run on CPU tensors of "
                    f"{[str(d) for d in _cpu.SUPPORTED_DTYPES]}, not {p.device} {p.dtype}")
                if reason is not None:
                    raise RuntimeError(f"{type(self).__name__}(backend='cpu') cannot run here: {reason}")
        super().add_param_group(param_group)

    # ----------------------------------------------------------------- backends
    def _check_triton(self, device: torch.device, dtype: torch.dtype) -> None:
        reason = _triton_unavailable(device, dtype)
        if reason is not None:
            raise RuntimeError(f"{type(self).__name__}(backend='triton') cannot run here: {reason}")

    def _resolve_backend(self, device: torch.device, dtype: torch.dtype) -> str:
        if self.backend == "reference":
            return "reference"
        if self.backend == "triton":
            self._check_triton(device, dtype)
            return "triton"
        if self.backend == "cpu":
            reason = self._cpu_unsupported() or _cpu_unavailable(device, dtype)
            if reason is not None:
                raise RuntimeError(f"{type(self).__name__}(backend='cpu') cannot run here: {reason}")
            return "cpu"
        # auto: CUDA tensors run the Triton kernels; CPU tensors the C++ kernels, or the reference (one warning
        # per process) when they cannot be built; dtypes neither supports (fp64) run the reference.
        if device.type == "cuda" and _triton_unavailable(device, dtype) is None:
            return "triton"
        if device.type == "cpu" and dtype in _cpu.SUPPORTED_DTYPES and self._cpu_unsupported() is None:
            reason = _cpu.unavailable_reason()
            if reason is None:
                return "cpu"
            _cpu.warn_fallback_once(reason)
        return "reference"

    def _cpu_unsupported(self) -> str | None:
        """None when this optimizer has a C++ rule (``cpu_rule``), else why not."""
        if getattr(type(self), "cpu_rule", None) is None:
            return f"{type(self).__name__} has no C++ kernel yet"
        return None

    # ----------------------------------------------------------------- layout
    def _buckets(self, group: dict[str, Any]) -> list[Bucket]:
        """The group's buckets, built on first use and rebuilt (state adopted) when the params change."""
        params: list[torch.Tensor] = group["params"]
        names = self._state_names(group) + (("slow_param",) if self._slow_attached else ())
        key = (names, tuple(p.data_ptr() for p in params), tuple(id(p) for p in params))
        cached = self._layouts.get(id(group))
        if cached is not None and cached[0] == key:
            return cached[1]
        if cached is not None and cached[0][0] == names and cached[0][2] == key[2]:
            # Same params with new storage (e.g. `p.data = ...`): keep the layout if it still fits.
            buckets = cached[1]
            if all(p.dtype == b.dtype and p.device == b.device and p.numel() == b.numels[i]
                   for b in buckets for i, p in enumerate(b.params)):
                for b in buckets:
                    b.param_ptrs = [p.data_ptr() for p in b.params]
                self._layouts[id(group)] = (key, buckets)
                return buckets
        buckets = self._build_buckets(params, names, self._state_names(group))
        self._layouts[id(group)] = (key, buckets)
        return buckets

    def _build_buckets(self, params: Sequence[torch.Tensor], names: tuple[str, ...],
                       rule_names: tuple[str, ...]) -> list[Bucket]:
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"all params of one param group must be on one device, got {sorted(map(str, devices))}")
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        plans = []
        for dtype, members in by_dtype.items():  # resolve every backend before allocating anything
            device = members[0].device
            backend = self._resolve_backend(device, dtype)
            if backend == "triton":
                for p in members:
                    if not p.is_contiguous():
                        raise ValueError("the Triton backend needs contiguous params (the kernel addresses them "
                                         f"through their data pointer); got one of shape {tuple(p.shape)} with "
                                         f"strides {p.stride()}. Pass a contiguous tensor or use backend='reference'")
            plans.append((dtype, device, backend, members))
        buckets = []
        for dtype, device, backend, members in plans:
            numels = [p.numel() for p in members]
            offsets, total = padded_offsets(numels)
            states = {name: torch.zeros(total, dtype=self.state_dtype(name, dtype), device=device) for name in names}
            steps = torch.zeros(len(members), dtype=torch.float32, device=device)
            bucket = Bucket(members, dtype, device, backend, names, rule_names, numels, offsets, states, steps,
                            [p.data_ptr() for p in members])
            if self.num_sums:
                bucket.tensor_states = {name: torch.zeros(len(members), dtype=torch.float32, device=device)
                                        for name in self.tensor_state_names}
                row_lengths = [p.numel() // p.shape[0] if self.row_statistics and p.dim() > 1 and p.numel() else None
                               for p in members]
                row_tensor = [t for t, p in enumerate(members) if row_lengths[t] is not None
                              for _ in range(p.shape[0])]
                first_row = [0] * len(members)
                for t in range(1, len(members)):
                    first_row[t] = first_row[t - 1] + (members[t - 1].shape[0] if row_lengths[t - 1] else 0)
                fan_in = [r or 0 for r in row_lengths]
                bucket.segments = SegmentLayout(torch.tensor(numels, dtype=torch.float32).to(device), row_lengths,
                                                torch.tensor(row_tensor, dtype=torch.int64).to(device), first_row,
                                                torch.tensor(fan_in, dtype=torch.float32).to(device))
            self._adopt_state(bucket)
            buckets.append(bucket)
        return buckets

    def _adopt_state(self, bucket: Bucket) -> None:
        """Copy whatever ``self.state[p]`` holds (loaded, deep-copied, older buffers) into the bucket's
        flat buffers, then make ``self.state[p]`` views into them. Never casts state down."""
        for i, p in enumerate(bucket.params):
            old = self.state.get(p, {})
            if "step" in old:
                bucket.steps[i] = old["step"] if isinstance(old["step"], torch.Tensor) else float(old["step"])
            new = dict(old)
            new["step"] = bucket.steps[i]
            for name, values in bucket.tensor_states.items():
                if name in old:
                    values[i] = old[name].reshape(()) if isinstance(old[name], torch.Tensor) else float(old[name])
                new[name] = values[i]
            for name in bucket.state_names:
                view = bucket.states[name][bucket.offsets[i]:bucket.offsets[i] + bucket.numels[i]].view(p.shape)
                if name in old:
                    view.copy_(old[name].reshape(p.shape))
                new[name] = view
            self.state[p] = new

    # ----------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform a single optimization step.

        Args:
            closure: A closure that reevaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Phase 1: everything that can fail, before any param or state is written.
        work = []
        for group in self.param_groups:
            hyper, flags = self._hyper(group), self._flags(group)
            for bucket in self._buckets(group):
                grads = [p.grad for p in bucket.params]
                active = tuple(i for i, g in enumerate(grads) if g is not None)
                if not active:
                    continue
                for i in active:
                    if grads[i].is_sparse or grads[i].layout != torch.strided:
                        raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                work.append((group, bucket, active, grads, hyper, flags))
        # Phase 2: advance the steps of tensors that have a gradient, then run the passes.
        sync_rate, self._pending_sync = self._pending_sync, None
        if sync_rate is not None:  # buckets without any gradient still take part in Lookahead's sync
            stepped = {id(item[1]) for item in work}
            for group in self.param_groups:
                for bucket in self._buckets(group):
                    if id(bucket) not in stepped:
                        self._sync_tensors(bucket, tuple(range(len(bucket.params))), sync_rate)
        for group, bucket, active, grads, hyper, flags in work:
            all_active = len(active) == len(bucket.params)
            bucket.steps.add_(1.0 if all_active else self._active_mask(bucket, active))
            run = _Run(bucket, active, grads, hyper, flags, group["maximize"])
            if bucket.backend == "cpu":  # both passes, the C++ finalize between them, and the sync in the last pass
                tables = _cpu.step(bucket, active, run.grads, hyper, flags, run.maximize, type(self).cpu_rule,
                                   num_sums=self.num_sums, num_factors=len(self.factor_names), sync_rate=sync_rate)
                if tables is not None:
                    self._keep_cpu_tables(run, *tables)
            else:
                fused = bucket.backend == "triton"
                if fused:
                    self._build_tables(run)
                factors = None
                if self.num_sums:
                    factors = self._finalize(run, self._triton_prepare(run) if fused else self._reference_prepare(run))
                if fused:
                    self._triton_apply(run, factors, sync_rate)
                else:
                    self._reference_apply(run, factors)
                    if sync_rate is not None:
                        self._sync_tensors(bucket, run.active, sync_rate)
            if sync_rate is not None and not all_active:  # params without a gradient are synced too
                stepped_tensors = set(active)
                inactive = tuple(i for i in range(len(bucket.params)) if i not in stepped_tensors)
                self._sync_tensors(bucket, inactive, sync_rate)
        return loss

    def _finalize(self, run: _Run, sums: torch.Tensor) -> torch.Tensor:
        """Pass A's [segments, num_sums] sums -> pass B's factors, with the shared ``finalize`` (the Triton and
        reference paths; the C++ step runs its C++ counterpart, tested against it); updates the
        per-tensor states of the tensors that have a gradient and keeps sums and factors for ``last_factors``."""
        bucket = run.bucket
        factors, tensor_states = type(self).finalize(sums, bucket.steps, bucket.segments,
                                                     tuple(bucket.tensor_states.values()), *run.hyper, *run.flags)
        all_active = len(run.active) == len(bucket.params)
        for old, new in zip(bucket.tensor_states.values(), tensor_states, strict=True):
            old.copy_(new if all_active else torch.where(self._active_mask(bucket, run.active) > 0, new, old))
        bucket.sums, bucket.factors = sums, factors
        return factors

    def _keep_cpu_tables(self, run: _Run, sums: torch.Tensor, factors: torch.Tensor) -> None:
        """Keeps the C++ step's sums and factors for ``last_factors``. The C++ finalize wrote the factors of the
        tensors stepped; those of the others (and of their rows) are, as on the other paths, the shared
        ``finalize`` of their zero sums."""
        bucket = run.bucket
        if len(run.active) < len(bucket.params):
            segments = bucket.segments
            tensors = self._active_mask(bucket, run.active) > 0
            stepped = torch.cat([tensors, tensors[segments.row_tensor]])  # tensors, then each row as its tensor
            others, _ = type(self).finalize(sums, bucket.steps, segments, tuple(bucket.tensor_states.values()),
                                            *run.hyper, *run.flags)
            factors = torch.where(stepped[:, None], factors, others)
        bucket.sums, bucket.factors = sums, factors

    # ----------------------------------------------------------------- Lookahead support
    def attach_slow_weights(self) -> None:
        """Keep Lookahead's fp32 slow weights (``state[p]["slow_param"]``, initialised to the params) in this
        optimizer's flat buffers, so that a sync can run inside the step's last pass (``request_sync``)."""
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if "slow_param" not in self.state[p]:
                        self.state[p]["slow_param"] = p.detach().to(torch.promote_types(p.dtype, torch.float32))
        self._slow_attached = True
        for group in self.param_groups:
            self._buckets(group)

    def request_sync(self, sync_rate: torch.Tensor) -> None:
        """Make the next ``step()`` end with Lookahead's sync of every param at ``sync_rate`` (fp32[1], on the
        params' device): fused into the last pass for params with a gradient, a separate launch for others."""
        if not self._slow_attached:
            raise RuntimeError("attach_slow_weights() first")
        self._pending_sync = sync_rate

    @torch.no_grad()
    def sync_now(self, sync_rate: torch.Tensor) -> None:
        """Lookahead's sync of every param at ``sync_rate`` now, one launch per bucket."""
        for group in self.param_groups:
            for bucket in self._buckets(group):
                self._sync_tensors(bucket, tuple(range(len(bucket.params))), sync_rate)

    def _sync_tensors(self, bucket: Bucket, indices: tuple[int, ...], sync_rate: torch.Tensor) -> None:
        """slow ← slow + rate·(θ − slow); θ ← slow, for the listed tensors of a bucket."""
        if bucket.backend == "triton":
            run = _Run(bucket, indices, list(bucket.params), (), (), False)  # grads unread: the params' addresses
            self._build_tables(run)
            if bucket.num_chunks:
                self._launch(run, SYNC_PASS.rule, states=(), store_state=SYNC_PASS.store_state,
                         slow=bucket.states["slow_param"], sync_rate=sync_rate)
            return
        if bucket.backend == "cpu":
            _cpu.sync(bucket, indices, sync_rate)
            return
        for i in indices:
            p = bucket.params[i]
            slow = self.state[p]["slow_param"]
            slow.lerp_(p.detach().to(slow.dtype), sync_rate.to(slow.dtype).reshape(()))
            p.copy_(slow)

    def last_factors(self) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
        """The per-tensor factors of the last step (e.g. LAMB's trust ratios), as 0-d device tensors per param:
        views, so reading them never synchronises. Empty for elementwise rules and before the first step."""
        out: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for cached in self._layouts.values():
            for bucket in cached[1]:
                if bucket.factors is not None:
                    for i, p in enumerate(bucket.params):
                        out[p] = {name: bucket.factors[i, f] for f, name in enumerate(self.factor_names)}
        return out

    @staticmethod
    def _active_mask(bucket: Bucket, active: tuple[int, ...]) -> torch.Tensor:
        mask = bucket.active_masks.get(active)
        if mask is None:
            host = torch.zeros(len(bucket.params), dtype=torch.float32)
            host[list(active)] = 1.0
            mask = bucket.active_masks[active] = host.to(bucket.device)
            if len(bucket.active_masks) > 64:  # bound the cache when grad sets keep changing
                bucket.active_masks.pop(next(iter(bucket.active_masks)))
        return mask

    def _reference_inputs(self, run: _Run, i: int) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        p = run.bucket.params[i]
        state = self.state[p]
        dtype = torch.promote_types(run.bucket.dtype, torch.float32)
        grad = run.grads[i].to(dtype)
        return (p.detach().to(dtype), -grad if run.maximize else grad,
                tuple(state[name] for name in run.bucket.rule_state_names), state)

    def _reference_prepare(self, run: _Run) -> torch.Tensor:
        bucket, segments = run.bucket, run.bucket.segments
        sums = torch.zeros(segments.num_segments, self.num_sums, dtype=torch.float32, device=bucket.device)
        for i in run.active:
            param, grad, state_in, state = self._reference_inputs(run, i)
            new_state, terms = type(self).reference_prepare(param, grad, state_in, state["step"], *run.hyper,
                                                            *run.flags)
            if self.prepare_writes_state:
                for name, value in zip(bucket.rule_state_names, new_state, strict=True):
                    state[name].copy_(value)
            sums[i] = torch.stack([term.sum(dtype=torch.float32) for term in terms])
            row_length = segments.row_lengths[i]
            if row_length is not None:
                first = len(bucket.params) + segments.first_row[i]
                rows = torch.stack([term.reshape(-1, row_length).sum(1, dtype=torch.float32) for term in terms], 1)
                sums[first:first + rows.shape[0]] = rows
        return sums

    def _reference_apply(self, run: _Run, factors: torch.Tensor | None) -> None:
        bucket, segments = run.bucket, run.bucket.segments
        for i in run.active:
            param, grad, state_in, state = self._reference_inputs(run, i)
            shape = param.shape
            if factors is None:
                tensor_factors = ()
            elif segments.row_lengths[i] is None:
                tensor_factors = tuple(factors[i])
            else:  # per-row factors: the rule sees the tensor as [rows, row_length] and factors as [rows, 1]
                first = len(bucket.params) + segments.first_row[i]
                tensor_factors = tuple(factors[first:first + shape[0]].T[:, :, None])
                param, grad = param.reshape(shape[0], -1), grad.reshape(shape[0], -1)
                state_in = tuple(s.reshape(shape[0], -1) for s in state_in)
            param, new_state = type(self).reference_update(param, grad, state_in, state["step"], *tensor_factors,
                                                           *run.hyper, *run.flags)
            bucket.params[i].copy_(param.reshape(shape))
            for name, value in zip(bucket.rule_state_names, new_state, strict=True):
                state[name].copy_(value.reshape(shape))

    def _build_tables(self, run: _Run) -> None:
        """Refresh the bucket's device tables when a pointer or the set of tensors with a gradient changed."""
        from . import kernels

        bucket = run.bucket
        # Non-contiguous grads are read through a contiguous copy (grads are never written).
        run.grads = [g if g is None or g.is_contiguous() else g.contiguous() for g in run.grads]
        grad_ptrs = [0 if g is None else g.data_ptr() for g in run.grads]
        key = (run.active, tuple(bucket.param_ptrs), tuple(grad_ptrs))
        if key == bucket.table_key:
            return
        row_lengths = bucket.segments.row_lengths if bucket.segments is not None else None
        table = chunk_table(bucket.numels, run.active, kernels.block_size(bucket.dtype), row_lengths)
        host = torch.tensor(bucket.param_ptrs + grad_ptrs + bucket.offsets + table.segment_begin + table.segment_end
                            + table.chunk_tensor + table.chunk_start + table.chunk_end + table.chunk_segment,
                            dtype=torch.int64)
        if bucket.device.type == "cuda":  # one async H2D copy; the pinned block is recycled safely by torch
            host = host.pin_memory().to(bucket.device, non_blocking=True)
        bucket.tables, bucket.table_key = host, key
        bucket.num_chunks = len(table.chunk_tensor)
        bucket.sizes = (len(bucket.params), len(table.segment_begin), bucket.num_chunks)
        # 16-byte alignment of every address the aligned variant hints: params, grads, and chunk starts (rows of
        # a per-row rule start anywhere; 16 elements keep both fp32 state and 16-bit params aligned).
        bucket.aligned = (all(ptr % 16 == 0 for i in run.active for ptr in (bucket.param_ptrs[i], grad_ptrs[i]))
                          and all(start % 16 == 0 for start in table.chunk_start))

    def _launch(self, run: _Run, rule: tuple[str, str], states: Sequence[torch.Tensor] | None = None,
                **kwargs: Any) -> None:
        from . import kernels

        bucket = run.bucket
        if states is None:
            states = [bucket.states[name] for name in bucket.rule_state_names]
        kernels.launch_step(_kernel_rule(rule), run.flags, bucket.tables, bucket.sizes, bucket.steps, states,
                            run.hyper, bucket.dtype, run.maximize, bucket.aligned, **kwargs)

    def _triton_prepare(self, run: _Run) -> torch.Tensor:
        from . import kernels

        bucket = run.bucket
        sums = torch.zeros(bucket.sizes[1], self.num_sums, dtype=torch.float32, device=bucket.device)
        if bucket.num_chunks:
            prepare = self.kernel_passes()[0]
            partials = torch.empty(bucket.num_chunks, prepare.num_sums, dtype=torch.float32, device=bucket.device)
            self._launch(run, prepare.rule, partials=partials, store_param=prepare.store_param,
                         store_state=prepare.store_state)
            kernels.launch_segment_sum(partials, bucket.tables, bucket.sizes, sums)
        return sums

    def _triton_apply(self, run: _Run, factors: torch.Tensor | None, sync_rate: torch.Tensor | None = None) -> None:
        if run.bucket.num_chunks:
            apply = self.kernel_passes()[-1]
            slow = None if sync_rate is None else run.bucket.states["slow_param"]
            self._launch(run, apply.rule, factors=factors, store_param=apply.store_param,
                         store_state=apply.store_state, slow=slow, sync_rate=sync_rate)

    # ----------------------------------------------------------------- state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict (ours or torch's per-parameter format) into the flat fp32 buffers.

        Unlike ``torch.optim.Optimizer``, floating-point state is never cast to a low-precision param dtype, but
        for the ``param_dtype_states`` (copies of the gradient, e.g. Adan's ``prev_grad``), which live in it.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        if len(ids) != len(params):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             "optimizer's group")
        saved_state = state_dict["state"]
        adopted: dict[torch.Tensor, dict[str, Any]] = {}
        for pid, p in zip(ids, params, strict=True):
            if pid not in saved_state:
                continue
            entry = dict(saved_state[pid])
            for name, value in entry.items():
                per_tensor = name == "step" or name in self.tensor_state_names  # one value per param
                if isinstance(value, torch.Tensor) and not per_tensor and value.numel() != p.numel():
                    raise ValueError(f"state {name!r} of a param of shape {tuple(p.shape)} has "
                                     f"{value.numel()} elements in the loaded state dict")
            adopted[p] = entry
        # torch's loader checks the groups, runs the hooks and restores the hyperparameters; the state
        # goes around it because it would cast fp32 state down to bf16/fp16 params.
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        for p, entry in adopted.items():
            self.state[p] = entry
        self._layouts = {}
        for group in self.param_groups:  # adopt now, so `optimizer.state` shows the loaded values at once
            self._buckets(group)

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps defaults, state and param_groups; the flat buffers are rebuilt from `state`.
        return {**super().__getstate__(), "backend": self.backend, "_slow_attached": self._slow_attached}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._layouts = {}  # rebuilt, adopting `self.state`, at the next step
        self._pending_sync = None
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("_slow_attached", False)
        for group in self.param_groups:
            group.setdefault("maximize", False)


@dataclass
class _Run:
    """One bucket's work in one step."""

    bucket: Bucket
    active: tuple[int, ...]
    grads: list[torch.Tensor | None]
    hyper: tuple[float, ...]
    flags: tuple[bool, ...]
    maximize: bool


def _triton_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the Triton kernels can run for this device and dtype, else the reason."""
    try:
        from . import kernels
    except ImportError as exc:
        return f"triton is not importable ({exc}); install it with `pip install triton`"
    reason = kernels.device_ok(device)
    if reason is None and dtype not in kernels.SUPPORTED_DTYPES:
        reason = f"the Triton kernels support {[str(d) for d in kernels.SUPPORTED_DTYPES]} params, not {dtype}"
    return reason


def _cpu_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the C++ kernels can run for this device and dtype (building them on first use), else why not."""
    if device.type != "cpu":
        return f"the C++ kernels run on CPU tensors, not {device}"
    if dtype not in _cpu.SUPPORTED_DTYPES:
        return f"the C++ kernels support {[str(d) for d in _cpu.SUPPORTED_DTYPES]} params, not {dtype}"
    return _cpu.unavailable_reason()


#: Lookahead's standalone sync (``sync_now``, params without a gradient): the template's SYNC around a rule that
#: keeps the param. It reads no optimizer state, so it is launched with none: one specialisation for every base.
SYNC_PASS = KernelPass(("lookahead", "keep"), 0, 0, True, False, True)


def _kernel_rule(spec: tuple[str, str]) -> Any:
    module, name = spec
    return getattr(importlib.import_module(f"fusedoptim.kernels.{module}"), name)

