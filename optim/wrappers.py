"""Lookahead (Zhang et al., 2019, https://arxiv.org/abs/1907.08610) and holocron's Scout, around any optimizer.

One shared wrapper base: the wrapper's ``param_groups`` ARE the base's (an LR scheduler or GradScaler on the
wrapper acts on the real learning rate), ``zero_grad`` delegates, ``add_param_group`` extends the slow
weights, and ``state_dict`` holds the base's state plus the slow weights and counters.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from ._validation import check_non_negative


class _SyncWrapper(Optimizer):
    """Keeps fp32 slow weights of every param of ``base_optimizer``; every ``sync_period`` steps moves them
    towards the fast weights by a rate and copies them back: slow ← slow + rate·(fast − slow); fast ← slow."""

    def __init__(self, base_optimizer: Optimizer, sync_rate: float, sync_period: int, min_period: int) -> None:
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
        self.state: defaultdict[torch.Tensor, Any] = defaultdict(dict)
        self.fast_steps = 0
        for group in base_optimizer.param_groups:
            self._init_slow(group["params"])

    # ------------------------------------------------------------------ shared groups
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        raise AttributeError("a wrapper's param_groups are its base optimizer's; change those")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.base_optimizer.add_param_group(param_group)
        self._init_slow(self.base_optimizer.param_groups[-1]["params"])

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

    def _init_slow(self, params: list[torch.Tensor]) -> None:
        for p in params:
            # fp32 slow weights also for bf16/fp16 params: interpolation in the param dtype would round
            # every sync away (a bf16 step of 1e-3 relative is below half an ulp).
            self.state[p]["slow_param"] = p.detach().to(torch.promote_types(p.dtype, torch.float32), copy=True)

    @torch.no_grad()
    def _sync(self, rate: float | torch.Tensor) -> None:
        for p in self._params():
            slow = self.state[p]["slow_param"]
            slow.lerp_(p.to(slow.dtype), rate)
            p.copy_(slow)

    def _after_base_step(self) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Step the base optimizer, then synchronise the slow weights every ``sync_period`` steps."""
        loss = self.base_optimizer.step(closure) if closure is not None else self.base_optimizer.step()
        self.fast_steps += 1
        self._after_base_step()
        return loss

    # ------------------------------------------------------------------ state_dict
    def state_dict(self) -> dict[str, Any]:
        """The base's state_dict plus, under ``"wrapper"``, the slow weights (by param index) and counters."""
        base = self.base_optimizer.state_dict()
        index = {id(p): i for i, p in enumerate(self._params())}
        wrapper = {"fast_steps": self.fast_steps, **self.defaults,
                   "state": {index[id(p)]: dict(s) for p, s in self.state.items() if id(p) in index}}
        return {**base, "wrapper": wrapper}

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
        if wrapper is None:
            self.state = defaultdict(dict)
            self._init_slow(params)
            return
        self.fast_steps = int(wrapper["fast_steps"])
        self.defaults.update(sync_rate=float(wrapper["sync_rate"]), sync_period=int(wrapper["sync_period"]))
        self.state = defaultdict(dict)
        for i, p in enumerate(params):
            self.state[p] = {name: value.to(device=p.device, dtype=_state_dtype(p, value), copy=True)
                             for name, value in wrapper["state"][i].items()}

    def __getstate__(self) -> dict[str, Any]:
        return {"base_optimizer": self.base_optimizer, "defaults": self.defaults, "state": self.state,
                "fast_steps": self.fast_steps}

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


def _state_dtype(p: torch.Tensor, value: torch.Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32) if value.is_floating_point() else value.dtype


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
    """

    def __init__(self, base_optimizer: Optimizer, sync_rate: float = 0.5, sync_period: int = 6, *,
                 k: int | None = None, alpha: float | None = None) -> None:
        super().__init__(base_optimizer, sync_rate if alpha is None else alpha,
                         sync_period if k is None else k, min_period=1)
        self._backup: dict[torch.Tensor, torch.Tensor] | None = None

    def _after_base_step(self) -> None:
        if self.fast_steps % self.sync_period == 0:
            self._sync(self.sync_rate)

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
    """

    def __init__(self, base_optimizer: Optimizer, sync_rate: float = 0.5, sync_period: int = 6) -> None:
        super().__init__(base_optimizer, sync_rate, sync_period, min_period=2)

    def _init_slow(self, params: list[torch.Tensor]) -> None:
        super()._init_slow(params)
        for p in params:
            slow = self.state[p]["slow_param"]
            self.state[p]["snapshots"] = slow.new_zeros((self.sync_period, *slow.shape))

    def _after_base_step(self) -> None:
        slot = (self.fast_steps - 1) % self.sync_period
        with torch.no_grad():
            for p in self._params():
                self.state[p]["snapshots"][slot].copy_(p)
        if self.fast_steps % self.sync_period == 0:
            self._sync(self.last_rate())

    @torch.no_grad()
    def last_rate(self) -> torch.Tensor:
        """The rate the current ring buffer gives (a 0-d device tensor)."""
        coherences, counted = [], []
        for p in self._params():
            state = self.state[p]
            history = torch.cat([state["slow_param"].unsqueeze(0), state["snapshots"]])
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
