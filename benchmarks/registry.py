"""What is benchmarked: one line per algorithm, naming our class and every peer implementation of it.

An algorithm runs as

- ``fusedoptim-<backend>``: our class, once per backend that can run on the device (``triton`` on CUDA,
  ``cpu`` (the C++ kernels) and ``reference`` on CPU; ``reference`` on CUDA too, as the unfused baseline);
- the peers (``timm``, ``pytorch-optimizer``, ``holocron``, and torch's three AdamW implementations),
  each configured to compute the same algorithm as ours (the peer settings below), fed the
  same parameters and gradients.

Adding an optimizer is one ``Algorithm(...)`` line. Lines whose fusedoptim class does not exist yet are
listed and skipped, so LAMB, LARS, RaLars, TAdam, AdamP and Lookahead light up as soon as they land.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer

import fusedoptim

from . import peers

#: The anchor every row's speed-up is taken against: torch.optim.AdamW(fused=True).
ANCHOR = ("adamw", "torch-fused")

#: Our backends, in report order. Triton is never timed on CPU: there it is the interpreter (~1 ms per
#: program), a correctness tool, not an implementation anyone runs.
OUR_BACKENDS = ("triton", "cpu", "reference")

# Hyperparameters every implementation of an algorithm gets; weight decay is on so its code path is timed.
_ADAM = dict(lr=1e-3, weight_decay=1e-2)


@dataclass(frozen=True)
class Peer:
    """Another library's implementation: ``impl`` labels the row, ``target`` is ``"module:Class"``."""

    impl: str
    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Wrapper:
    """A wrapper (Lookahead) around the algorithm's optimizer.

    ``ours`` is the fusedoptim class name and its kwargs; ``peers`` maps a peer's impl label to its
    ``("module:Class", kwargs)``. ``extra_bytes`` is the wrapper's traffic per param element on a step that does
    not sync (used when our wrapper class does not report ``bytes_per_param`` itself), ``sync_extra_bytes`` on a
    sync step; ``sync_period`` says which steps sync (every implementation counts from the first step), so that the
    harness times them apart.
    """

    name: str
    ours: tuple[str, dict[str, Any]]
    peers: dict[str, tuple[str, dict[str, Any]]]
    extra_bytes: float = 0.0
    sync_extra_bytes: float = 0.0
    sync_period: int = 1

    def our_class(self) -> type[Optimizer] | None:
        """The fusedoptim wrapper class, or None while it does not exist on this branch."""
        return getattr(fusedoptim, self.ours[0], None)


@dataclass(frozen=True)
class Algorithm:
    """One algorithm: our class (by name), its hyperparameters, and the peers that compute the same thing.

    ``hyper`` goes to every implementation, ``ours`` to fusedoptim only, ``Peer.kwargs`` to that peer only.
    ``bytes_per_param`` is the bytes model of an algorithm without a fusedoptim class (torch's AdamW).
    """

    name: str
    cls: str | None
    hyper: dict[str, Any]
    peers: tuple[Peer, ...] = ()
    ours: dict[str, Any] = field(default_factory=dict)
    wrapper: Wrapper | None = None
    bytes_per_param: Callable[[torch.dtype], float] | None = None
    base: str | None = None  # a wrapper's line: the line of its base optimizer alone (its sync step is compared to it)

    def our_class(self) -> type[Optimizer] | None:
        """The fusedoptim class, or None while it does not exist on this branch."""
        return getattr(fusedoptim, self.cls, None) if self.cls else None


def _torch_adamw_bytes(dtype: torch.dtype) -> float:
    # torch keeps exp_avg and exp_avg_sq in the param dtype: read p, g, m, v and write p, m, v.
    return 7 * torch.empty(0, dtype=dtype).element_size()


def _peers(timm: tuple[str, dict] | None = None, po: tuple[str, dict] | None = None,
           holocron: tuple[str, dict] | None = None) -> tuple[Peer, ...]:
    """The library peers of one algorithm, from ``(module:Class, kwargs)`` per library."""
    given = (("timm", timm), ("pytorch-optimizer", po), ("holocron", holocron))
    return tuple(Peer(impl, *spec) for impl, spec in given if spec is not None)


#: Lookahead, fused into the base's last pass on sync steps: + 8 B (read and write the fp32 slow weights)
#: once every k = 6 steps (docs/design.md#bytes-model), nothing on the other steps.
LOOKAHEAD = Wrapper("lookahead", ("Lookahead", dict(sync_rate=0.5, sync_period=6)), {
    "timm": ("timm.optim.lookahead:Lookahead", dict(alpha=0.5, k=6)),
    "pytorch-optimizer": ("pytorch_optimizer:Lookahead", dict(alpha=0.5, k=6)),
    "holocron": ("holocron.optim.wrapper:Lookahead", dict(sync_rate=0.5, sync_period=6)),
}, sync_extra_bytes=8, sync_period=6)

#: Scout (holocron's): each of the first k - 1 steps of a period stores the params in the fp32 ring (+8 B: read θ,
#: write a row); the sync step reads θ, the slow weights and the k - 1 rows for the coherence (+28 B, k = 6), then
#: syncs (+16 B: read and write θ and the slow weights).
SCOUT = Wrapper("scout", ("Scout", dict(sync_rate=0.5, sync_period=6)), {
    "holocron": ("holocron.optim.wrapper:Scout", dict(sync_rate=0.5, sync_period=6)),
}, extra_bytes=8, sync_extra_bytes=28 + 16, sync_period=6)

ADAMW = Algorithm("adamw", None, _ADAM, bytes_per_param=_torch_adamw_bytes, peers=(
    Peer("torch-forloop", "torch.optim:AdamW", dict(foreach=False)),
    Peer("torch-foreach", "torch.optim:AdamW", dict(foreach=True)),
    Peer("torch-fused", "torch.optim:AdamW", dict(fused=True)),
))

# Peer settings that make them compute our algorithm.
_ADABELIEF = Algorithm("adabelief", "AdaBelief", _ADAM, _peers(
    timm=("timm.optim.adabelief:AdaBelief", dict(eps=1e-8, rectify=False, decoupled_decay=False)),
    po=("pytorch_optimizer:AdaBelief", dict(eps=1e-8, rectify=False, weight_decouple=False)),
    holocron=("holocron.optim:AdaBelief", {})))

ALGORITHMS: list[Algorithm] = [
    ADAMW,
    Algorithm("lars", "LARS", dict(lr=1e-1, momentum=0.9, weight_decay=1e-4), _peers(
        timm=("timm.optim.lars:Lars", dict(trust_coeff=1.0, always_adapt=True)),
        po=("pytorch_optimizer:LARS", dict(trust_coefficient=1.0)),
        holocron=("holocron.optim:LARS", {}))),
    Algorithm("lamb", "LAMB", _ADAM, _peers(
        timm=("timm.optim.lamb:Lamb", dict(eps=1e-8, max_grad_norm=None, always_adapt=True)),
        po=("pytorch_optimizer:Lamb", dict(eps=1e-8, weight_decouple=False)),
        holocron=("holocron.optim:LAMB", {}))),
    Algorithm("ralars", "RaLars", _ADAM, _peers(holocron=("holocron.optim:RaLars", {}))),
    Algorithm("tadam", "TAdam", _ADAM, _peers(holocron=("holocron.optim:TAdam", {}))),
    _ADABELIEF,
    Algorithm("adamp", "AdamP", _ADAM, _peers(
        timm=("timm.optim.adamp:AdamP", {}),
        po=("pytorch_optimizer:AdamP", {}),
        holocron=("holocron.optim:AdamP", {}))),
    Algorithm("adan", "Adan", _ADAM, _peers(
        timm=("timm.optim.adan:Adan", dict(no_prox=False)),
        po=("pytorch_optimizer:Adan", dict(weight_decouple=False)),
        holocron=("holocron.optim:Adan", {}))),
    Algorithm("ademamix", "AdEMAMix", _ADAM, _peers(
        po=("pytorch_optimizer:AdEMAMix", dict(weight_decouple=True)),
        holocron=("holocron.optim:AdEMAMix", {}))),
    dataclasses.replace(_ADABELIEF, name="lookahead-adabelief", wrapper=LOOKAHEAD, base="adabelief"),
    dataclasses.replace(_ADABELIEF, name="scout-adabelief", wrapper=SCOUT, base="adabelief"),
]

BY_NAME = {a.name: a for a in ALGORITHMS}


@dataclass(frozen=True)
class Impl:
    """One row of the benchmark: ``make(params)`` builds a fresh optimizer over ``params``."""

    optimizer: str
    impl: str
    make: Callable[[list[torch.Tensor]], Optimizer]


def _wrap(algo: Algorithm, impl: str, build: Callable[[list[torch.Tensor]], Optimizer]
          ) -> Callable[[list[torch.Tensor]], Optimizer] | None:
    """``build`` inside the algorithm's wrapper as ``impl`` implements it; None when ``impl`` has none."""
    wrapper = algo.wrapper
    if wrapper is None:
        return build
    if impl.startswith("fusedoptim"):
        wrapper_cls, kwargs = wrapper.our_class(), wrapper.ours[1]
    elif impl in wrapper.peers:
        target, kwargs = wrapper.peers[impl]
        wrapper_cls = peers.load(target)
    else:
        return None
    if wrapper_cls is None:
        return None
    return lambda params: wrapper_cls(build(params), **kwargs)


def backend_unavailable(cls: type[Optimizer], backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when ``cls(..., backend=backend)`` runs on ``device`` for ``dtype`` params, else why not.

    Probed by constructing on one small tensor: every fusedoptim optimizer rejects a backend that cannot
    run there (not built, not importable, wrong device or dtype) with a clear error at construction.
    """
    if backend == "triton" and device.type != "cuda":
        return "Triton runs on CPU only through its interpreter, which is a correctness tool"
    if backend == "cpu" and device.type != "cpu":
        return f"the C++ kernels run on CPU tensors, not {device.type}"
    if backend not in fusedoptim.BACKENDS:
        return f"backend {backend!r} is not in this fusedoptim (BACKENDS = {fusedoptim.BACKENDS})"
    try:
        cls([torch.zeros(16, device=device, dtype=dtype)], backend=backend)
    except (ValueError, RuntimeError) as exc:
        return str(exc)
    return None


def implementations(algo: Algorithm, device: torch.device, dtype: torch.dtype
                    ) -> tuple[list[Impl], list[tuple[str, str]]]:
    """The implementations of ``algo`` that can run here, and ``(impl, reason)`` for those that cannot."""
    impls: list[Impl] = []
    skipped: list[tuple[str, str]] = []
    cls = algo.our_class()
    if cls is None and algo.cls is not None:  # no fusedoptim class, no bytes model: the algorithm waits for it
        return [], [("fusedoptim", f"fusedoptim has no {algo.cls} yet")]
    if cls is not None and algo.wrapper is not None and algo.wrapper.our_class() is None:
        skipped.append(("fusedoptim", f"fusedoptim has no {algo.wrapper.ours[0]} yet"))
    elif cls is not None:
        for backend in OUR_BACKENDS:
            reason = backend_unavailable(cls, backend, device, dtype)
            if reason is not None:
                skipped.append((f"fusedoptim-{backend}", reason))
                continue

            def build(params, backend=backend):  # bind the loop variable
                return cls(params, backend=backend, **algo.hyper, **algo.ours)

            impl = f"fusedoptim-{backend}"
            impls.append(Impl(algo.name, impl, _wrap(algo, impl, build)))
    for peer in algo.peers:
        peer_cls = peers.load(peer.target)
        if peer_cls is None:
            skipped.append((peer.impl, f"{peer.target.split('.')[0]} is not installed"))
            continue

        def build(params, peer_cls=peer_cls, kwargs=peer.kwargs):
            return peer_cls(params, **algo.hyper, **kwargs)

        make = _wrap(algo, peer.impl, build)
        if make is None:
            skipped.append((peer.impl, f"{peer.impl} has no {algo.wrapper.name if algo.wrapper else ''}"))
            continue
        impls.append(Impl(algo.name, peer.impl, make))
    return impls, skipped


def bytes_per_step(algo: Algorithm, params: list[torch.Tensor]) -> float:
    """Bytes one step of ``algo`` must move over ``params``: our class's ``bytes_per_param`` model (a wrapper's: on
    a step that does not sync; its sync steps are timed apart).

    Every implementation of the algorithm is measured against this one model, so its GB/s is effective
    bandwidth: what a minimal fused implementation would need to move in the time it took.
    """
    if algo.bytes_per_param is not None:
        return sum(p.numel() * algo.bytes_per_param(p.dtype) for p in params)
    cls = algo.our_class()
    assert cls is not None, f"{algo.name} has neither a fusedoptim class nor a bytes model"
    model: Any = cls(params, backend="reference", **algo.hyper, **algo.ours)  # builds no state until a step
    extra = 0.0
    if algo.wrapper is not None:
        wrapper_cls = algo.wrapper.our_class()
        wrapped = None if wrapper_cls is None else wrapper_cls(model, **algo.wrapper.ours[1])
        if hasattr(wrapped, "bytes_per_param"):
            model = wrapped
        else:
            extra = algo.wrapper.extra_bytes
    return sum(p.numel() * (model.bytes_per_param(group, p.dtype) + extra)
               for group in model.param_groups for p in group["params"])
