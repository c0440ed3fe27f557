"""The host cost of a Triton step: ``python -m benchmarks.host``.

Everything a Triton step does on the host (validation, tables, the finalize's torch ops, launch arguments) is
timed with the kernel launches stubbed out, so it runs on any machine; with ``--real`` on CUDA the launches are
real. Each optimizer steps a profile's params twice as often: with **kept** grads (the same tensors every step)
and with **moved** grads (two sets of grad tensors in turns, as ``zero_grad(set_to_none=True)`` and FSDP2 give:
every address changes every step). Beside it, in the same process, torch's fused AdamW steps as many 1-element
tensors: its per-tensor host cost, the bar to beat. Medians of ``--steps`` steps, in µs.

Also ``--table-1b``: the time and memory to build and pack the chunk table of a 1 B-param bucket at the compiled
block size (512 fp32 elements per program), what a first step or a change of the grad set costs at that size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .profiles import PROFILES

if not torch.cuda.is_available():  # the Triton path takes CPU tensors through the interpreter (stubbed here)
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: The optimizers timed: each fusedoptim class with its constructor defaults.
OPTIMIZERS = ("AdaBelief", "Adan", "AdEMAMix", "LARS", "LAMB", "RaLars", "TAdam", "AdamP")


def _profiles() -> dict[str, list[tuple[int, ...]]]:
    return {"resnet50": PROFILES["resnet50"](), "gpt2": PROFILES["gpt2"](), "2000 tensors": [(1000,)] * 2000}


@contextlib.contextmanager
def stubbed_launches() -> Iterator[None]:
    """Kernel launches do nothing (but count), and the chunk tables use the compiled block and group sizes."""
    from fusedoptim import kernels

    saved = kernels.launch_step, kernels.launch_segment_sum, kernels.block_size, kernels._launch.SUM_GROUP

    def launch_step(*args, **kwargs):
        kernels.LAUNCH_COUNTS["multi_tensor_step_kernel"] += 1

    def launch_segment_sum(*args, **kwargs):
        kernels.LAUNCH_COUNTS["segment_sum_kernel"] += 1

    kernels.launch_step, kernels.launch_segment_sum = launch_step, launch_segment_sum
    kernels.block_size = lambda dtype: kernels._launch.BLOCK_COMPILED[dtype]
    kernels._launch.SUM_GROUP = kernels._launch.SUM_GROUP_COMPILED
    try:
        yield
    finally:
        kernels.launch_step, kernels.launch_segment_sum, kernels.block_size, kernels._launch.SUM_GROUP = saved


def _time_once(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e6


def _steps(name: str, shapes: list[tuple[int, ...]], device: torch.device) -> tuple[Callable, Callable]:
    """(kept, moved): one step of optimizer ``name`` on params of ``shapes`` with the same grads every step, and
    with two sets of grads in turns."""
    import fusedoptim

    params = [torch.zeros(s, device=device) for s in shapes]
    grad_sets = [[torch.full(s, 1e-3, device=device) for s in shapes] for _ in range(2)]
    opt = getattr(fusedoptim, name)(params, backend="triton")
    turn = [0]

    def kept():
        for p, g in zip(params, grad_sets[0], strict=True):
            p.grad = g
        opt.step()

    def moved():
        turn[0] ^= 1
        for p, g in zip(params, grad_sets[turn[0]], strict=True):
            p.grad = g
        opt.step()

    kept(), moved(), kept()  # lay out, and build the tables of both sets once
    return kept, moved


def _torch_adamw_step(num_tensors: int, device: torch.device) -> Callable:
    """torch's fused AdamW step on ``num_tensors`` 1-element tensors."""
    params = [torch.zeros(1, device=device) for _ in range(num_tensors)]
    for p in params:
        p.grad = torch.ones(1, device=device)
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    opt.step()
    return opt.step


def measure(name: str, shapes: list[tuple[int, ...]], device: torch.device, steps: int) -> dict[str, float]:
    """Medians over ``steps`` rounds of a kept step, a moved step and torch's fused AdamW step (µs), and the medians
    of the per-round ratios. The three are interleaved within each round, so that the machine's noise (±30% here)
    hits them alike: a ratio of medians timed minutes apart moved by 2× between runs."""
    kept, moved = _steps(name, shapes, device)
    anchor = _torch_adamw_step(len(shapes), device)
    rounds = [(_time_once(kept, device), _time_once(moved, device), _time_once(anchor, device))
              for _ in range(steps)]
    k, m, a = (statistics.median(column) for column in zip(*rounds, strict=True))
    return {"kept_us": k, "moved_us": m, "torch_1elem_us": a,
            "moved_over_kept": statistics.median(r[1] / r[0] for r in rounds),
            "moved_over_torch": statistics.median(r[1] / r[2] for r in rounds)}


def table_1b() -> tuple[float, float]:
    """(seconds, MB) to build and pack the chunk table of a 1 B-param fp32 bucket (GPT-2-like layers)."""
    from fusedoptim import kernels
    from fusedoptim._layout import chunk_table_tensors, padded_offsets

    numels = [50257 * 1600] + [1600 * 1600 * 4, 1600 * 6400 * 2, 1600] * 48
    numels = numels[: next(i for i in range(len(numels)) if sum(numels[:i]) >= 1_000_000_000)]
    offsets, _ = padded_offsets(numels)
    with stubbed_launches():  # the compiled block and group sizes
        start = time.perf_counter()
        table = chunk_table_tensors(numels, tuple(range(len(numels))), kernels.block_size(torch.float32))
        packed, _ = kernels.pack_chunk_table(offsets, table, torch.device("cpu"))
        seconds = time.perf_counter() - start
    return seconds, packed.numel() * packed.element_size() / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--real", action="store_true", help="real launches (CUDA only)")
    parser.add_argument("--optimizers", nargs="*", default=list(OPTIMIZERS))
    parser.add_argument("--profiles", nargs="*", default=list(_profiles()))
    parser.add_argument("--table-1b", action="store_true", help="also time the chunk table of 1 B params")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file (benchmarks.gpu_kit)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.real else "cuda" if torch.cuda.is_available() else "cpu")
    if args.real and not torch.cuda.is_available():
        parser.error("--real needs a CUDA device")
    stub = contextlib.nullcontext() if args.real else stubbed_launches()
    print(f"host µs per Triton step on {device} ({'real launches' if args.real else 'launches stubbed'}), "
          f"medians of {args.steps} rounds (kept, moved, torch interleaved); ratios: medians of the rounds' ratios")
    print(f"{'profile':<14}{'optimizer':<11}{'kept':>9}{'moved':>9}{'moved/kept':>12}{'torch 1-elem':>14}"
          f"{'moved/torch':>13}")
    figures: dict = {"device": str(device), "real_launches": args.real, "steps": args.steps, "rows": []}
    with stub:
        for profile, shapes in _profiles().items():
            if profile not in args.profiles:
                continue
            for name in args.optimizers:
                row = measure(name, shapes, device, args.steps)
                print(f"{profile:<14}{name:<11}{row['kept_us']:>9.0f}{row['moved_us']:>9.0f}"
                      f"{row['moved_over_kept']:>12.2f}{row['torch_1elem_us']:>14.0f}{row['moved_over_torch']:>13.2f}",
                      flush=True)
                figures["rows"].append({"profile": profile, "optimizer": name, **row})
    if args.table_1b:
        seconds, megabytes = table_1b()
        print(f"chunk table of 1 B fp32 params (512 per program): {seconds:.2f} s, {megabytes:.0f} MB")
        figures["table_1b"] = {"seconds": seconds, "megabytes": megabytes}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
