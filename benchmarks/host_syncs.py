"""Host reads per step, and compiled graphs under a changing learning rate, for every optimizer and wrapper.

A host read of a device tensor (``.item()``, ``.tolist()``, ``float()``, ``int()``, ``bool()``, ``.cpu()``) waits for
the GPU: in a training loop it is a host sync per step, and under torch.compile a graph break. This counts them per
step, after a 2-step warm-up, over 6 steps (two Lookahead / Scout syncs at k = 3), by patching those methods to
count, in four modes:

- ``float lr``: a plain step, its lr a float a scheduler changes;
- ``tensor lr``: the lr a 0-d tensor changed in place every step (the torch.compile recipe);
- ``tensor betas``: the betas 0-d tensors too (as torch's Adam takes them), the first changed in place every step;
- ``GradScaler``: ``torch.amp.GradScaler("cpu").step(opt)`` and ``update()``, a float lr;
- ``capturable``: ``capturable=True`` (its lr on the device, changed in place).

Then ``torch.compile(opt.step)`` with the tensor lr changed every step: the graphs compiled after the warm-up (a
recompile is a new graph) and the graph breaks.

On this machine the tensors are CPU tensors, so a read costs nothing here: the count is what would be a host sync
on a GPU. The Triton path runs in the interpreter (the same Python above the kernels as on a GPU); the C++ path's
host reads are of CPU memory by design. ``python -m benchmarks.host_syncs [--backend triton|cpu] [--compile]``
prints the table (about 2 minutes for the Triton path on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import warnings
from collections.abc import Callable, Iterator

if __name__ == "__main__":  # run on CPU: the Triton path through the interpreter, set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from torch.optim import Optimizer

import fusedoptim

from .registry import ALGORITHMS, LOOKAHEAD, SCOUT

SHAPES = [(64,), (33, 31), (4, 3, 2, 2)]
MODES = ("float lr", "tensor lr", "tensor betas", "GradScaler", "capturable")
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu")
WARM_UP, STEPS = 2, 6


@contextlib.contextmanager
def counting_host_reads(counted: list[str]) -> Iterator[None]:
    """Every call of a host read on a tensor appends its name to ``counted``."""
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def counter(name: str) -> Callable:
        def read(self, *args, **kwargs):
            counted.append(name)
            return saved[name](self, *args, **kwargs)
        return read

    for name in READS:
        setattr(torch.Tensor, name, counter(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


Make = Callable[[list[torch.Tensor], dict], Optimizer]


def makers(backend: str) -> dict[str, Make]:
    """Every fusedoptim optimizer, Lookahead and Scout around AdaBelief (k = 3), and torch's AdamW for comparison."""
    out: dict[str, Make] = {}
    for algorithm in ALGORITHMS:
        cls = algorithm.our_class()
        if cls is None or algorithm.wrapper is not None:
            continue
        out[algorithm.name] = (lambda c, a: lambda ps, kw: c(ps, **{**a.hyper, **a.ours, **kw}, backend=backend))(
            cls, algorithm)
    adabelief = out["adabelief"]
    for wrapper in (LOOKAHEAD, SCOUT):
        cls = wrapper.our_class()
        if cls is not None:
            settings = {**wrapper.ours[1], "sync_period": 3}
            out[f"{wrapper.name}(adabelief)"] = (lambda c, s: lambda ps, kw: c(adabelief(ps, kw), **s))(cls, settings)
    out["torch AdamW foreach"] = lambda ps, kw: torch.optim.AdamW(ps, foreach=True, **kw)
    out["torch AdamW fused"] = lambda ps, kw: torch.optim.AdamW(ps, fused=True, **kw)
    return out


def host_reads_per_step(name: str, make: Make, mode: str) -> float | None:
    """The host reads per step in ``mode`` after the warm-up; None where the optimizer has no such mode."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    kwargs = {"lr": torch.tensor(1e-3)} if mode in ("tensor lr", "tensor betas") else {"lr": 1e-3}
    if mode == "capturable":
        kwargs["capturable"] = True
    if mode == "capturable" and name.startswith("torch"):
        return None  # torch's capturable AdamW runs on CUDA only
    opt = None
    for betas in ((0.9, 0.999), (0.9, 0.99, 0.999)) if mode == "tensor betas" else (None,):
        if betas is not None:
            kwargs["betas"] = tuple(torch.tensor(b) for b in betas)
        try:
            opt = make(params, kwargs)
            break
        except (TypeError, ValueError):  # no such mode in this version or optimizer, or the other count of betas
            continue
    if opt is None:
        return None
    scaler = torch.amp.GradScaler("cpu") if mode == "GradScaler" else None
    counted: list[str] = []
    for step in range(WARM_UP + STEPS):
        scale = None if scaler is None else scaler.scale(torch.ones(()))  # what a scaled loss would carry
        for p in params:  # in place: a capturable step refuses a grad that moved
            grad = torch.randn(p.shape, generator=gen) * (1.0 if scale is None else scale)
            p.grad = grad if p.grad is None else p.grad.copy_(grad)
        with counting_host_reads(counted) if step >= WARM_UP else contextlib.nullcontext():
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            group = opt.param_groups[0]
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].mul_(0.9)
            else:
                group["lr"] = group["lr"] * 0.9
            if mode == "tensor betas":
                group["betas"][0].mul_(0.99)
    return len(counted) / STEPS


def compiled_graphs(make: Make) -> tuple[int, int, int] | None:
    """(graphs compiled in the warm-up, graphs compiled after it, graph breaks) of ``torch.compile(opt.step)`` with a
    tensor lr changed every step; None where the optimizer refuses a tensor lr."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    try:
        opt = make(params, {"lr": torch.tensor(1e-3)})
    except ValueError:  # torch's foreach AdamW
        return None
    step = torch.compile(opt.step)
    graphs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(WARM_UP + STEPS):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            step()
            opt.param_groups[0]["lr"].mul_(0.9)
            graphs.append(counters["stats"]["unique_graphs"])
    return graphs[WARM_UP - 1], graphs[-1] - graphs[WARM_UP - 1], sum(counters["graph_break"].values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_syncs", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="triton", choices=("triton", "cpu", "reference"))
    parser.add_argument("--compile", action="store_true", help="also count the graphs of torch.compile(opt.step)")
    args = parser.parse_args(argv)
    print(f"fusedoptim {getattr(fusedoptim, '__version__', '?')}, backend {args.backend}: host reads per step "
          f"(each a host sync on a GPU), steps {WARM_UP + 1}-{WARM_UP + STEPS}")
    header = ["optimizer", *MODES] + (["compile: graphs warm-up / after / breaks"] if args.compile else [])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, make in makers(args.backend).items():
        cells = [name]
        for mode in MODES:
            reads = host_reads_per_step(name, make, mode)
            cells.append("—" if reads is None else f"{reads:g}")
        if args.compile:
            graphs = compiled_graphs(make)
            cells.append("—" if graphs is None else " / ".join(map(str, graphs)))
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
