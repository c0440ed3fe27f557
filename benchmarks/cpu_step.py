"""CPU step benchmark: the fused C++ kernels against the reference path and torch.optim.AdamW(fused=True).

ResNet-50's parameter profile (25,557,032 fp32 params in 161 tensors, the shapes of torchvision's resnet50
written out below: nothing is downloaded), fp32 params, grads and states. Everything runs in ONE process and
the implementations take turns step by step, so machine noise (about ±30% here) hits them alike and the
ratios are what to read. GB/s = optimizer.bytes_per_param(group, dtype) x numel / median step time
(torch fused AdamW: 28 B/param).

    python benchmarks/cpu_step.py [--threads 2] [--rounds 15] [--reference-rounds 3] [--optimizers LAMB,AdamP]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from fusedoptim import LAMB, LARS, AdaBelief, AdamP, Adan, AdEMAMix, FusedOptimizer, RaLars, TAdam, build

ADAMW_BYTES_PER_PARAM = 28  # read+write param, exp_avg, exp_avg_sq; read grad (fp32)

#: Every optimizer, with the settings timed: lr 1e-3 and weight decay 1e-2 (LARS with momentum 0.9, so that it
#: keeps a state like the others). Bytes per param (fp32): AdaBelief 28, Adan 44, AdEMAMix 36, LARS 28, LAMB 40,
#: RaLars 40, TAdam 44 (its pass A reads θ for the L2 decay), AdamP 40.
OPTIMIZERS: dict[str, tuple[type[FusedOptimizer], dict]] = {
    cls.__name__: (cls, dict(lr=1e-3, weight_decay=1e-2, **extra)) for cls, extra in (
        (AdaBelief, {}), (Adan, {}), (AdEMAMix, {}), (LARS, dict(momentum=0.9)), (LAMB, {}), (RaLars, {}),
        (TAdam, {}), (AdamP, {}))
}


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision.models.resnet50(), in model.parameters() order."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):  # layer1..layer4 of Bottleneck blocks
        for block in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),        # conv1, bn1
                       (planes, planes, 3, 3), (planes,), (planes,),          # conv2, bn2
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]  # conv3, bn3
            if block == 0:  # downsample: 1x1 conv and bn
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    shapes += [(1000, 2048), (1000,)]  # fc
    return shapes


def _params(shapes: list[tuple[int, ...]], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return params


def _time_once(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15, help="timed steps of each fused implementation")
    parser.add_argument("--reference-rounds", type=int, default=3, help="timed steps of each reference path")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated names (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    # Build time: in a fresh process, so that this process's own import does not hide it.
    probe = "import time; t = time.perf_counter(); from fusedoptim import build; build.cpu_extension(); " \
            "print(time.perf_counter() - t)"
    load_s = float(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                                  text=True).stdout.split()[-1])
    start = time.perf_counter()
    reason = build.cpu_unavailable_reason()
    if reason is not None:
        raise SystemExit(reason)
    in_process_s = time.perf_counter() - start

    shapes = resnet50_shapes()
    numel = sum(torch.Size(s).numel() for s in shapes)
    print(f"torch {torch.__version__}, {args.threads} threads, ResNet-50 profile: {numel:,} fp32 params "
          f"in {len(shapes)} tensors; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"extension load in a fresh process (import fusedoptim + build or cached load): {load_s:.1f} s; "
          f"in this process afterwards: {in_process_s:.2f} s")

    # name -> (step function, bytes per param); all share the machine turn by turn.
    impls: dict[str, tuple[Callable[[], object], int]] = {}
    keep = []
    params = _params(shapes, 0)
    adamw = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, fused=True)
    impls["torch AdamW(fused=True)"] = (adamw.step, ADAMW_BYTES_PER_PARAM)
    keep.append(params)
    names = [n for n in args.optimizers.split(",") if n]
    for name in names:
        cls, kwargs = OPTIMIZERS[name]
        for backend in ("cpu", "reference"):
            params = _params(shapes, 0)
            opt: FusedOptimizer = cls(params, **kwargs, backend=backend)
            impls[f"{name} {backend}"] = (opt.step, opt.bytes_per_param(opt.param_groups[0], torch.float32))
            keep.append(params)

    times: dict[str, list[float]] = {name: [] for name in impls}
    for step, _ in impls.values():  # warm-up: allocation of lazy state, first-touch page faults
        step()
    for r in range(args.rounds):
        for name, (step, _) in impls.items():
            if name.endswith("reference") and r >= args.reference_rounds:
                continue
            times[name].append(_time_once(step))

    base_ms = statistics.median(times["torch AdamW(fused=True)"]) * 1e3
    base_gbs = ADAMW_BYTES_PER_PARAM * numel / base_ms / 1e6
    print(f"\n{'implementation':26} {'B/param':>7} {'ms/step':>8} {'GB/s':>6} {'vs AdamW GB/s':>13}  "
          "(medians; ms min-max)")
    for name, (_, bpp) in impls.items():
        ms = [t * 1e3 for t in times[name]]
        med = statistics.median(ms)
        gbs = bpp * numel / med / 1e6
        print(f"{name:26} {bpp:7d} {med:8.1f} {gbs:6.1f} {gbs / base_gbs:12.2f}x  ({min(ms):.1f}-{max(ms):.1f})")
    print(f"\nbaseline: torch AdamW(fused=True) {base_ms:.1f} ms/step = {base_gbs:.1f} GB/s; "
          f"load average {os.getloadavg()[0]:.2f} at the end (other processes share the cores)")


if __name__ == "__main__":
    main()
