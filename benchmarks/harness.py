"""Timing, the bytes model, the copy bandwidth and the CSV rows: everything between the registry and the report.

How one implementation is timed, on one parameter profile:

1. fresh copies of the profile's parameters and gradients (gradients are preset once, never from a
   backward pass, and copied per implementation because some peers modify ``p.grad``);
2. the first ``step()`` alone: its latency (state allocation, Triton JIT, C++ build) is a metric of its own;
3. ``warmup`` more steps, untimed;
4. up to ``steps`` timed steps, stopping early once ``max_seconds`` are spent and ``min_steps`` are in,
   so that slow implementations do not blow up the run time. On CUDA each step is bracketed by CUDA
   events (device time) and the host time is kept too (a step can be launch- or Python-bound); on CPU
   each step is timed with ``time.perf_counter``. Each timed step is preceded by a timed step of the
   anchor, torch's fused AdamW on its own copy of the profile, so the speed-up is a ratio of steps taken
   under the same load. A wrapper's sync steps (every ``sync_period``-th step, counted from the first) are
   timed apart, at least two of them, each after an anchor step too, and left out of its step time.

Noise: each speed-up is the ratio of the two steps of one round (anchor step / our step), so it is reported
with its spread over the rounds (min, p20, median, p80, max). When the anchor's own rounds differ by more than
``NOISE_THRESHOLD`` (max / min), or their median drifts that far from the median of all the anchor's steps in the
(profile, dtype) block, the machine's speed changed during the run; every row of that implementation is then marked
``noisy`` (CSV column, table, chart), and the CLI prints one warning with the machine load. The drift catches a run
whose few rounds were all slowed alike (under load, 3 rounds of AdamW at 1.3 s against its usual 20-80 ms agreed to
1%, and gave TAdam a "3.66x").
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import gc
import importlib.metadata
import itertools
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .profiles import PROFILES, Shape, numel
from .registry import ANCHOR, Algorithm, Impl, bytes_per_step, implementations


@dataclass(frozen=True)
class Row:
    """One CSV row: one metric of one (optimizer, impl, profile, dtype)."""

    optimizer: str
    impl: str
    profile: str
    dtype: str
    metric: str
    unit: str
    p50: float
    p20: float
    p80: float
    min: float
    max: float
    noisy: bool  # the anchor's rounds beside this implementation's varied by more than NOISE_THRESHOLD
    device: str
    torch: str
    triton: str
    commit: str
    date: str


#: The CSV schema.
FIELDS = tuple(f.name for f in dataclasses.fields(Row))

#: A run is noisy when the anchor's rounds beside it spread by more than this (max / min). Measured on this 2-core
#: machine (ResNet-50, fp32), quiet: torch fused AdamW's rounds beside one implementation spread 1.12-1.22x (20-30
#: rounds of 19-24 ms); one background job's burst in a run made it 2-3x, and that run's ratio 0.87-1.84x.
NOISE_THRESHOLD = 1.3

#: The columns read back as floats.
_FLOAT_FIELDS = ("p50", "p20", "p80", "min", "max")

#: metric -> unit, in report order.
METRICS = {
    "step_ms": "ms",          # time of one optimizer step
    "gbps": "GB/s",           # bytes model / step time
    "bw_pct": "%",            # gbps / copy bandwidth measured in the same run
    "speedup": "x",           # per round: torch fused AdamW's step time / this step time (taken in turn)
    "gbps_ratio": "x",        # this GB/s / torch fused AdamW's GB/s (the CPU target, docs/design.md#targets: >= 0.9)
    "first_step_ms": "ms",    # the first step alone: state allocation, JIT compilation
    "host_ms": "ms",          # CUDA only: host time to issue one step
    "bytes": "B/param",       # the bytes model: bytes a minimal step moves per parameter element
    "anchor_spread": "x",     # max / min of the anchor's rounds taken in turn with these (> NOISE_THRESHOLD: noisy)
    "anchor_drift": "x",      # their median / the median of all the anchor's steps in the block (noisy beyond it)
    "sync_step_ms": "ms",     # a wrapper's sync step (not in step_ms)
    "sync_x_base": "x",       # that sync step / a step of its base optimizer alone (same impl), in anchor steps
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Settings:
    """How long to time each implementation."""

    device: torch.device
    steps: int = 20
    warmup: int = 1
    min_steps: int = 3
    max_seconds: float = 2.0


@dataclass(frozen=True)
class Environment:
    """The columns every row repeats: where and with what the numbers were taken."""

    device: str
    torch: str
    triton: str
    commit: str
    date: str

    @classmethod
    def detect(cls, device: torch.device) -> Environment:
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
        else:
            name = f"cpu ({torch.get_num_threads()} threads)"
        try:
            triton = importlib.metadata.version("triton")
        except importlib.metadata.PackageNotFoundError:
            triton = "-"
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return cls(name, torch.__version__, triton, _git_commit(), date)


def _git_commit() -> str:
    """Short hash of the checkout the benchmark runs from, ``+dirty`` when files differ from it."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


@dataclass
class Timing:
    """Raw times of one implementation on one profile, in milliseconds."""

    first_ms: float
    step_ms: list[float]
    host_ms: list[float] | None  # CUDA only
    anchor_ms: list[float] | None = None  # the anchor's steps, taken in turn with these
    sync_ms: list[float] = dataclasses.field(default_factory=list)  # a wrapper's sync steps (not in step_ms)
    sync_anchor_ms: list[float] = dataclasses.field(default_factory=list)  # the anchor's steps taken in turn with them


def time_steps(step: Callable[[], object], settings: Settings, anchor: Callable[[], object] | None = None,
               sync_period: int = 1) -> Timing:
    """Time ``step`` as described in the module docstring: first step, warm-up, then timed steps.

    With ``anchor`` (torch fused AdamW's step on its own copy of the profile), every timed step is preceded
    by a timed anchor step, so the speed-up compares steps taken under the same machine load: on this
    2-core machine a neighbour's burst can slow one implementation's whole run by 2x. With ``sync_period`` k > 1
    (a wrapper), steps k, 2k, ... are its sync steps: timed into ``sync_ms`` (their anchor steps into
    ``sync_anchor_ms``), and the timing goes on until two of them are in.
    """
    cuda = settings.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    first_ms = 1e3 * (time.perf_counter() - t0)
    for _ in range(settings.warmup):
        step()
    sync()
    records: list[tuple[Any, float]] = []
    anchor_records: list[tuple[Any, float]] = []
    sync_records: list[tuple[Any, float]] = []
    sync_anchor_records: list[tuple[Any, float]] = []
    taken = 1 + settings.warmup  # steps so far, counted as the wrapper counts them
    min_syncs = 2 if sync_period > 1 else 0
    start = time.perf_counter()
    while len(records) + len(sync_records) < settings.steps and (
            len(records) < settings.min_steps or len(sync_records) < min_syncs
            or time.perf_counter() - start < settings.max_seconds):
        taken += 1
        is_sync = sync_period > 1 and taken % sync_period == 0
        if anchor is not None:
            (sync_anchor_records if is_sync else anchor_records).append(_record(anchor, cuda))
        (sync_records if is_sync else records).append(_record(step, cuda))
    sync()

    def device_ms(recs: list[tuple[Any, float]]) -> list[float]:
        # CUDA: the events' device time (readable after the synchronize above); CPU: the wall clock.
        return [events[0].elapsed_time(events[1]) if events else host for events, host in recs]

    return Timing(first_ms, device_ms(records), [h for _, h in records] if cuda else None,
                  device_ms(anchor_records) if anchor is not None else None, device_ms(sync_records),
                  device_ms(sync_anchor_records))


def _record(fn: Callable[[], object], cuda: bool) -> tuple[Any, float]:
    """Run ``fn`` once: (the CUDA events around it, or None on CPU; host milliseconds)."""
    events = None
    if cuda:
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        events[0].record()
    t = time.perf_counter()
    fn()
    host = 1e3 * (time.perf_counter() - t)
    if events is not None:
        events[1].record()
    return events, host


def copy_bandwidth(settings: Settings, nbytes: int) -> list[float]:
    """GB/s samples of ``dst.copy_(src)`` over ``nbytes``, counted as read + write: the memory roofline.

    On CPU an optimizer's in-place streams can beat it (a copy also reads the destination's cache lines
    before writing them), so % of copy bandwidth may exceed 100 there.
    """
    src = torch.ones(nbytes // 4, device=settings.device)
    dst = torch.empty_like(src)
    timing = time_steps(lambda: dst.copy_(src), dataclasses.replace(settings, warmup=2))
    return [2 * nbytes / (ms * 1e6) for ms in timing.step_ms]


def make_params(shapes: list[Shape], dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Parameters (N(0, 0.02), a typical init) and preset gradients (N(0, 1e-3)) of a profile."""
    gen = torch.Generator(device).manual_seed(seed)

    def randn(shape: Shape, scale: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device).mul_(scale).to(dtype)

    return [randn(s, 0.02) for s in shapes], [randn(s, 1e-3) for s in shapes]


def fresh_copies(params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Leaf copies of ``params`` with a copy of their gradient set: every implementation starts equal."""
    out = []
    for p, g in zip(params, grads, strict=True):
        q = p.clone().requires_grad_()
        q.grad = g.clone()
        out.append(q)
    return out


def release(device: torch.device) -> None:
    """Give the last implementation's memory back before the next one allocates (GPT-2 states are GBs)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def quantiles(values: Iterable[float]) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile), interpolated linearly between samples."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    deciles = statistics.quantiles(xs, n=10, method="inclusive")
    return statistics.median(xs), deciles[1], deciles[7]


def spread(values: Iterable[float]) -> tuple[float, float, float, float, float]:
    """(median, p20, p80, min, max): a metric's five columns."""
    xs = list(values)
    return (*quantiles(xs), min(xs), max(xs))


@dataclass
class Result:
    """One implementation measured on one profile and dtype, with what its derived metrics need."""

    optimizer: str
    impl: str
    profile: str
    dtype: str
    bytes_per_step: float
    numel: int
    timing: Timing
    anchor_bytes_per_step: float | None = None  # torch fused AdamW's bytes model on the same params
    base_speedup: float | None = None  # a wrapper's: its base optimizer's median speed-up alone (same impl)
    anchor_block_ms: float | None = None  # the median of all the anchor's steps in this (profile, dtype) block

    def rows(self, env: Environment, copy_gbps: float) -> list[Row]:
        """The CSV rows of this result.

        Rates are decreasing functions of the step time, so they are computed from its quantiles: the
        p20 of GB/s is the rate at the p80 step time, and p50 GB/s x p50 ms is exactly the bytes model.
        The speed-up is taken per round, the anchor's step over ours taken right after it under the same load,
        and summarised over the rounds; the GB/s ratio is the same ratio weighted by the two bytes models (ours
        over torch fused AdamW's). All rows are ``noisy`` when the anchor's rounds spread past NOISE_THRESHOLD.
        """
        step_ms = self.timing.step_ms
        t50, t20, t80 = quantiles(step_ms)
        out = {"step_ms": (t50, t20, t80, min(step_ms), max(step_ms))}

        def rate(numerator: float) -> tuple[float, ...]:
            return numerator / t50, numerator / t80, numerator / t20, numerator / max(step_ms), numerator / min(step_ms)

        out["gbps"] = rate(self.bytes_per_step / 1e6)  # bytes / ms / 1e6 = GB/s
        out["bw_pct"] = rate(100 * self.bytes_per_step / 1e6 / copy_gbps)
        is_anchor = (self.optimizer, self.impl) == ANCHOR
        anchor_ms = step_ms if is_anchor else self.timing.anchor_ms
        noisy = False
        if anchor_ms:
            rounds = [a / ours for a, ours in zip(anchor_ms, step_ms, strict=True)] if not is_anchor else [1.0]
            out["speedup"] = spread(rounds)
            if self.anchor_bytes_per_step:  # the same AdamW steps, each side at its own bytes model
                weight = self.bytes_per_step / self.anchor_bytes_per_step
                out["gbps_ratio"] = spread(r * weight for r in rounds)
            anchor_spread = max(anchor_ms) / min(anchor_ms)
            out["anchor_spread"] = (anchor_spread,) * 5
            noisy = anchor_spread > NOISE_THRESHOLD
            if self.anchor_block_ms:
                drift = statistics.median(anchor_ms) / self.anchor_block_ms
                out["anchor_drift"] = (drift,) * 5
                noisy = noisy or not 1 / NOISE_THRESHOLD <= drift <= NOISE_THRESHOLD
        out["first_step_ms"] = (self.timing.first_ms,) * 5
        if self.timing.host_ms is not None:
            out["host_ms"] = spread(self.timing.host_ms)
        out["bytes"] = (self.bytes_per_step / self.numel,) * 5
        if self.timing.sync_ms:
            out["sync_step_ms"] = spread(self.timing.sync_ms)
            if self.base_speedup and self.timing.sync_anchor_ms:
                # in anchor steps, each side taken in turn with its own: (sync / anchor) x (anchor / base), so that
                # the two runs' different machine loads cancel
                out["sync_x_base"] = spread(ms / anchor * self.base_speedup for ms, anchor in
                                            zip(self.timing.sync_ms, self.timing.sync_anchor_ms, strict=True))
        return [Row(self.optimizer, self.impl, self.profile, self.dtype, metric, METRICS[metric], *values, noisy,
                    *dataclasses.astuple(env)) for metric, values in out.items()]


def copy_rows(samples: list[float], env: Environment) -> list[Row]:
    """The copy-bandwidth row: optimizer ``copy``, impl ``torch``, no profile."""
    noisy = max(samples) / min(samples) > NOISE_THRESHOLD
    return [Row("copy", "torch", "-", "fp32", "gbps", "GB/s", *spread(samples), noisy, *dataclasses.astuple(env))]


def write_csv(rows: list[Row], path: Path) -> None:
    """Write ``rows`` with the header ``FIELDS``; numbers with 4 significant digits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS)
        for row in rows:
            values = dataclasses.astuple(row)
            writer.writerow([f"{v:.4g}" if isinstance(v, float) else int(v) if isinstance(v, bool) else v
                             for v in values])


def read_csv(path: Path) -> list[Row]:
    """Rows written by ``write_csv`` (the report can be re-rendered from a CSV alone)."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == FIELDS, f"{path}: columns {reader.fieldnames}, expected {FIELDS}"
        return [Row(**{k: float(v) if k in _FLOAT_FIELDS else v == "1" if k == "noisy" else v for k, v in r.items()})
                for r in reader]


def noise_warning(rows: Sequence[Row], load: str = "") -> str | None:
    """One line on the rows marked noisy, with the machine load (``load``), or None when none is."""
    noisy = {(r.optimizer, r.impl, r.profile, r.dtype) for r in rows if r.noisy and r.optimizer != "copy"}
    if not noisy:
        return None
    spreads = [r.p50 for r in rows if r.metric == "anchor_spread"] or [1.0]
    drifts = [max(r.p50, 1 / r.p50) for r in rows if r.metric == "anchor_drift"] or [1.0]
    timed = {(r.optimizer, r.impl, r.profile, r.dtype) for r in rows if r.optimizer != "copy"}
    return (f"WARNING: the machine's speed changed during the run{load}: in {len(noisy)} of {len(timed)} runs the "
            f"baseline's own rounds differed by more than {NOISE_THRESHOLD}x (up to {max(spreads):.2f}x) or drifted "
            f"that far from its usual step (up to {max(drifts):.2f}x). Their ratios are shown as ranges, marked noisy; "
            "rerun on a quiet machine for headline figures.")


@dataclass(frozen=True)
class Skip:
    """An implementation that did not run, and why (not installed, backend not built, dtype refused)."""

    optimizer: str
    impl: str
    profile: str
    dtype: str
    reason: str


def run(profiles: list[str], dtypes: list[str], algorithms: list[Algorithm], impls: set[str] | None,
        settings: Settings, env: Environment, progress: bool = True) -> tuple[list[Row], list[Skip]]:
    """Time every implementation of ``algorithms`` (restricted to ``impls`` when given) on every profile
    and dtype; return the CSV rows and the implementations that were skipped.

    torch's fused AdamW always runs, first in each (profile, dtype): it is the anchor of the speed-up, and
    its steps alternate with every other implementation's timed steps. A peer that fails (e.g. one that
    refuses bf16 params) is reported as skipped; so is a fusedoptim backend that says it "cannot run here"
    at its first step (the C++ kernels check that they can be built when a bucket is first laid out);
    any other fusedoptim failure is a bug and propagates.
    """
    device = settings.device
    plan: list[tuple[str, str, Algorithm, Impl]] = []
    skips: list[Skip] = []
    for profile, dtype in itertools.product(profiles, dtypes):
        for algo in algorithms:
            found, missing = implementations(algo, device, DTYPES[dtype])
            skips += [Skip(algo.name, impl, profile, dtype, why) for impl, why in missing
                      if impls is None or impl in impls]
            plan += [(profile, dtype, algo, i) for i in found
                     if impls is None or i.impl in impls or (i.optimizer, i.impl) == ANCHOR]
    bar = tqdm(total=len(plan) + 2, disable=not progress, unit="run", file=sys.stderr, dynamic_ncols=True)
    bar.set_description("copy bandwidth")
    copy_bytes = 256 * 2**20 if device.type == "cpu" else 2**30
    copy_gbps = copy_bandwidth(settings, copy_bytes)
    bar.update()
    results: dict[tuple[str, str, str, str], Result] = {}
    for (profile, dtype), block in itertools.groupby(plan, key=lambda item: item[:2]):
        shapes = PROFILES[profile]()
        params, grads = make_params(shapes, DTYPES[dtype], device)
        # The anchor runs first and stays alive: every later implementation's steps alternate with its steps.
        ordered = sorted(block, key=lambda item: (item[3].optimizer, item[3].impl) != ANCHOR)
        anchor: Result | None = None
        anchor_step: Callable[[], object] | None = None
        for _, _, algo, impl in ordered:
            bar.set_description(f"{profile} {dtype} {impl.optimizer} {impl.impl}")
            is_anchor = (impl.optimizer, impl.impl) == ANCHOR
            copies = fresh_copies(params, grads)
            try:
                opt = impl.make(copies)
                timing = time_steps(opt.step, settings, anchor=None if is_anchor else anchor_step,
                                    sync_period=algo.wrapper.sync_period if algo.wrapper is not None else 1)
            except Exception as exc:  # a peer's limitation is a result to report, ours is a bug
                if impl.impl.startswith("fusedoptim") and "cannot run here" not in str(exc):
                    raise
                skips.append(Skip(impl.optimizer, impl.impl, profile, dtype, f"{type(exc).__name__}: {exc}"))
            else:
                nbytes = bytes_per_step(algo, params)
                result = Result(impl.optimizer, impl.impl, profile, dtype, nbytes, numel(shapes), timing,
                                nbytes if is_anchor else anchor.bytes_per_step if anchor is not None else None)
                results[profile, dtype, impl.optimizer, impl.impl] = result
                if is_anchor:
                    anchor, anchor_step = result, opt.step
                elif anchor is not None and timing.anchor_ms:
                    # The anchor's row summarises all its steps, spread over the block, not only its own run.
                    anchor.timing.step_ms += timing.anchor_ms
            del copies
            opt = None
            release(device)
            bar.update()
        anchor_step = None
        del params, grads
        release(device)
    # Measured again at the end: one burst of load at the start must not set the roofline alone.
    bar.set_description("copy bandwidth")
    copy_gbps += copy_bandwidth(settings, copy_bytes)
    bar.update()
    rows = copy_rows(copy_gbps, env)
    for profile, dtype, algo, impl in plan:  # a wrapper's sync step against its base optimizer's step
        result, base = (results.get((profile, dtype, name, impl.impl)) for name in (impl.optimizer, algo.base))
        anchor_result = results.get((profile, dtype, *ANCHOR))
        if result is not None and anchor_result is not None:
            result.anchor_block_ms = statistics.median(anchor_result.timing.step_ms)
        if result is not None and base is not None and base.timing.anchor_ms:
            result.base_speedup = statistics.median(
                a / ours for a, ours in zip(base.timing.anchor_ms, base.timing.step_ms, strict=True))
    for profile, dtype, _, impl in plan:  # report in registry order
        if (profile, dtype, impl.optimizer, impl.impl) in results:
            rows += results[profile, dtype, impl.optimizer, impl.impl].rows(env, statistics.median(copy_gbps))
    bar.close()
    return rows, skips
