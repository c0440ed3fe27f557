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

from ._backends import Backend
from ._base import FusedOptimizer
from ._distributed import DTensor, Shard, is_dtensor, local, local_value
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


class _SyncWrapper(Optimizer):
    """Keeps fp32 slow weights of every param of ``base_optimizer``; every ``sync_period`` steps moves them
    towards the fast weights by a rate and copies them back: slow ← slow + rate·(fast − slow); fast ← slow."""

    def __init__(self, base_optimizer: Optimizer, sync_rate: float, sync_period: int, min_period: int,
                 fused_sync: bool = True, backend: Backend = "auto") -> None:
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        if getattr(base_optimizer, "capturable", False):
            raise ValueError(f"{type(self).__name__} cannot wrap a capturable optimizer yet: its sync counter and rate "
                             "live on the host, so a captured graph would sync at the wrong steps")
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
        self.fast_steps = 0
        self._fused_sync = fused_sync and isinstance(base_optimizer, FusedOptimizer)
        self._holder = (base_optimizer if isinstance(base_optimizer, FusedOptimizer)
                        else _SlowWeights(base_optimizer, backend))
        self._holder.attach_slow_weights()
        self._rate = self._rate_tensor()

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
        """Step the base optimizer and synchronise the slow weights every ``sync_period`` steps."""
        fused_rate = self._sync_rate() if (self.fast_steps + 1) % self.sync_period == 0 else None
        with self._holder.fused_sync(fused_rate) if fused_rate is not None else contextlib.nullcontext():
            loss = self.base_optimizer.step(closure) if closure is not None else self.base_optimizer.step()
        self.fast_steps += 1
        if fused_rate is None:
            self._after_base_step()
        return loss

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
                self._rate = self._rate_tensor()
                for p in params:
                    self._load_wrapper_state(p, saved[p])
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        return {"base_optimizer": self.base_optimizer, "_settings": self._settings, "_holder": self._holder,
                "fast_steps": self.fast_steps, "_rate": self._rate, "_fused_sync": self._fused_sync,
                "_min_period": self._min_period}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
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
        fused_sync: with a fusedoptim base, sync inside its last pass (default: True).
        backend: backend of the slow-weight sync when the base is not a fusedoptim optimizer (default: "auto").

    State: per param, ``slow_param`` (fp32, in flat buffers).
    """

    def __init__(self, base_optimizer: Optimizer, sync_rate: float = 0.5, sync_period: int = 6, *,
                 k: int | None = None, alpha: float | None = None, fused_sync: bool = True,
                 backend: Backend = "auto") -> None:
        super().__init__(base_optimizer, sync_rate if alpha is None else alpha,
                         sync_period if k is None else k, min_period=1, fused_sync=fused_sync, backend=backend)
        self._backup: dict[torch.Tensor, torch.Tensor] | None = None

    def _rate_tensor(self) -> torch.Tensor:
        """``sync_rate`` as fp32[1] on the params' device: the kernels read it through a pointer, which must be
        a device address (a CPU tensor would fail at the first sync on CUDA)."""
        params = self._params()
        return torch.tensor([self.sync_rate], dtype=torch.float32, device=params[0].device if params else "cpu")

    def _sync_rate(self) -> torch.Tensor | None:
        # fused into the base's last pass when the base is a fusedoptim optimizer
        return self._rate if self._fused_sync else None

    def _after_base_step(self) -> None:
        if self.fast_steps % self.sync_period == 0:
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

    Keeps the last k = ``sync_period`` fast weights in a preallocated ring buffer. At a sync, with
    :math:`U_i` the k updates (from the slow weights to the first snapshot, then between snapshots), each
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

    def snapshots(self, p: torch.Tensor) -> torch.Tensor:
        """Param p's ring of ``sync_period`` fast-weight snapshots: a [k, *shape] view into one flat
        [k, total] fp32 buffer per bucket of the slow weights, allocated once."""
        buffer = self._snapshots.get(p)
        if buffer is None:
            for bucket in self._holder.bucket_layout():
                slow = bucket.states["slow_param"]
                flat = slow.new_zeros((self.sync_period, slow.numel()))
                for i, q in enumerate(bucket.params):
                    if q not in self._snapshots:
                        segment = flat[:, bucket.offsets[i]:bucket.offsets[i] + bucket.numels[i]]
                        self._snapshots[q] = segment.view(self.sync_period, *bucket.tensors[i].shape)
            buffer = self._snapshots[p]
        return buffer

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group mid-period as if it had been there from the start without a gradient: its snapshots of the
        steps already taken in this period are its value now (zeros would read as an update of -θ, then +θ)."""
        super().add_param_group(param_group)
        taken = self.fast_steps % self.sync_period
        with torch.no_grad():
            for p in self.param_groups[-1]["params"]:
                self.snapshots(p)[:taken].copy_(local(p).unsqueeze(0).expand(taken, *local(p).shape))

    def _after_base_step(self) -> None:
        slot = (self.fast_steps - 1) % self.sync_period
        with torch.no_grad():
            for p in self._params():
                self.snapshots(p)[slot].copy_(local(p))
        if self.fast_steps % self.sync_period == 0:
            self._holder.sync_now(self.last_rate())  # after the step: the rate needs its result

    STATE_KEYS = ("slow_param", "snapshots")

    def _wrapper_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        snapshots = self.snapshots(p)
        if is_dtensor(p):  # [k, *shape]: distributed like the param, one dimension further in
            placements = [Shard(pl.dim + 1) if pl.is_shard() else pl for pl in p.placements]
            shape = (self.sync_period, *p.shape)
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
        if (not isinstance(snapshots, torch.Tensor) or not snapshots.is_floating_point()
                or snapshots.numel() != sync_period * p.numel()):
            got = tuple(snapshots.shape) if isinstance(snapshots, torch.Tensor) else type(snapshots).__name__
            raise ValueError(f"snapshots of param {i} must be a floating-point [{sync_period}, *{tuple(p.shape)}] "
                             f"tensor, got {got}")

    def _load_wrapper_state(self, p: torch.Tensor, saved: dict[str, torch.Tensor]) -> None:
        super()._load_wrapper_state(p, saved)
        value = saved["snapshots"]
        if is_dtensor(value):
            value = value.to_local()
        elif is_dtensor(p):  # a full [k, *shape] tensor: this rank's rows of every snapshot
            value = torch.stack([local_value(snapshot, p) for snapshot in value])
        self.snapshots(p).copy_(value.reshape(self.snapshots(p).shape))

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_snapshots": self._snapshots}

    @torch.no_grad()
    def last_rate(self) -> torch.Tensor:
        """The rate the current ring buffer gives (a 0-d device tensor). On sharded params each tensor's sums are
        added up over its shards first (one all-reduce per mesh)."""
        sums, shardings = [], []  # per param: its ratios' sum and how many entries varied
        for bucket in self._holder.bucket_layout():
            for i, p in enumerate(bucket.params):
                if bucket.numels[i] == 0:  # an empty shard: nothing of this tensor here
                    sums.append(torch.zeros(2, dtype=torch.float64, device=bucket.device))
                    shardings.append(bucket.sharding)
                    continue
                history = torch.cat([bucket.view("slow_param", i).unsqueeze(0), self.snapshots(p)])
                updates = (history[1:] - history[:-1]).reshape(self.sync_period, -1)
                deviation = (updates - updates.mean(0)).abs().amax(0)
                varies = deviation > 0
                ratio = torch.where(varies, updates.std(0) / torch.where(varies, deviation, 1.0), 0.0)
                # fp64 holds the fp32 sum and the count exactly, and their sums over shards
                sums.append(torch.stack([ratio.sum().double(), varies.sum().double()]))
                shardings.append(bucket.sharding)
        table = torch.stack(sums)
        for sharding in {id(s): s for s in shardings if s is not None}.values():
            rows = torch.tensor([i for i, s in enumerate(shardings) if s is sharding], device=table.device)
            shard_sums = table.index_select(0, rows)
            sharding.all_reduce(shard_sums)
            table.index_copy_(0, rows, shard_sums)
        count = table[:, 1].long()
        coherence, counted = table[:, 0].float() / count.clamp(min=1), count > 0
        mean = (coherence * counted).sum() / counted.sum().clamp(min=1)
        rate = torch.where(counted.any(), torch.clamp(1.0 - mean, min=self.sync_rate), self.sync_rate)
        return rate.to(torch.float32)
