"""FusedOptimizer: everything an optimizer needs that is not its update rule, written once.

Layers (one place each): the rule (``kernels/<name>.py`` for Triton, ``csrc/<name>.h`` for C++, ``optim/<name>.py``
for torch, declared once as a ``Rule``) → the multi-tensor template (``kernels/_template.py``, csrc/multi_tensor.h)
→ the launcher (``kernels/_launch.py``) → the executor of each backend (``_reference.py``, ``_triton.py``,
``_cpu.py``) → this class: validation, param groups, the flat layout, step orchestration, state_dict.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from ._backends import BACKENDS, Backend, Run, select
from ._distributed import Sharding, check_grad, local, sharding_of
from ._layout import Bucket, adopt_state, build_bucket, byte_span
from ._rule import Rule

#: Set while a group's hyperparameters are checked by building an optimizer on them (its own groups need no check).
_CHECKING_GROUP = [False]


def _share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two views of one storage address a common element (their spans intersect: the caller checked).
    Dense views whose spans intersect always do; views with gaps (e.g. a matrix's even and odd columns) are
    compared element by element."""
    from ._layout import memory_strides, same_memory_order

    if same_memory_order(a, memory_strides(a)) and same_memory_order(b, memory_strides(b)):
        return True  # each fills its span

    def offsets(t: torch.Tensor) -> torch.Tensor:
        base = t.storage_offset() * t.element_size()
        index = torch.zeros((), dtype=torch.int64)
        for n, st in zip(t.shape, t.stride(), strict=True):
            index = (index.unsqueeze(-1) + torch.arange(n) * st * t.element_size()).reshape(-1)
        return index + base
    first, second = offsets(a), offsets(b)
    return bool(torch.isin(first, second).any()) if first.numel() and second.numel() else False


class FusedOptimizer(Optimizer):
    """Base class of the fused optimizers.

    A subclass declares its ``rule`` (a ``Rule`` or ``TwoPassRule``: states, and the rule's Triton, C++ and torch
    forms) and how a param group turns into the rule's runtime scalars (``_hyper``) and structural options
    (``_flags``).

    Semantics shared by all optimizers:

    - State is fp32 for fp32/bf16/fp16 params (fp64 for fp64 params) and lives in one flat buffer per
      state name and bucket (param group x dtype); ``state[p]`` holds views, so ``state_dict()`` has
      torch's per-parameter format.
    - Step counts are per tensor: a param whose ``.grad`` is None is skipped and its step does not advance.
    - ``maximize=True`` ascends; ``p.grad`` is never modified.
    - All params of one param group must be on one device; a group may mix dtypes.
    - DTensor params (FSDP2): the kernels run on the local shards, per-tensor statistics are summed over the shards
      (one all-reduce per two-pass bucket per step) and state is DTensor like the param (``_distributed.py``).
    - ``torch.amp.GradScaler`` hands ``step()`` its scale and found_inf instead of unscaling the grads itself
      (``_step_supports_amp_scaling``): the kernels unscale the grads as they read them, and a step with an inf or
      NaN grad is skipped (params, states and steps unchanged). On the Triton path the skip is decided on the device
      with no host sync; the C++ path reads found_inf on the host (a CPU tensor: no sync), the reference selects on the
      device.
    """

    rule: ClassVar[Rule]
    _step_supports_amp_scaling: ClassVar[bool] = True
    #: Param groups are checked with the constructor's own checks wherever they enter (add_param_group, a loaded
    #: state_dict, a group changed before step()).
    _validates_groups: ClassVar[bool] = True

    def __init__(self, params: ParamsT, defaults: dict[str, Any], *, backend: Backend = "auto",
                 capturable: bool = False) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(capturable, bool):
            raise ValueError(f"capturable must be True or False, got {capturable!r}")
        self.backend = backend
        self.capturable = capturable
        self._checked_groups: dict[int, tuple] = {}  # id(group) -> the hyperparameters last found valid
        self._layouts: dict[int, tuple[tuple, list[Bucket]]] = {}
        self._slow_attached = False  # a Lookahead keeps its slow weights in our buckets (attach_slow_weights)
        self._pending_sync: torch.Tensor | None = None
        super().__init__(params, defaults)
        self._register()

    def _register(self) -> None:
        from . import _compile

        _compile.register(self)  # how a compiled step's op finds this optimizer

    # ----------------------------------------------------------------- what a param group means to the rule
    def _hyper(self, group: dict[str, Any]) -> tuple[float, ...]:
        """Runtime scalars of the rule, in its argument order (fp32-rounded, computed in fp64)."""
        raise NotImplementedError

    def _flags(self, group: dict[str, Any]) -> tuple[bool, ...]:
        """Structural options of the rule (``tl.constexpr`` in the kernel)."""
        return ()

    def group_scalars(self, group: dict[str, Any]) -> tuple[tuple[float, ...], tuple[bool, ...]]:
        """The rule's runtime scalars and structural flags for ``group``, as every backend receives them."""
        return self._hyper(group), self._flags(group)

    def group_state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The flat state buffers of ``group``, in the rule's argument order (optional ones, e.g. amsgrad's)."""
        return self.rule.state_names(group)

    def state_dtype(self, name: str, param_dtype: torch.dtype) -> torch.dtype:
        """The dtype of state ``name`` for params of ``param_dtype``: fp32 (fp64 for fp64 params), or the param
        dtype for the rule's ``param_dtype_states``."""
        return self.rule.state_dtype(name, param_dtype)

    def bytes_per_param(self, group: dict[str, Any], param_dtype: torch.dtype) -> int:
        """Bytes a minimal fused step moves per parameter element of ``group`` (docs/design.md#bytes-model): read
        and write the param, read the grad, read and write every state (in its ``state_dtype``).

        E.g. AdaBelief on fp32 params: 3 x 4 + 2 states x 2 x 4 = 28 B, torch's fused AdamW figure.
        """
        param_bytes = torch.empty(0, dtype=param_dtype).element_size()
        return 3 * param_bytes + sum(2 * torch.empty(0, dtype=self.state_dtype(name, param_dtype)).element_size()
                                     for name in self.group_state_names(group))

    # ----------------------------------------------------------------- param groups and layout
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
        self._check_disjoint(params)
        self._check_group({**self.defaults, **param_group}, len(getattr(self, "param_groups", [])), cache=False)
        for p in params:
            if isinstance(p, torch.Tensor):
                sharding_of(p, type(self).__name__)  # a DTensor placement we cannot run: ValueError, on every rank
                if self.backend != "auto":  # a named backend refuses at once what it cannot run (without building)
                    select(self.backend, self.rule, p.device, p.dtype, type(self).__name__, build=False)
        super().add_param_group(param_group)
        if self.capturable:
            self._device_lr(self.param_groups[-1])
        self._checked_groups[id(self.param_groups[-1])] = self._group_key(self.param_groups[-1])

    @classmethod
    def _hyper_names(cls) -> tuple[str, ...]:
        """The constructor's hyperparameters: what a param group may set (lr, betas, ...)."""
        names = cls.__dict__.get("_hyper_names_cache")
        if names is None:
            skip = ("self", "params", "backend", "capturable")
            names = tuple(name for name in inspect.signature(cls.__init__).parameters if name not in skip)
            cls._hyper_names_cache = names
        return names

    def _group_key(self, group: dict[str, Any]) -> tuple:
        # tensors by identity (one filled in place is never read again), in tuples too (tensor betas): comparing
        # tensors by value would read them on the host
        return tuple(id(v) if isinstance(v, torch.Tensor)
                     else tuple(id(x) if isinstance(x, torch.Tensor) else x for x in v) if isinstance(v, tuple)
                     else v for v in map(group.get, self._hyper_names()))

    def _check_group(self, group: dict[str, Any], index: int, *, cache: bool = True) -> None:
        """ValueError naming the group unless its hyperparameters pass the constructor's checks (it is built on a
        1-element param with them). The values last found valid are kept per group, so an unchanged group costs a
        tuple comparison (a tensor lr counts by identity: one a scheduler fills in place is never re-read)."""
        if not self._validates_groups or _CHECKING_GROUP[0]:
            return
        key = self._group_key(group)
        if cache and self._checked_groups.get(id(group)) == key:
            return
        names = [name for name in self._hyper_names() if name in group]
        _CHECKING_GROUP[0] = True
        try:
            type(self)([torch.zeros(1)], **{name: group[name] for name in names})
        except (ValueError, TypeError) as e:
            raise type(e)(f"{type(self).__name__}: param group {index}: {e}") from None
        finally:
            _CHECKING_GROUP[0] = False
        if cache:
            self._checked_groups[id(group)] = key

    def _check_disjoint(self, new: list[Any]) -> None:
        """No param twice, and no two params sharing memory (views of one tensor that overlap): the kernels would
        update the shared elements twice, and the C++ threads race on them (identical runs differed by 0.049)."""
        owner = type(self).__name__
        tensors = [p for p in new if isinstance(p, torch.Tensor)]
        if len({id(p) for p in tensors}) != len(tensors):
            raise ValueError(f"{owner}: a param group lists the same tensor twice")
        old = [p for group in getattr(self, "param_groups", []) for p in group["params"]]
        olds = {id(p) for p in old}
        if any(id(p) in olds for p in tensors):
            raise ValueError(f"{owner}: some parameters appear in more than one parameter group")
        spans: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
        for p in old + tensors:
            t = local(p)
            if t.numel() == 0 or t.device.type == "meta":
                continue
            spans.setdefault(t.untyped_storage().data_ptr(), []).append((*byte_span(t), t))
        for entries in spans.values():  # a sweep: each span against the earlier ones it starts inside of
            entries.sort(key=lambda e: e[0])
            active: list[tuple[int, torch.Tensor]] = []
            for begin, end, t in entries:
                active = [(e, u) for e, u in active if e > begin]
                for _, u in active:
                    if _share_elements(u, t):
                        raise ValueError(f"{owner}: two params share memory (views of one tensor, of shapes "
                                         f"{tuple(u.shape)} and {tuple(t.shape)}): each step would update the "
                                         "shared elements twice. Pass disjoint tensors")
                active.append((end, t))

    def _device_lr(self, group: dict[str, Any]) -> None:
        """capturable: the group's lr as a 0-d fp32 tensor on its params' device, which a scheduler fills in place
        and a captured graph reads at each replay (a float would be baked into the graph)."""
        lr, params = group["lr"], group["params"]
        device = params[0].device if params else torch.device("cpu")
        if not isinstance(lr, torch.Tensor):
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
        elif lr.device != device or lr.dtype != torch.float32:
            raise ValueError(f"{type(self).__name__}(capturable=True): a tensor lr must be an fp32 tensor on the "
                             f"params' device ({device}), got {lr.dtype} on {lr.device}: a copy at each step would "
                             "be a host-to-device transfer inside the graph")

    def _buckets(self, group: dict[str, Any]) -> list[Bucket]:
        """The group's buckets, built on first use and rebuilt (state adopted) when the params change."""
        params: list[torch.Tensor] = group["params"]
        cached = self._layouts.get(id(group))
        # addresses of the local tensors (DTensors: their shards); plain tensors read theirs directly
        plain = cached is not None and all(b.sharding is None for b in cached[1])
        tensors = params if plain else [local(p) for p in params]
        names = self.group_state_names(group) + (("slow_param",) if self._slow_attached else ())
        # map, not a generator: the per-tensor loop stays in C (161 tensors: 16-19 µs instead of 33-36, measured)
        key = (names, tuple(map(torch.Tensor.data_ptr, tensors)), tuple(map(id, params)))
        if cached is not None and cached[0] == key:
            return cached[1]
        if cached is not None and self.capturable:
            raise RuntimeError(f"{type(self).__name__}(capturable=True): a param of this group moved (new storage, "
                               "e.g. `p.data = ...`) or the group's params changed since its buckets were laid out; "
                               "a captured step would write the old addresses. Keep params in place, or build a "
                               "new optimizer")
        if cached is not None and cached[0][0] == names and cached[0][2] == key[2]:
            # Same params with new storage (e.g. `p.data = ...`): keep the layout if it still fits.
            buckets = cached[1]
            if all(local(p).dtype == b.dtype and local(p).device == b.device and local(p).numel() == b.numels[i]
                   and local(p).stride() == b.tensors[i].stride() for b in buckets for i, p in enumerate(b.params)):
                for b in buckets:
                    b.tensors = [local(p) for p in b.params]
                    b.param_ptrs = [t.data_ptr() for t in b.tensors]
                self._layouts[id(group)] = (key, buckets)
                return buckets
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"all params of one param group must be on one device, got {sorted(map(str, devices))}")
        owner = type(self).__name__
        members: dict[tuple, list[torch.Tensor]] = {}  # a bucket per dtype and distribution
        shardings: dict[tuple, Sharding | None] = {}
        for p in params:
            sharding = sharding_of(p, owner)
            bucket_key = (p.dtype, None if sharding is None else sharding.key)
            members.setdefault(bucket_key, []).append(p)
            shardings.setdefault(bucket_key, sharding)
        buckets = []
        for bucket_key, bucket_params in members.items():  # pick and check every backend before adopting any state
            first = local(bucket_params[0])
            chosen = select(self.backend, self.rule, first.device, first.dtype, owner)
            buckets.append(build_bucket(bucket_params, shardings[bucket_key], chosen, self.rule, names,
                                        self.group_state_names(group)))
            chosen.prepare_bucket(buckets[-1])
        for bucket in buckets:
            adopt_state(bucket, self.state)
        self._layouts[id(group)] = (key, buckets)
        return buckets

    def bucket_layout(self) -> list[Bucket]:
        """The buckets (param group x dtype) in group order: their params, flat state buffers, segment offsets,
        step counts and backend (``fusedoptim._layout.Bucket``). Laid out now if a group has not been yet."""
        return [bucket for group in self.param_groups for bucket in self._buckets(group)]

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
        if torch.compiler.is_compiling():  # one custom op, traced with its inputs (optim/_compile.py)
            self._compiled_step()
        else:
            self._eager_step()
        return loss

    def _compiled_step(self) -> None:
        """The step under torch.compile: one ``fusedoptim::step`` op over what Dynamo can see (optim/_compile.py).
        The flat buffers exist once the buckets are laid out (the first step, eager or compiled: the one
        recompile of a warm-up)."""
        from . import _compile

        _compile.compiled_step(self)

    def _written_tensors(self) -> list[torch.Tensor]:
        """What a step writes besides the params (the op declares them mutated): the flat buffers."""
        return self.flat_buffers()

    def flat_buffers(self) -> list[torch.Tensor]:
        """Every flat buffer a step may write, bucket by bucket: the states (Lookahead's slow weights included), the
        step counts and the per-tensor states; none before the buckets are laid out."""
        buffers = []
        for cached in self._layouts.values():
            for bucket in cached[1]:
                buffers.extend(bucket.states.values())
                buffers.append(bucket.steps)
                buffers.extend(bucket.tensor_states.values())
        return buffers

    def _eager_step(self, amp: tuple[torch.Tensor | None, torch.Tensor | None] | None = None) -> None:
        """The step (``amp``: GradScaler's scale and found_inf as a compiled step's op received them; None: read
        off the optimizer, where GradScaler sets them)."""
        # Phase 1: everything that can fail, before any param or state is written.
        amp = self._amp_inputs(*(amp or ()))
        runs: list[Run] = []
        for index, group in enumerate(self.param_groups):
            self._check_group(group, index)  # a group changed since the last step: the constructor's checks
            lr = group["lr"]
            tensor_lr = isinstance(lr, torch.Tensor)
            hyper, flags = self.group_scalars({**group, "lr": 0.0} if tensor_lr else group)  # never lr.item()
            # betas given as tensors: their scalars (beta, log beta) are 0-d tensors, computed on their device
            tensor_hyper = [i for i, h in enumerate(hyper) if isinstance(h, torch.Tensor)]
            for bucket in self._buckets(group):
                grads = [p.grad for p in bucket.params]
                active = tuple(i for i, g in enumerate(grads) if g is not None)
                if not active:
                    continue
                tensors, dtype, device = bucket.tensors, bucket.dtype, bucket.device
                if bucket.sharding is not None:  # DTensor grads: the full check, which also takes their shards
                    for i in active:
                        grads[i] = self._checked_grad(bucket, i, grads[i])
                else:  # the usual grad in a few attribute reads; anything else gets the full check
                    for i in active:
                        g = grads[i]
                        if not (g.__class__ is torch.Tensor and g.layout is torch.strided and g.dtype is dtype
                                and g.device == device and g.shape == tensors[i].shape):
                            grads[i] = self._checked_grad(bucket, i, g)
                run = Run(bucket, self.rule, active, grads, hyper, flags, group["maximize"])
                if tensor_hyper:
                    run.lr = self._hyper_on(bucket.device, lr if tensor_lr else None, hyper, tensor_hyper)
                    run.hyper = tuple(run.lr[i] if i in tensor_hyper or (i == 0 and tensor_lr) else h
                                      for i, h in enumerate(hyper))
                elif tensor_lr:
                    run.lr = self._lr_on(bucket.device, lr)
                    run.hyper = (run.lr.reshape(()), *hyper[1:])
                bucket.executor.check_run(run, type(self).__name__, self.capturable)
                if amp is not None:
                    run.grad_scale, run.found_inf = self._amp_on(bucket.device, *amp)
                runs.append(run)
        # Phase 2: each executor advances the steps of the tensors that have a gradient and runs the passes.
        sync_rate, self._pending_sync = self._pending_sync, None
        if sync_rate is not None:  # buckets without any gradient still take part in Lookahead's sync
            stepped = {id(run.bucket) for run in runs}
            for bucket in self.bucket_layout():
                if id(bucket) not in stepped:
                    bucket.executor.sync(bucket, tuple(range(len(bucket.params))), sync_rate.to(bucket.device))
        for run in runs:
            bucket = run.bucket
            all_active = len(run.active) == len(bucket.params)
            run.sync_rate = None if sync_rate is None else sync_rate.to(bucket.device)
            bucket.executor.step(run)
            if sync_rate is not None and not all_active:  # params without a gradient are synced too
                inactive = tuple(sorted(set(range(len(bucket.params))) - set(run.active)))
                bucket.executor.sync(bucket, inactive, run.sync_rate)

    def _amp_inputs(self, *given: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
        """``torch.amp.GradScaler`` sets ``grad_scale`` (None once the grads were unscaled by ``unscale_``) and
        ``found_inf`` on an optimizer that declares ``_step_supports_amp_scaling`` before calling ``step()``
        (``given``: the two as a compiled step's op received them)."""
        if given:
            grad_scale, found_inf = given
        else:
            grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if grad_scale is None and found_inf is None:
            return None
        for name, value in (("grad_scale", grad_scale), ("found_inf", found_inf)):
            if value is not None and not (isinstance(value, torch.Tensor) and value.numel() == 1
                                          and value.is_floating_point()):
                raise TypeError(f"{type(self).__name__}: {name} (set by torch.amp.GradScaler) must be a 1-element "
                                f"floating-point tensor, got {value!r}")
        return grad_scale, found_inf

    def _amp_on(self, device: torch.device, grad_scale: torch.Tensor | None,
                found_inf: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """GradScaler's scale and found_inf as fp32[1] on ``device`` (views when they are there already, as
        GradScaler puts them); a missing one is a cached 1 or 0, so that no step fills a new tensor."""
        constants = self.__dict__.setdefault("_amp_constants", {})
        if device not in constants:
            constants[device] = (torch.ones(1, device=device), torch.zeros(1, device=device))
        one, zero = constants[device]
        scale = one if grad_scale is None else grad_scale.to(device, torch.float32, non_blocking=True).reshape(1)
        found = zero if found_inf is None else found_inf.to(device, torch.float32, non_blocking=True).reshape(1)
        return scale, found

    def _lr_on(self, device: torch.device, lr: torch.Tensor) -> torch.Tensor:
        """A tensor lr as the kernels read it: fp32[1] on ``device``, a view when it is one already (the usual
        torch.compile and CUDA-graph recipe: an fp32 0-d tensor on the params' device, which a scheduler updates in
        place); otherwise a copy made on the device (a CPU lr for CUDA params: an async host-to-device copy). The
        group check (``_check_group``, check_lr) has refused any other than a 1-element floating-point tensor."""
        return lr.detach().to(device, torch.float32, non_blocking=True).reshape(1)

    def _hyper_on(self, device: torch.device, lr: torch.Tensor | None, hyper: tuple[float | torch.Tensor, ...],
                  positions: list[int]) -> torch.Tensor:
        """Every runtime scalar as fp32[H] on ``device``, as the kernels read them when a hyperparameter besides
        the lr is a tensor (betas): the float ones from a device copy kept per value (made by one asynchronous copy:
        with tensor betas a float lr changed every step costs one such copy a step), the tensor lr and the tensors'
        scalars written over them on the device. No host read; a few small ops a step."""
        floats = tuple(0.0 if isinstance(h, torch.Tensor) else h for h in hyper)
        written = tuple(([0] if lr is not None else []) + positions)
        constants = self.__dict__.setdefault("_hyper_constants", {})
        cached = constants.get((device, floats, written))
        if cached is None:
            if len(constants) >= 16:  # a float lr scheduled beside tensor betas: keep the recent few
                constants.clear()
            host = torch.tensor(floats, dtype=torch.float32)
            index = torch.tensor(written, dtype=torch.int64)
            if device.type == "cuda":  # asynchronous from pinned memory, as the tables go
                host, index = host.pin_memory(), index.pin_memory()
            cached = constants[(device, floats, written)] = (host.to(device, non_blocking=True),
                                                             index.to(device, non_blocking=True))
        base, index = cached
        values = [hyper[i].to(device, non_blocking=True) for i in positions]
        if lr is not None:
            values.insert(0, self._lr_on(device, lr).reshape(()))
        return base.index_put((index,), torch.stack(values))

    def _checked_grad(self, bucket: Bucket, i: int, grad: torch.Tensor) -> torch.Tensor:
        """Param i's local gradient, checked as every kernel needs it before anything is written: dense, the
        param's dtype, shape and device (a Triton kernel would read a smaller one out of bounds)."""
        owner = type(self).__name__
        if grad.is_sparse or grad.layout != torch.strided:
            raise RuntimeError(f"{owner} does not support sparse gradients")
        grad = check_grad(bucket.params[i], grad, owner)
        tensor = bucket.tensors[i]
        if grad.dtype != tensor.dtype or grad.shape != tensor.shape or grad.device != tensor.device:
            raise ValueError(f"{owner}: the gradient of a param of shape {tuple(tensor.shape)}, {tensor.dtype} on "
                             f"{tensor.device} has shape {tuple(grad.shape)}, {grad.dtype} on {grad.device}; it "
                             "must match its param")
        return grad

    def last_factors(self) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
        """The per-tensor factors of the last step (e.g. LAMB's trust ratios), as 0-d device tensors per param:
        views, so reading them never synchronises. Empty for elementwise rules and before the first step."""
        out: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for cached in self._layouts.values():
            for bucket in cached[1]:
                if bucket.factors is not None:
                    for i, p in enumerate(bucket.params):
                        out[p] = {name: bucket.factors[i, f] for f, name in enumerate(self.rule.factor_names)}
        return out

    # ----------------------------------------------------------------- Lookahead support
    def attach_slow_weights(self) -> None:
        """Keep Lookahead's fp32 slow weights (``state[p]["slow_param"]``, initialised to the params) in this
        optimizer's flat buffers, so that a sync can run inside the step's last pass (``fused_sync``)."""
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if "slow_param" not in self.state[p]:
                        self.state[p]["slow_param"] = p.detach().to(torch.promote_types(p.dtype, torch.float32))
        self._slow_attached = True
        self.bucket_layout()

    @contextlib.contextmanager
    def fused_sync(self, sync_rate: torch.Tensor) -> Iterator[None]:
        """Within the block, the next ``step()`` ends with Lookahead's sync of every param at ``sync_rate``
        (fp32[1], on the params' device): fused into the last pass for params with a gradient, a separate launch
        for the others. A step that fails, or no step, syncs nothing."""
        if not self._slow_attached:
            raise RuntimeError("attach_slow_weights() first")
        self._pending_sync = sync_rate
        try:
            yield
        finally:
            self._pending_sync = None

    @torch.no_grad()
    def sync_now(self, sync_rate: torch.Tensor) -> None:
        """Lookahead's sync of every param at ``sync_rate`` now, one launch per bucket."""
        for bucket in self.bucket_layout():
            bucket.executor.sync(bucket, tuple(range(len(bucket.params))), sync_rate.to(bucket.device))

    # ----------------------------------------------------------------- state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict (ours or torch's per-parameter format) into the flat fp32 buffers.

        Unlike ``torch.optim.Optimizer``, floating-point state is never cast to a low-precision param dtype, but
        for the rule's ``param_dtype_states`` (copies of the gradient, e.g. Adan's ``prev_grad``), which live in it.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(self.param_groups, saved_groups, strict=True)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             "optimizer's group")
        saved_state = state_dict["state"]
        adopted: dict[torch.Tensor, dict[str, Any]] = {}
        # Everything is checked before anything changes: the groups' hyperparameters, and each param's entry.
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            self._check_group(merged, index, cache=False)
            for pid, p in zip(saved["params"], group["params"], strict=True):
                if pid in saved_state:
                    adopted[p] = self._checked_entry(saved_state[pid], p, merged, pid)
        # torch's loader runs the hooks and restores the hyperparameters; the state goes around it because it
        # would cast fp32 state down to bf16/fp16 params. New buckets adopt the entries; should anything still
        # fail, the old groups, state and buckets (whose buffers nothing has written) are put back.
        before = self.param_groups, self.state, self._layouts, self._checked_groups
        try:
            super().load_state_dict({"state": {}, "param_groups": saved_groups})
            for p, entry in adopted.items():
                self.state[p] = entry
            self._layouts, self._checked_groups = {}, {}
            if self.capturable:
                for group in self.param_groups:
                    self._device_lr(group)
            self.bucket_layout()  # adopt now, so `optimizer.state` shows the loaded values at once
        except BaseException:
            self.param_groups, self.state, self._layouts, self._checked_groups = before
            raise

    def _checked_entry(self, entry: Any, p: torch.Tensor, group: dict[str, Any], pid: Any) -> dict[str, Any]:
        """A loaded state entry, checked as every backend will read it: a KeyError naming the param and the key
        when a state the rule needs (or ``step``) is missing, as torch's optimizers raise at their next step
        (zero-filling it would silently restart that moment); a ValueError for a wrong type or size."""
        owner, shape = type(self).__name__, tuple(p.shape)
        if not isinstance(entry, dict):
            raise ValueError(f"{owner}: the state of param {pid!r} (shape {shape}) must be a dict, got "
                             f"{type(entry).__name__}")
        if not entry:
            return {}
        per_tensor = self.rule.tensor_states if self.rule.two_pass else ()
        for name in ("step", *self.group_state_names(group), *per_tensor):
            if name not in entry:
                raise KeyError(f"{owner}: the loaded state of param {pid!r} (shape {shape}) has no {name!r}")
        out = dict(entry)
        for name, value in entry.items():
            scalar = name == "step" or name in per_tensor
            if scalar:
                number = value.reshape(()) if isinstance(value, torch.Tensor) and value.numel() == 1 else value
                if isinstance(number, torch.Tensor):
                    number = number.item()  # a loaded value, read once on the host: loading is not a step
                if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
                        or (name == "step" and number < 0):
                    raise ValueError(f"{owner}: the loaded {name!r} of param {pid!r} (shape {shape}) must be a "
                                     f"finite{' non-negative' if name == 'step' else ''} number or 1-element "
                                     f"tensor, got {value!r}")
            elif isinstance(value, torch.Tensor):
                if value.numel() != p.numel() and local(value).numel() != local(p).numel():  # whole, or the shard
                    raise ValueError(f"state {name!r} of a param of shape {shape} has {value.numel()} elements in "
                                     "the loaded state dict")
                if not value.is_floating_point():
                    raise ValueError(f"{owner}: the loaded {name!r} of param {pid!r} (shape {shape}) is "
                                     f"{value.dtype}, not floating point")
        return out

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps defaults, state and param_groups; the flat buffers are rebuilt from `state`.
        return {**super().__getstate__(), "backend": self.backend, "_slow_attached": self._slow_attached,
                "capturable": self.capturable}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._layouts = {}  # rebuilt, adopting `self.state`, at the next step
        self._pending_sync = None
        self._register()
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("_slow_attached", False)
        self.__dict__.setdefault("capturable", False)
        self._checked_groups = {}
        for group in self.param_groups:
            group.setdefault("maximize", False)
