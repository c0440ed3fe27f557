"""Lookahead (Zhang et al., 2019, https://arxiv.org/abs/1907.08610) and holocron's Scout, around any optimizer.

One shared wrapper base: the wrapper's ``param_groups`` ARE the base's (an LR scheduler or GradScaler on the
wrapper acts on the real learning rate) and its ``defaults`` show the base's (OneCycleLR finds ``betas`` or
``momentum``), ``zero_grad`` delegates, ``add_param_group`` extends the slow weights, and ``state_dict`` is the
base's with the slow weights in each param's state and the counters in each param group: the two parts of an
optimizer state_dict that ``torch.distributed.checkpoint`` keeps.

The slow weights live in flat fp32 buffers laid out like optimizer state: in the base's own buckets when the
base is a fusedoptim optimizer (so that Lookahead's sync runs inside the base's last pass: +8 B/param per
sync instead of a separate pass's +16 B), else in a small internal FusedOptimizer whose sync is one launch
per bucket (the C++ loop on CPU, the reference for fp64 or without a compiler).
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from . import _compile, scout
from ._backends import Backend
from ._base import FusedOptimizer
from ._distributed import DTensor, Shard, is_dtensor, local, local_value
from ._layout import Bucket
from ._rule import SYNC_PASS, SYNC_RULE
from ._validation import check_non_negative

__all__ = ["SYNC_PASS", "Lookahead", "Scout"]  # SYNC_PASS: the Triton launch of a sync on its own


class _SlowWeights(FusedOptimizer):
    """Holds the slow weights of a wrapper whose base is not a fusedoptim optimizer; never steps itself."""

    rule = SYNC_RULE  # on CPU the sync is the C++ loop of csrc/lookahead.h (keep_step with the slow weights)

    _validates_groups = False  # no hyperparameters of its own: the base's groups are the base's business

    def __init__(self, base_optimizer: Optimizer, backend: Backend) -> None:
        super().__init__([{"params": list(g["params"])} for g in base_optimizer.param_groups], {"maximize": False},
                         backend=backend)

    def _hyper(self, group: dict[str, Any]) -> tuple[float, ...]:
        return ()


class _MergedState(Mapping):
    """The state of a wrapper around a torch optimizer: per param, the base's entries and the slow weights'.
    Its length and keys are the base's."""

    def __init__(self, base: Mapping[torch.Tensor, Any], slow: Mapping[torch.Tensor, Any]) -> None:
        self.base, self.slow = base, slow

    def __getitem__(self, p: torch.Tensor) -> dict[str, Any]:
        return {**self.base.get(p, {}), **self.slow[p]}

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


class _StepCount:
    """A wrapper's step count on the params' device, used once the host cannot know whether a step is taken (a
    GradScaler hands its found_inf, which only the device reads) or must not look (capturable): every step then
    passes the sync its rate, negative when it does not sync, and Scout's kernels their position in the period.
    The per-step arithmetic writes into the buffers below: a step allocates nothing for it and reads nothing back.
    """

    def __init__(self, steps: int, device: torch.device) -> None:
        self.steps = torch.tensor([steps], dtype=torch.int64, device=device)  # the base steps taken
        self.skipped = torch.zeros(1, dtype=torch.bool, device=device)  # this step: GradScaler found an inf
        # this step's position in its period; k and above on a skipped step
        self.place = torch.zeros(1, dtype=torch.int64, device=device)
        self.due = torch.zeros(1, dtype=torch.bool, device=device)
        self.rate = torch.zeros(1, dtype=torch.float32, device=device)  # the sync rate this step passes
        self.no_sync = torch.full((1,), -1.0, dtype=torch.float32, device=device)

    def buffers(self) -> list[torch.Tensor]:
        """What a step writes (a compiled step's op declares them mutated)."""
        return [self.steps, self.skipped, self.place, self.due, self.rate]

    def start(self, found_inf: torch.Tensor | None, period: int) -> None:
        """Before the base step: whether it will be skipped, and its position (``place``)."""
        if found_inf is None:
            self.skipped.fill_(False)
        else:
            torch.ne(found_inf.reshape(1).to(self.steps.device, non_blocking=True), 0, out=self.skipped)
        torch.remainder(self.steps, period, out=self.place)
        self.place.add_(self.skipped, alpha=period)

    def sync_at(self, position: int, rate: torch.Tensor) -> torch.Tensor:
        """The rate this step passes: ``rate`` at ``position`` of the period, -1 (no sync) elsewhere."""
        torch.eq(self.place, position, out=self.due)
        return torch.where(self.due, rate, self.no_sync, out=self.rate)

    def finish(self) -> None:
        """After the base step: one more step taken, unless skipped."""
        self.steps.add_(1).add_(self.skipped, alpha=-1)  # (a bool cannot be subtracted)


class _SyncWrapper(Optimizer):
    """Keeps fp32 slow weights of every param of ``base_optimizer``; every ``sync_period`` steps moves them
    towards the fast weights by a rate and copies them back: slow ← slow + rate·(fast − slow); fast ← slow."""

    def __init__(self, base_optimizer: Optimizer, sync_rate: float, sync_period: int, min_period: int,
                 fused_sync: bool = True, backend: Backend = "auto") -> None:
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        check_non_negative("sync_rate", sync_rate)
        if sync_rate > 1:
            raise ValueError(f"Invalid sync_rate: {sync_rate} (must be in [0, 1])")
        if isinstance(sync_period, bool) or not isinstance(sync_period, int) or sync_period < min_period:
            raise ValueError(f"Invalid sync_period: {sync_period!r} (must be an int >= {min_period})")
        # Optimizer.__init__ would build param groups of its own; ours are the base's, so set up the rest
        # of what torch.optim.Optimizer expects (hooks, the step patch for LR schedulers) here.
        self.base_optimizer = base_optimizer
        self._min_period = min_period
        self._settings = dict(sync_rate=float(sync_rate), sync_period=sync_period)
        for name in ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
                     "load_state_dict_post"):
            setattr(self, f"_optimizer_{name}_hooks", OrderedDict())
        self._patch_step_function()
        _compile.register(self)
        self._fast_steps = 0
        self._count: _StepCount | None = None  # on the device once GradScaler hands a found_inf, or capturable
        self._fused_sync = fused_sync and isinstance(base_optimizer, FusedOptimizer)
        self._holder = (base_optimizer if isinstance(base_optimizer, FusedOptimizer)
                        else _SlowWeights(base_optimizer, backend))
        self._holder.attach_slow_weights()
        self._rate = self._rate_tensor()
        if self.capturable:
            self._count = _StepCount(0, self._rate.device)

    # ------------------------------------------------------------------ shared groups
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        raise AttributeError("a wrapper's param_groups are its base optimizer's; change those")

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The base's defaults (what schedulers read: ``betas``, ``momentum``), with ``sync_rate`` and
        ``sync_period``. A copy: change the base's defaults, or the wrapper's settings through load_state_dict."""
        return {**self.base_optimizer.defaults, **self._settings}

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        raise AttributeError("a wrapper's defaults are its base optimizer's; change those")

    @property
    def state(self) -> Mapping[torch.Tensor, Any]:  # type: ignore[override]
        """Per param: the base's state and ``slow_param``, a view into the flat slow-weight buffers. It is the base's
        own state when the base is a fusedoptim optimizer; else a view of both, empty while the base's is (so that
        torch.distributed.checkpoint initialises the base's state as it does for the base alone)."""
        if self._holder is self.base_optimizer:
            return self._holder.state
        return _MergedState(self.base_optimizer.state, self._holder.state)

    @property
    def slow_weights(self) -> FusedOptimizer:
        """The fusedoptim optimizer whose flat buffers hold the slow weights: the base itself when it is one (the
        sync then runs inside its last pass), else an internal one that only syncs."""
        return self._holder

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.base_optimizer.add_param_group(param_group)
        if self._holder is not self.base_optimizer:
            self._holder.add_param_group({"params": list(self.base_optimizer.param_groups[-1]["params"])})
        self._holder.attach_slow_weights()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def sync_rate(self) -> float:
        return self._settings["sync_rate"]

    @property
    def sync_period(self) -> int:
        return self._settings["sync_period"]

    @property
    def capturable(self) -> bool:
        """The base's: a capturable base makes a capturable wrapper, whose counter and rate live on the device."""
        return bool(getattr(self.base_optimizer, "capturable", False))

    @property
    def _step_supports_amp_scaling(self) -> bool:  # type: ignore[override]
        """The base's. When it takes GradScaler's scale and found_inf (every fusedoptim optimizer, torch's fused
        ones), so does the wrapper: it hands them to the base, which unscales in its kernels and skips a step with an
        inf on the device, and counts its steps on the device, so that a skipped step is not counted and syncs
        nothing, without a host sync. Otherwise GradScaler unscales the grads and skips the wrapper's step itself."""
        return bool(getattr(self.base_optimizer, "_step_supports_amp_scaling", False))

    @property
    def fast_steps(self) -> int:
        """The base steps taken (a step GradScaler skipped is not). Once counted on the device (a GradScaler's
        found_inf, capturable), reading it is a host sync: state_dict reads it, a step never does."""
        return self._fast_steps if self._count is None else int(self._count.steps.item())

    @fast_steps.setter
    def fast_steps(self, value: int) -> None:
        self._fast_steps = value
        if self._count is not None:
            self._count.steps.fill_(value)

    # ------------------------------------------------------------------ slow weights
    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _rate_tensor(self) -> torch.Tensor:
        """``sync_rate`` as fp32[1] on the params' device: the kernels read it through a pointer, which must be
        a device address (a CPU tensor would fail at the first sync on CUDA)."""
        params = self._params()
        return torch.tensor([self.sync_rate], dtype=torch.float32, device=params[0].device if params else "cpu")

    def _sync_rate(self) -> torch.Tensor | None:
        """The rate of a sync fused into the coming base step, or None (Scout's rate needs the step's result)."""
        return None

    def _after_base_step(self) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Step the base optimizer and synchronise the slow weights every ``sync_period`` steps taken.

        Under torch.compile the whole step is one ``fusedoptim::step`` op (optim/_compile.py) that declares what it
        writes: Dynamo would otherwise trace the counter's Python arithmetic into the graph as constants (measured:
        7 compiled Lookahead steps left fast_steps at 0 and synced nothing) and break at Scout's C++ call."""
        if torch.compiler.is_compiling():
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            _compile.compiled_step(self)
            return loss
        return self._eager_step(closure=closure)

    def _written_tensors(self) -> list[torch.Tensor]:
        """Every tensor a step may write besides the params: the base's state, the slow weights, the count on the
        device (Scout: and its rings)."""
        tensors = self._holder.flat_buffers()
        if self._holder is not self.base_optimizer:
            tensors += [value for p in self._params() for value in self.base_optimizer.state.get(p, {}).values()
                        if isinstance(value, torch.Tensor)]
        if self._count is not None:
            tensors += self._count.buffers()
        return tensors

    def _eager_step(self, amp: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
                    closure: Callable[[], float] | None = None) -> float | None:
        if amp is None:  # set by GradScaler (a compiled step's op passes them)
            amp = (getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        if self._count is None and amp[1] is not None:
            self._count = _StepCount(self._fast_steps, self._rate.device)  # from now on: counted on the device
        if self._count is not None:
            return self._counted_step(closure, amp)
        fused_rate = self._sync_rate() if (self._fast_steps + 1) % self.sync_period == 0 else None
        with self._holder.fused_sync(fused_rate) if fused_rate is not None else contextlib.nullcontext():
            loss = self._base_step(closure, amp)
        self._fast_steps += 1
        if fused_rate is None:
            self._after_base_step()
        return loss

    def _base_step(self, closure: Callable[[], float] | None,
                   amp: tuple[torch.Tensor | None, torch.Tensor | None]) -> float | None:
        """The base's step, handed GradScaler's scale and found_inf as GradScaler would hand them to it."""
        base = self.base_optimizer
        if amp == (None, None):
            return base.step(closure) if closure is not None else base.step()
        base.grad_scale, base.found_inf = amp
        try:
            return base.step(closure) if closure is not None else base.step()
        finally:
            del base.grad_scale, base.found_inf

    def _counted_step(self, closure: Callable[[], float] | None,
                      amp: tuple[torch.Tensor | None, torch.Tensor | None]) -> float | None:
        """A step counted on the device: the same syncs at the same steps taken, decided there. Every step launches
        the sync on its own with its rate, -1 (a launch that returns at once, a C++ call that does nothing) but at the
        period's last step taken; a skipped step syncs nothing. Lookahead's is not fused into the base's last pass,
        whose kernels would then carry the predicate on every step (kernels/_template.py: 9 registers): its sync
        step moves +16 B/param instead of +8."""
        count = self._count
        count.start(amp[1], self.sync_period)
        loss = self._base_step(closure, amp)
        self._holder.sync_now(count.sync_at(self.sync_period - 1, self._counted_rate(count)))
        count.finish()
        return loss

    def _counted_rate(self, count: _StepCount) -> torch.Tensor:
        """A counted step's sync rate (used at the period's last step only), after the base step."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state_dict
    #: What the wrapper adds to each param group of its state_dict (the counters, the same in every group).
    GROUP_KEYS = ("fast_steps", "sync_rate", "sync_period")
    #: What it adds to each param's state.
    STATE_KEYS: tuple[str, ...] = ("slow_param",)

    def state_dict(self) -> dict[str, Any]:
        """The base's state_dict, with each param's slow weights (Scout: and snapshots) in its state and the
        counters (``fast_steps``, ``sync_rate``, ``sync_period``) in every param group. Runs the hooks registered
        with ``register_state_dict_pre_hook`` / ``register_state_dict_post_hook``."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        base = self.base_optimizer.state_dict()
        ids = [pid for group in base["param_groups"] for pid in group["params"]]
        state = dict(base["state"])
        for pid, p in zip(ids, self._params(), strict=True):
            state[pid] = {**state.get(pid, {}), **self._wrapper_state(p)}
        counters = {"fast_steps": self.fast_steps, **self._settings}
        state_dict = {"state": state, "param_groups": [{**group, **counters} for group in base["param_groups"]]}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _wrapper_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"slow_param": self.state[p]["slow_param"]}

    def _load_wrapper_state(self, p: torch.Tensor, saved: dict[str, torch.Tensor]) -> None:
        local(self.state[p]["slow_param"]).copy_(local_value(saved["slow_param"], p).reshape(local(p).shape))

    def _check_counters(self, counters: dict[str, Any]) -> None:
        """The loaded counters, checked before anything is loaded: what the constructor checks, and fast_steps."""
        name = type(self).__name__
        fast_steps, sync_rate, sync_period = (counters[key] for key in self.GROUP_KEYS)
        if isinstance(fast_steps, bool) or not isinstance(fast_steps, int) or fast_steps < 0:
            raise ValueError(f"{name}: the loaded fast_steps must be an int >= 0, got {fast_steps!r}")
        if isinstance(sync_rate, bool) or not isinstance(sync_rate, (int, float)) or not 0.0 <= sync_rate <= 1.0:
            raise ValueError(f"{name}: the loaded sync_rate must be a number in [0, 1], got {sync_rate!r}")
        if isinstance(sync_period, bool) or not isinstance(sync_period, int) or sync_period < self._min_period:
            raise ValueError(f"{name}: the loaded sync_period must be an int >= {self._min_period}, got "
                             f"{sync_period!r}")

    def _check_wrapper_entry(self, i: int, p: torch.Tensor, saved: dict[str, Any], sync_period: int) -> None:
        """Param i's loaded wrapper state, checked before anything is loaded: the slow weights' size and type."""
        slow = saved["slow_param"]
        if not isinstance(slow, torch.Tensor) or not slow.is_floating_point() or slow.numel() != p.numel():
            raise ValueError(f"slow weights of param {i} have shape "
                             f"{tuple(slow.shape) if isinstance(slow, torch.Tensor) else type(slow).__name__}, "
                             f"the param {tuple(p.shape)}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a wrapper state_dict (this format, the earlier one with a ``"wrapper"`` entry, or a state_dict that
        ``torch.distributed.checkpoint`` rebuilt: params named by FQN). A plain base state_dict (no slow weights)
        restarts the slow weights from the current params, as virtex does. Everything is checked before anything
        is loaded. Runs the load_state_dict pre and post hooks."""
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        params = self._params()
        groups = state_dict["param_groups"]
        ids = [pid for group in groups for pid in group["params"]]
        if len(ids) != len(params):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             "optimizer's group")
        old_format = state_dict.get("wrapper")
        if old_format is not None:
            saved = {p: old_format["state"].get(i) for i, p in enumerate(params)}
            counters = {key: old_format[key] for key in self.GROUP_KEYS}
        else:
            entries = {p: state_dict["state"].get(pid, {}) for pid, p in zip(ids, params, strict=True)}
            saved = {p: {key: entry[key] for key in self.STATE_KEYS if key in entry} or None
                     for p, entry in entries.items()}
            counters = {key: groups[0][key] for key in self.GROUP_KEYS if groups and key in groups[0]}
        restart = all(entry is None for entry in saved.values())
        if not restart:
            missing = [i for i, p in enumerate(params) if saved[p] is None or set(self.STATE_KEYS) - set(saved[p])]
            if missing:
                raise ValueError(f"the state dict holds no {'/'.join(self.STATE_KEYS)} for params {missing[:5]}")
            if len(counters) != len(self.GROUP_KEYS):
                raise ValueError(f"the state dict has slow weights but not the counters {self.GROUP_KEYS}")
            self._check_counters(counters)
            for i, p in enumerate(params):
                self._check_wrapper_entry(i, p, saved[p], int(counters["sync_period"]))
        base_state = {pid: {k: v for k, v in entry.items() if k not in self.STATE_KEYS}
                      for pid, entry in state_dict["state"].items()}
        base_groups = [{k: v for k, v in group.items() if k not in self.GROUP_KEYS} for group in groups]
        self.base_optimizer.load_state_dict({"state": base_state, "param_groups": base_groups})
        self._holder.attach_slow_weights()
        with torch.no_grad():
            if restart:
                for p in params:
                    local(self.state[p]["slow_param"]).copy_(local(p))
            else:
                self.fast_steps = int(counters["fast_steps"])
                self._settings.update(sync_rate=float(counters["sync_rate"]), sync_period=int(counters["sync_period"]))
                self._rate.fill_(self.sync_rate)  # in place: a captured graph reads this tensor
                for p in params:
                    self._load_wrapper_state(p, saved[p])
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        return {"base_optimizer": self.base_optimizer, "_settings": self._settings, "_holder": self._holder,
                "_fast_steps": self._fast_steps, "_count": self._count, "_rate": self._rate,
                "_fused_sync": self._fused_sync, "_min_period": self._min_period}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "fast_steps" in state:  # pickled by an earlier version
            state["_fast_steps"] = state.pop("fast_steps")
        self.__dict__.update(state)
        self.__dict__.setdefault("_count", None)
        _compile.register(self)
        self.__dict__.setdefault("_min_period", 1)
        for name in ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
                     "load_state_dict_post"):
            self.__dict__.setdefault(f"_optimizer_{name}_hooks", OrderedDict())
        self._patch_step_function()

    def __repr__(self) -> str:
        base = repr(self.base_optimizer).replace("\n", "\n\t")
        lines = [f"{type(self).__name__} (", f"base_optimizer={base},"]
        lines += [f"{key}: {value}" for key, value in self._settings.items()]
        return "\n".join(lines + [")"])


class Lookahead(_SyncWrapper):
    r"""Lookahead: k steps forward, one step back.

    From `Lookahead Optimizer: k steps forward, 1 step back <https://arxiv.org/abs/1907.08610>`_ (Zhang et al.,
    NeurIPS 2019). Slow weights φ start as the params at construction; after every k = ``sync_period`` steps
    of the base optimizer:

    .. math::
        \phi \leftarrow \phi + \alpha (\theta - \phi), \quad \theta \leftarrow \phi

    with α = ``sync_rate``. ``sync_rate=1`` is the base optimizer. holocron's signature; virtex's keywords
    ``k=`` and ``alpha=`` are accepted too (virtex's defaults are k = 5, α = 0.8: pass them explicitly).

    Args:
        base_optimizer: any ``torch.optim.Optimizer``.
        sync_rate: α in [0, 1] (default: 0.5).
        sync_period: k >= 1 (default: 6).
        k: virtex's name for ``sync_period``.
        alpha: virtex's name for ``sync_rate``.
        fused_sync: with a fusedoptim base, sync inside its last pass (default: True); a Lookahead counting its
            steps on the device (GradScaler, capturable) syncs in a pass of its own.
        backend: backend of the slow-weight sync when the base is not a fusedoptim optimizer (default: "auto").

    State: per param, ``slow_param`` (fp32, in flat buffers).
    """

    def __init__(self, base_optimizer: Optimizer, sync_rate: float = 0.5, sync_period: int = 6, *,
                 k: int | None = None, alpha: float | None = None, fused_sync: bool = True,
                 backend: Backend = "auto") -> None:
        super().__init__(base_optimizer, sync_rate if alpha is None else alpha,
                         sync_period if k is None else k, min_period=1, fused_sync=fused_sync, backend=backend)
        self._backup: dict[torch.Tensor, torch.Tensor] | None = None

    def _sync_rate(self) -> torch.Tensor | None:
        # fused into the base's last pass when the base is a fusedoptim optimizer
        return self._rate if self._fused_sync else None

    def _counted_rate(self, count: _StepCount) -> torch.Tensor:
        return self._rate

    def _after_base_step(self) -> None:
        if self._fast_steps % self.sync_period == 0:
            self._holder.sync_now(self._rate)

    @torch.no_grad()
    def load_slow_weights(self) -> None:
        """Swap the slow weights into the params (e.g. to evaluate on them); undo with restore_fast_weights()."""
        if self._backup is not None:
            raise RuntimeError("the slow weights are already loaded: call restore_fast_weights() first")
        self._backup = {p: p.detach().clone() for p in self._params()}
        for p in self._params():
            p.copy_(self.state[p]["slow_param"])

    @torch.no_grad()
    def restore_fast_weights(self) -> None:
        """Put back the fast weights saved by load_slow_weights()."""
        if self._backup is None:
            raise RuntimeError("no fast weights to restore: call load_slow_weights() first")
        for p, fast in self._backup.items():
            p.copy_(fast)
        self._backup = None

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_backup": self._backup}


class Scout(_SyncWrapper):
    r"""Scout (holocron): Lookahead whose sync rate grows when the last k updates disagree.

    Keeps the fast weights of the first k - 1 steps of each period of k = ``sync_period`` steps in a preallocated
    ring buffer (the params at the sync are the k-th). At a sync, with :math:`U_i` the k updates (from the slow
    weights to the first snapshot, then between snapshots, then to the params), each
    tensor's coherence is the mean over its entries of :math:`\mathrm{std}_i(U) / \max_i |U_i - \bar U|`
    (unbiased std), the rate is :math:`\max(1 - \bar s, \text{sync\_rate})` with :math:`\bar s` the mean over
    tensors, and the sync is Lookahead's. Entries whose updates did not vary (frozen, zero-gradient) are left
    out of the means instead of turning them into NaN as in holocron; with no varying entry at all the rate is
    ``sync_rate``. The rate stays on the device: no host synchronisation.

    Args:
        base_optimizer: any ``torch.optim.Optimizer``.
        sync_rate: lower bound of the rate, in [0, 1] (default: 0.5).
        sync_period: k >= 2 (the std of one update is undefined) (default: 6).
        backend: backend of the slow-weight sync when the base is not a fusedoptim optimizer (default: "auto").
    """

    def __init__(self, base_optimizer: Optimizer, sync_rate: float = 0.5, sync_period: int = 6, *,
                 backend: Backend = "auto") -> None:
        super().__init__(base_optimizer, sync_rate, sync_period, min_period=2, fused_sync=False, backend=backend)
        self._snapshots: dict[torch.Tensor, torch.Tensor] = {}
        self._rings: dict[int, tuple[Bucket, torch.Tensor]] = {}  # id(bucket) -> (bucket, its ring)

    def _ring(self, bucket: Bucket) -> torch.Tensor:
        """The bucket's ring: one flat [k - 1, total] buffer laid out like its slow weights, allocated once per bucket
        (a bucket laid out anew, e.g. after its group's params changed, gets one filled from the old snapshots)."""
        entry = self._rings.get(id(bucket))
        if entry is None or entry[0] is not bucket:
            slow = bucket.states["slow_param"]
            ring = slow.new_zeros((self.sync_period - 1, slow.numel()))
            for i, p in enumerate(bucket.params):
                view = scout.ring_view(bucket, ring, i)
                if p in self._snapshots:
                    view.copy_(self._snapshots[p])
                self._snapshots[p] = view
            entry = self._rings[id(bucket)] = (bucket, ring)
        return entry[1]

    def snapshots(self, p: torch.Tensor) -> torch.Tensor:
        """Param p's ring of fast-weight snapshots, taken after steps 1 .. k - 1 of each period of k = ``sync_period``
        steps (the params at the sync are the k-th): a [k - 1, *shape] view (in p's memory order) into one flat
        [k - 1, total] fp32 buffer per bucket of the slow weights."""
        for bucket in self._holder.bucket_layout():
            self._ring(bucket)
        return self._snapshots[p]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group mid-period as if it had been there from the start without a gradient: its snapshots of the
        steps already taken in this period are its value now (zeros would read as an update of -θ, then +θ)."""
        super().add_param_group(param_group)
        taken = self.fast_steps % self.sync_period
        with torch.no_grad():
            for p in self.param_groups[-1]["params"]:
                self.snapshots(p)[:taken].copy_(local(p).unsqueeze(0).expand(taken, *local(p).shape))

    def _after_base_step(self) -> None:
        # One call (C++) or launch (Triton) per bucket: the params into the ring, or at a sync the coherence sums,
        # with the params as the k-th snapshot: not stored, which saves a write stream (8 B/param with its
        # read-for-ownership: ResNet-50's sync step 62 -> 56 ms, against 20 ms for the base step).
        if self._fast_steps % self.sync_period != 0:
            self._snapshot((self._fast_steps - 1) % self.sync_period, coherence=False)
        else:
            self._holder.sync_now(self._coherent_rate(self._snapshot(-1, coherence=True)))  # needs the step's result

    def _counted_rate(self, count: _StepCount) -> torch.Tensor:
        # The kernels read the step's place: a snapshot into its row, or at the period's last step the coherence
        # sums, whose rate the sync takes at that step only. The rate's torch ops on the sums run at every step.
        return self._coherent_rate(self._snapshot(count.place, coherence=True))

    def _written_tensors(self) -> list[torch.Tensor]:
        return super()._written_tensors() + [ring for _, ring in self._rings.values()]

    @torch.no_grad()
    def _snapshot(self, slot: int | torch.Tensor, coherence: bool) -> list[tuple[Bucket, torch.Tensor]]:
        """Every bucket's params into row ``slot`` of its ring (-1: none; a tensor: the step's position, read on the
        device); with ``coherence``, each bucket's fp64 [tensors, 2] coherence sums, the params being the period's
        last snapshot."""
        out = []
        for bucket in self._holder.bucket_layout():
            sums = bucket.executor.snapshot(bucket, self._ring(bucket), slot, coherence)
            if coherence:
                out.append((bucket, sums))
        return out

    def _coherent_rate(self, sums: list[tuple[Bucket, torch.Tensor]]) -> torch.Tensor:
        """The sync rate from the buckets' coherence sums (0-d fp32 on the params' device, never read on the host).
        A sharded bucket's sums are partial: added up over its mesh first (one all-reduce per mesh)."""
        if not sums:
            return self._rate_tensor().reshape(())
        device = sums[0][1].device
        tables = [table.to(device) for _, table in sums]
        by_mesh: dict[int, list[int]] = {}
        for j, (bucket, _) in enumerate(sums):
            if bucket.sharding is not None:
                by_mesh.setdefault(id(bucket.sharding), []).append(j)
        for rows in by_mesh.values():
            shard_sums = torch.cat([tables[j] for j in rows])
            sums[rows[0]][0].sharding.all_reduce(shard_sums)
            for j, part in zip(rows, shard_sums.split([len(tables[j]) for j in rows]), strict=True):
                tables[j] = part
        return scout.rate(torch.cat(tables), self.sync_rate)

    STATE_KEYS = ("slow_param", "snapshots")

    def _wrapper_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        snapshots = self.snapshots(p)
        if is_dtensor(p):  # [k - 1, *shape]: distributed like the param, one dimension further in
            placements = [Shard(pl.dim + 1) if pl.is_shard() else pl for pl in p.placements]
            shape = (self.sync_period - 1, *p.shape)
            stride = tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))
            snapshots = DTensor.from_local(snapshots, p.device_mesh, placements, shape=torch.Size(shape),
                                           stride=stride, run_check=False)
        return {**super()._wrapper_state(p), "snapshots": snapshots}

    def _check_wrapper_entry(self, i: int, p: torch.Tensor, saved: dict[str, Any], sync_period: int) -> None:
        super()._check_wrapper_entry(i, p, saved, sync_period)
        snapshots = saved["snapshots"]
        if sync_period != self.sync_period:
            raise ValueError(f"Scout: the state dict's sync_period {sync_period} is not this Scout's "
                             f"{self.sync_period}: its ring holds one snapshot per step of a period")
        # [k - 1, *shape], or [k, *shape] as earlier versions saved it: its last row (the params before the last sync)
        # is never read
        if (not isinstance(snapshots, torch.Tensor) or not snapshots.is_floating_point()
                or snapshots.numel() not in ((sync_period - 1) * p.numel(), sync_period * p.numel())):
            got = tuple(snapshots.shape) if isinstance(snapshots, torch.Tensor) else type(snapshots).__name__
            raise ValueError(f"snapshots of param {i} must be a floating-point [{sync_period - 1}, "
                             f"*{tuple(p.shape)}] tensor, got {got}")

    def _load_wrapper_state(self, p: torch.Tensor, saved: dict[str, torch.Tensor]) -> None:
        super()._load_wrapper_state(p, saved)
        value = saved["snapshots"]
        if value.numel() == self.sync_period * p.numel():  # the older format's k-th row: never read
            value = value.reshape(self.sync_period, *p.shape)[:-1]
        if is_dtensor(value):
            value = value.to_local()
        elif is_dtensor(p):  # a full [k - 1, *shape] tensor: this rank's rows of every snapshot
            value = torch.stack([local_value(snapshot, p) for snapshot in value])
        target = self.snapshots(p)
        if value.untyped_storage().data_ptr() == target.untyped_storage().data_ptr():
            # loaded in place (torch.distributed.checkpoint): its own view, whose strides may differ on a size-1 ring
            value = value.clone()
        target.copy_(value.reshape(target.shape))

    def __getstate__(self) -> dict[str, Any]:
        # the rings are found again from the snapshot views (a bucket's id is not kept across a pickle)
        return {**super().__getstate__(), "_snapshots": self._snapshots, "_rings": {}}

    @torch.no_grad()
    def last_rate(self) -> torch.Tensor:
        """The rate a sync would take now (a 0-d device tensor): from the ring's snapshots and the params as the last.
        On sharded params each tensor's sums are added up over its shards first."""
        return self._coherent_rate(self._snapshot(-1, coherence=True))
