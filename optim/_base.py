"""FusedOptimizer: everything an optimizer needs that is not its update rule, written once.

Layers (one place each): the rule (``kernels/<name>.py`` for Triton, ``reference_update`` in
``fusedoptim/<name>.py`` for torch) → the multi-tensor template (``kernels/_template.py``) → the
launcher (``kernels/_launch.py``) → this class: validation, buckets, flat state, dispatch, state_dict.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from . import _cpu
from ._layout import chunk_table, padded_offsets

Backend = Literal["auto", "triton", "cpu", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "cpu", "reference")


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
    state_names: tuple[str, ...]
    numels: list[int]
    offsets: list[int]
    states: dict[str, torch.Tensor]
    steps: torch.Tensor
    param_ptrs: list[int]
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
    cpu_rule: ClassVar[str]  # the C++ rule: `<cpu_rule>_step` of the extension built from csrc/
    reference_update: ClassVar[Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, ...]]]]

    def __init__(self, params: ParamsT, defaults: dict[str, Any], *, backend: Backend = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self._layouts: dict[int, tuple[tuple, list[Bucket]]] = {}
        super().__init__(params, defaults)

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

    def bytes_per_param(self, group: dict[str, Any], param_dtype: torch.dtype) -> int:
        """Bytes a minimal fused step moves per parameter element of ``group`` (the benchmarks' bytes model):
        read and write the param, read the grad, read and write every state (fp32, or fp64 for fp64 params).

        E.g. AdaBelief on fp32 params: 3 x 4 + 2 states x 2 x 4 = 28 B, torch's fused AdamW figure.
        """
        param_bytes = torch.empty(0, dtype=param_dtype).element_size()
        state_bytes = torch.empty(0, dtype=torch.promote_types(param_dtype, torch.float32)).element_size()
        return 3 * param_bytes + 2 * state_bytes * len(self._state_names(group))

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
            reason = _cpu_unavailable(device, dtype)
            if reason is not None:
                raise RuntimeError(f"{type(self).__name__}(backend='cpu') cannot run here: {reason}")
            return "cpu"
        # auto: CUDA tensors run the Triton kernels; CPU tensors the C++ kernels, or the reference (one warning
        # per process) when they cannot be built; dtypes neither supports (fp64) run the reference.
        if device.type == "cuda" and _triton_unavailable(device, dtype) is None:
            return "triton"
        if device.type == "cpu" and dtype in _cpu.SUPPORTED_DTYPES:
            reason = _cpu.unavailable_reason()
            if reason is None:
                return "cpu"
            _cpu.warn_fallback_once(reason)
        return "reference"

    # ----------------------------------------------------------------- layout
    def _buckets(self, group: dict[str, Any]) -> list[Bucket]:
        """The group's buckets, built on first use and rebuilt (state adopted) when the params change."""
        params: list[torch.Tensor] = group["params"]
        names = self._state_names(group)
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
        buckets = self._build_buckets(params, names)
        self._layouts[id(group)] = (key, buckets)
        return buckets

    def _build_buckets(self, params: Sequence[torch.Tensor], names: tuple[str, ...]) -> list[Bucket]:
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
            state_dtype = torch.promote_types(dtype, torch.float32)
            numels = [p.numel() for p in members]
            offsets, total = padded_offsets(numels)
            states = {name: torch.zeros(total, dtype=state_dtype, device=device) for name in names}
            steps = torch.zeros(len(members), dtype=torch.float32, device=device)
            bucket = Bucket(members, dtype, device, backend, names, numels, offsets, states, steps,
                            [p.data_ptr() for p in members])
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
        # Phase 2: advance the steps of tensors that have a gradient, then apply the rule.
        for group, bucket, active, grads, hyper, flags in work:
            if len(active) == len(bucket.params):
                bucket.steps.add_(1.0)
            else:
                bucket.steps.add_(self._active_mask(bucket, active))
            if bucket.backend == "triton":
                self._triton_step(bucket, active, grads, hyper, flags, group["maximize"])
            elif bucket.backend == "cpu":
                _cpu.step(bucket, active, grads, hyper, flags, group["maximize"], type(self).cpu_rule)
            else:
                self._reference_step(bucket, active, grads, hyper, flags, group["maximize"])
        return loss

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

    def _reference_step(self, bucket: Bucket, active: tuple[int, ...], grads: list, hyper: tuple,
                        flags: tuple, maximize: bool) -> None:
        state_dtype = torch.promote_types(bucket.dtype, torch.float32)
        for i in active:
            p = bucket.params[i]
            state = self.state[p]
            grad = grads[i].to(state_dtype)
            param, new_state = type(self).reference_update(
                p.detach().to(state_dtype), -grad if maximize else grad,
                tuple(state[name] for name in bucket.state_names), state["step"], *hyper, *flags)
            p.copy_(param)
            for name, value in zip(bucket.state_names, new_state, strict=True):
                state[name].copy_(value)

    def _triton_step(self, bucket: Bucket, active: tuple[int, ...], grads: list, hyper: tuple,
                     flags: tuple, maximize: bool) -> None:
        from . import kernels

        # Non-contiguous grads are read through a contiguous copy (grads are never written).
        staged = [g if g is None or g.is_contiguous() else g.contiguous() for g in grads]
        grad_ptrs = [0 if g is None else g.data_ptr() for g in staged]
        key = (active, tuple(bucket.param_ptrs), tuple(grad_ptrs))
        if key != bucket.table_key:
            block = kernels.block_size()
            chunk_tensor, chunk_start = chunk_table(bucket.numels, active, block)
            host = torch.tensor(bucket.param_ptrs + grad_ptrs + bucket.offsets + bucket.numels
                                + chunk_tensor + chunk_start, dtype=torch.int64)
            if bucket.device.type == "cuda":  # one async H2D copy; the pinned block is recycled safely by torch
                host = host.pin_memory().to(bucket.device, non_blocking=True)
            bucket.tables, bucket.num_chunks, bucket.table_key = host, len(chunk_tensor), key
            bucket.aligned = all(ptr % 16 == 0 for i in active for ptr in (bucket.param_ptrs[i], grad_ptrs[i]))
        if bucket.num_chunks == 0:
            return
        kernels.launch_step(
            _kernel_rule(type(self).kernel_rule), flags, bucket.tables, len(bucket.params), bucket.num_chunks,
            bucket.steps, [bucket.states[name] for name in bucket.state_names], hyper, bucket.dtype, maximize,
            bucket.aligned)

    # ----------------------------------------------------------------- state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict (ours or torch's per-parameter format) into the flat fp32 buffers.

        Unlike ``torch.optim.Optimizer``, floating-point state is never cast to a low-precision param dtype.
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
                if isinstance(value, torch.Tensor) and name != "step" and value.numel() != p.numel():
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
        return {**super().__getstate__(), "backend": self.backend}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._layouts = {}  # rebuilt, adopting `self.state`, at the next step
        self.__dict__.setdefault("backend", "auto")
        for group in self.param_groups:
            group.setdefault("maximize", False)


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


def _kernel_rule(spec: tuple[str, str]) -> Any:
    module, name = spec
    return getattr(importlib.import_module(f"fusedoptim.kernels.{module}"), name)

