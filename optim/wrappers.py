"""Lookahead (Zhang et al., 2019, https://arxiv.org/abs/1907.08610) and holocron's Scout, around any optimizer.

One shared wrapper base: the wrapper's ``param_groups`` ARE the base's (an LR scheduler or GradScaler on the
wrapper acts on the real learning rate), ``zero_grad`` delegates, ``add_param_group`` extends the slow
weights, and ``state_dict`` holds the base's state plus the slow weights and counters.

The slow weights live in flat fp32 buffers laid out like optimizer state: in the base's own buckets when the
base is a fusedoptim optimizer (so that Lookahead's sync runs inside the base's last pass: +8 B/param per
sync instead of a separate pass's +16 B), else in a small internal FusedOptimizer whose sync is one launch
per bucket (the C++ loop on CPU, the reference for fp64 or without a compiler).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from ._backends import Backend
from ._base import FusedOptimizer
from ._rule import SYNC_PASS, SYNC_RULE
from ._validation import check_non_negative

__all__ = ["SYNC_PASS", "Lookahead", "Scout"]  # SYNC_PASS: the Triton launch of a sync on its own


class _SlowWeights(FusedOptimizer):
    """Holds the slow weights of a wrapper whose base is not a fusedoptim optimizer; never steps itself."""

    rule = SYNC_RULE  # on CPU the sync is the C++ loop of csrc/lookahead.h (keep_step with the slow weights)

    def __init__(self, base_optimizer: Optimizer, backend: Backend) -> None:
        super().__init__([{"params": list(g["params"])} for g in base_optimizer.param_groups], {"maximize": False},
                         backend=backend)

    def _hyper(self, group: dict[str, Any]) -> tuple[float, ...]:
        return ()


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
        self.defaults = dict(sync_rate=float(sync_rate), sync_period=sync_period)
        for name in ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
                     "load_state_dict_post"):
            setattr(self, f"_optimizer_{name}_hooks", OrderedDict())
        self._patch_step_function()
        self.fast_steps = 0
        self._fused_sync = fused_sync and isinstance(base_optimizer, FusedOptimizer)
        self._holder = (base_optimizer if isinstance(base_optimizer, FusedOptimizer)
                        else _SlowWeights(base_optimizer, backend))
        self._holder.attach_slow_weights()
        self._rate = torch.tensor([float(sync_rate)], dtype=torch.float32)

    # ------------------------------------------------------------------ shared groups
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        raise AttributeError("a wrapper's param_groups are its base optimizer's; change those")

    @property
    def state(self) -> defaultdict[torch.Tensor, Any]:  # type: ignore[override]
        """Per param: ``slow_param``, a view into the flat slow-weight buffers (and the base's state when
        the base is a fusedoptim optimizer)."""
        return self._holder.state

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
        return self.defaults["sync_rate"]

    @property
    def sync_period(self) -> int:
        return self.defaults["sync_period"]

    # ------------------------------------------------------------------ slow weights
    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

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
    def state_dict(self) -> dict[str, Any]:
        """The base's state_dict plus, under ``"wrapper"``, the slow weights (by param index) and counters."""
        base = self.base_optimizer.state_dict()
        wrapper = {"fast_steps": self.fast_steps, **self.defaults,
                   "state": {i: self._wrapper_state(p) for i, p in enumerate(self._params())}}
        return {**base, "wrapper": wrapper}

    def _wrapper_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"slow_param": self.state[p]["slow_param"]}

    def _load_wrapper_state(self, p: torch.Tensor, saved: dict[str, torch.Tensor]) -> None:
        self.state[p]["slow_param"].copy_(saved["slow_param"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a wrapper state_dict; a plain base state_dict (no ``"wrapper"`` entry) restarts the slow
        weights from the current params, as virtex does."""
        wrapper = state_dict.get("wrapper")
        params = self._params()
        if wrapper is not None:
            missing = [i for i in range(len(params)) if i not in wrapper["state"]]
            if missing:
                raise ValueError(f"the wrapper state holds no slow weights for params {missing[:5]}")
            for i, p in enumerate(params):
                if wrapper["state"][i]["slow_param"].shape != p.shape:
                    raise ValueError(f"slow weights of param {i} have shape "
                                     f"{tuple(wrapper['state'][i]['slow_param'].shape)}, the param {tuple(p.shape)}")
        self.base_optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != "wrapper"})
        self._holder.attach_slow_weights()
        with torch.no_grad():
            if wrapper is None:
                for p in params:
                    self.state[p]["slow_param"].copy_(p)
                return
            self.fast_steps = int(wrapper["fast_steps"])
            self.defaults.update(sync_rate=float(wrapper["sync_rate"]), sync_period=int(wrapper["sync_period"]))
            self._rate = torch.tensor([self.sync_rate], dtype=torch.float32)
            for i, p in enumerate(params):
                self._load_wrapper_state(p, wrapper["state"][i])

    def __getstate__(self) -> dict[str, Any]:
        return {"base_optimizer": self.base_optimizer, "defaults": self.defaults, "_holder": self._holder,
                "fast_steps": self.fast_steps, "_rate": self._rate, "_fused_sync": self._fused_sync}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for name in ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
                     "load_state_dict_post"):
            self.__dict__.setdefault(f"_optimizer_{name}_hooks", OrderedDict())
        self._patch_step_function()

    def __repr__(self) -> str:
        base = repr(self.base_optimizer).replace("\n", "\n\t")
        lines = [f"{type(self).__name__} (", f"base_optimizer={base},"]
        lines += [f"{key}: {value}" for key, value in self.defaults.items()]
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
                        self._snapshots[q] = segment.view(self.sync_period, *q.shape)
            buffer = self._snapshots[p]
        return buffer

    def _after_base_step(self) -> None:
        slot = (self.fast_steps - 1) % self.sync_period
        with torch.no_grad():
            for p in self._params():
                self.snapshots(p)[slot].copy_(p)
        if self.fast_steps % self.sync_period == 0:
            self._holder.sync_now(self.last_rate())  # after the step: the rate needs its result

    def _wrapper_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**super()._wrapper_state(p), "snapshots": self.snapshots(p)}

    def _load_wrapper_state(self, p: torch.Tensor, saved: dict[str, torch.Tensor]) -> None:
        super()._load_wrapper_state(p, saved)
        self.snapshots(p).copy_(saved["snapshots"])

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_snapshots": self._snapshots}

    @torch.no_grad()
    def last_rate(self) -> torch.Tensor:
        """The rate the current ring buffer gives (a 0-d device tensor)."""
        coherences, counted = [], []
        for p in self._params():
            history = torch.cat([self.state[p]["slow_param"].unsqueeze(0), self.snapshots(p)])
            updates = (history[1:] - history[:-1]).reshape(self.sync_period, -1)
            deviation = (updates - updates.mean(0)).abs().amax(0)
            varies = deviation > 0
            ratio = torch.where(varies, updates.std(0) / torch.where(varies, deviation, 1.0), 0.0)
            count = varies.sum()
            coherences.append(ratio.sum() / count.clamp(min=1))
            counted.append(count > 0)
        coherence, counted_t = torch.stack(coherences), torch.stack(counted)
        mean = (coherence * counted_t).sum() / counted_t.sum().clamp(min=1)
        rate = torch.where(counted_t.any(), torch.clamp(1.0 - mean, min=self.sync_rate), self.sync_rate)
        return rate.to(torch.float32)
