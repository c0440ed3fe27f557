"""The benchmark CLI: ``python -m benchmarks`` times every optimizer step implementation on this device.

Prints a markdown table and writes ``<out>/<device>.csv``, ``.md`` and ``.png``, by default into
``bench-results/<device>-<time>/`` (git-ignored: a run leaves the checkout clean); ``--refresh-reference`` writes
the committed ``benchmarks/results/`` instead. The device is picked
by itself (CUDA when there is one), and so are the defaults: on CPU, ResNet-50 in fp32 and bf16 with a
few timed steps (about 3 minutes on 2 cores); on a GPU, every profile with 50 timed steps.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from pathlib import Path

import torch

from .harness import DTYPES, Environment, Settings, noise_warning, run, write_csv
from .profiles import PROFILES
from .registry import ALGORITHMS, BY_NAME, implementations
from .report import markdown, plot

#: The committed reference results (--refresh-reference); a plain run never writes into the tracked tree.
REFERENCE_DIR = Path(__file__).resolve().parent / "results"


def default_out(stem: str, now: datetime.datetime | None = None) -> Path:
    """``bench-results/<device>-<YYYYmmdd-HHMMSS>/`` under the current directory (git-ignored in a checkout)."""
    return Path("bench-results") / f"{stem}-{(now or datetime.datetime.now()).strftime('%Y%m%d-%H%M%S')}"


#: Defaults per device type: (profiles, dtypes, steps, warmup, min_steps, max_seconds).
#: CPU: on 2 busy cores an unfused step over ResNet-50 takes 0.5-5 s (torch's fused AdamW 0.15 s), so each
#: implementation gets its first step plus at least 3 timed steps, and more only while under 1 s: 17 runs
#: in about 2.5 minutes. No warm-up beyond the first step: nothing compiles after it on CPU.
#: CUDA: a step is 0.1-50 ms and Triton compiles on the first, so every profile and dtype, 3 warm-up steps
#: and 10-50 timed ones.
DEFAULTS = {
    "cpu": (["resnet50"], ["fp32"], 30, 0, 3, 1.0),
    "cuda": (list(PROFILES), ["fp32", "bf16"], 50, 3, 10, 2.0),
}


def _csv_list(choices: list[str]):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return items
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--profiles", type=_csv_list(list(PROFILES)),
                   help="comma list; default: resnet50 on CPU, all on GPU")
    p.add_argument("--dtypes", type=_csv_list(list(DTYPES)),
                   help="param dtypes; default: fp32 on CPU, fp32,bf16 on GPU")
    p.add_argument("--optimizers", type=_csv_list(list(BY_NAME)), help="comma list (default: all)")
    p.add_argument("--impls", type=lambda s: set(s.split(",")),
                   help="comma list of impl labels, e.g. fusedoptim-reference,torch-fused,timm "
                        "(default: all; torch-fused always runs: it anchors the speed-up)")
    p.add_argument("--steps", type=int, help="timed steps per implementation, at most")
    p.add_argument("--min-steps", type=int, help="timed steps per implementation, at least")
    p.add_argument("--max-seconds", type=float, help="stop timing an implementation after this (past --min-steps)")
    p.add_argument("--warmup", type=int, help="untimed steps after the first step")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for <device>.csv / .md / .png (default: bench-results/<device>-<time>/ under the "
                        "current directory, git-ignored)")
    p.add_argument("--refresh-reference", action="store_true",
                   help=f"write into {REFERENCE_DIR.relative_to(REFERENCE_DIR.parents[1])}/ instead: the committed "
                        "reference results, refreshed only when asked")
    p.add_argument("--list", action="store_true", help="list what would run and what is skipped, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    profiles, dtypes, steps, warmup, min_steps, max_seconds = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    settings = Settings(device, steps=args.steps or steps,
                        warmup=warmup if args.warmup is None else args.warmup,
                        min_steps=args.min_steps or min_steps, max_seconds=args.max_seconds or max_seconds)
    profiles, dtypes = args.profiles or profiles, args.dtypes or dtypes
    algorithms = [BY_NAME[n] for n in args.optimizers] if args.optimizers else ALGORITHMS
    if args.list:
        for algo in algorithms:
            for dtype in dtypes:
                found, missing = implementations(algo, device, DTYPES[dtype])
                print(f"{algo.name:20} {dtype}: runs {', '.join(i.impl for i in found) or '-'}")
                for impl, why in missing:
                    print(f"{'':20}       skips {impl}: {why}")
        return 0
    env = Environment.detect(device)
    # Other processes on the cores change CPU timings several-fold: say how busy the machine was.
    before = os.getloadavg()[0]
    rows, skips = run(profiles, dtypes, algorithms, args.impls, settings, env, progress=not args.no_progress)
    load = (f" · machine load (1-min average) {before:.1f} before the run, {os.getloadavg()[0]:.1f} after, on "
            f"{os.cpu_count()} cores")
    stem = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", env.device.lower()).strip("-")
    described = (f"steps: first + {settings.warmup} warm-up + {settings.min_steps}–{settings.steps} timed "
                 f"(≤ {settings.max_seconds:g} s each)" + load)
    report = markdown(rows, skips, described, load=load.replace(" ·", ";", 1))
    out = REFERENCE_DIR if args.refresh_reference else args.out or default_out(stem)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / f"{stem}.csv")
    (out / f"{stem}.md").write_text(f"# fusedoptim optimizer-step benchmark: {env.device}\n\n{report}")
    plot(rows, out / f"{stem}.png")
    print(report)
    warning = noise_warning(rows, load.replace(" ·", ";", 1))
    if warning is not None:  # also at the top of the table, but a table is easy to skim past
        print(warning, file=sys.stderr)
    print(f"wrote {out / stem}.csv, .md, .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
