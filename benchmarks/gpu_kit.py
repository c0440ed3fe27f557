"""The GPU proof kit: ``python -m benchmarks.gpu_kit [--out DIR] [--dry-run] [--device cpu --quick]``.

One command for a CUDA machine with triton that runs, each as a subprocess with its own time limit, and writes
into ONE folder (default ``benchmarks/results/gpu-kit-<date>-<shortcommit>/``):

1. ``parity``: tests/test_parity.py on CUDA tensors (``FUSEDOPTIM_TEST_DEVICE=cuda``): the compiled Triton kernels
   against the reference on the same device, fp32 and bf16 params (the C++ runs are collected as skipped);
2. ``wrappers``: tests/test_wrappers.py (Lookahead, Scout) and tests/test_capturable.py (a capturable step captured
   in a CUDA graph and replayed against eager steps) on CUDA tensors;
3. ``benchmark``: ``python -m benchmarks`` on the ResNet-50 and GPT-2 small profiles, fp32 and bf16, the Triton
   steps against torch's fused AdamW, timed with CUDA events;
4. ``host``: ``python -m benchmarks.host --real``, the host cost of a Triton step with real launches.

Each part's stdout and stderr go to ``<part>.stdout.txt`` / ``<part>.stderr.txt``, the test parts' results to
``<part>.junit.xml``, the benchmark's to ``<gpu-name>.csv/.md/.png`` and the host figures to ``host.json``; then
``summary.json`` and ``summary.md``: per part its command, exit code, wall seconds, pass/fail counts and key figures,
with the git commit, GPU, torch and triton versions and the date. A part that fails or runs out of time does not
stop the others. The time limits add up to under 8 minutes (``TIME_LIMITS``).

Without CUDA it refuses, in one line, unless asked for its CPU smoke test (``--device cpu --quick``: every part
tiny, the tests through the Triton interpreter), which checks the kit itself, not the kernels' speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .harness import Environment, _git_commit, read_csv

#: The repository root: the parts run from here (``tests/...``, ``-m benchmarks``).
ROOT = Path(__file__).resolve().parent.parent

#: Seconds each part may run on the GPU, full size. They add up to 450 s, so the kit, with its own start-up and
#: the summary, stays under 8 minutes even if every part runs out of time. Sized from the CPU runs and the compiled
#: code, not from a GPU run (none has happened yet): the test parts are dominated by Triton compiling each kernel
#: variant once (the benchmarks.compiled pass compiles 538 variants for 3 targets in 2-4 minutes on 2 cores), the
#: benchmark by 40 runs of about a second each (--max-seconds 1), the host part by 24 short runs.
TIME_LIMITS = {"parity": 180, "wrappers": 60, "benchmark": 150, "host": 60}

#: Seconds each part may run in ``--quick`` mode (a smoke test of the kit; on this 2-core CPU each takes 3-15 s).
QUICK_TIME_LIMITS = {"parity": 120, "wrappers": 60, "benchmark": 120, "host": 60}

#: What SIGTERM gets before SIGKILL when a part runs out of time (pytest-xdist workers stop with the session).
KILL_GRACE_S = 5


@dataclass(frozen=True)
class Part:
    """One subprocess of the kit: ``python <argv>`` with ``env`` over the kit's environment (None unsets)."""

    name: str
    title: str
    argv: list[str]
    limit_s: int
    env: dict[str, str | None] = field(default_factory=dict)
    junit: str | None = None  # the junit xml file name, for the test parts

    def command(self) -> str:
        """The command line as a shell would take it (for the log, the summary and ``--dry-run``)."""
        assigns = [f"{k}={shlex.quote(v)}" for k, v in self.env.items() if v is not None]
        unsets = [f"-u {k}" for k, v in self.env.items() if v is None]
        prefix = ["env", *unsets] if unsets else []
        return " ".join([*prefix, *assigns, "python", shlex.join(self.argv)])


def _workers(quick: bool) -> list[str]:
    """pytest-xdist workers for the test parts: the parts are dominated by Triton compiling each kernel variant,
    which is single-threaded per process, so one worker per core (at most 16; none for the tiny quick runs)."""
    if quick or importlib.util.find_spec("xdist") is None:
        return []
    return ["-n", str(min(16, os.cpu_count() or 1))]


def timed_impl(device: str) -> str:
    """The implementation the benchmark part times against torch's fused AdamW (which always runs: it anchors the
    speed-up): the Triton steps on CUDA; on CPU, where Triton is the interpreter and never benchmarked, the smoke
    test times the reference instead."""
    return "fusedoptim-triton" if device == "cuda" else "fusedoptim-reference"


def plan(out: Path, device: str, quick: bool) -> list[Part]:
    """The four parts, full size on ``cuda`` or tiny with ``quick``, writing into ``out``."""
    limits = QUICK_TIME_LIMITS if quick else TIME_LIMITS
    # Tests: the one device choice of tests/devices.py; on CPU through the interpreter, on CUDA compiled (an
    # inherited TRITON_INTERPRET would quietly test the interpreter instead). The benchmarks time compiled code.
    interpret = "1" if device == "cpu" else None
    test_env = {"FUSEDOPTIM_TEST_DEVICE": device, "TRITON_INTERPRET": interpret}
    bench_env: dict[str, str | None] = {} if device == "cpu" else {"TRITON_INTERPRET": None}

    def pytest_part(name: str, title: str, target: str, select: str | None) -> Part:
        junit = f"{name}.junit.xml"
        argv = ["-m", "pytest", "-x", "-q", *target.split(), *(["-k", select] if select else []), *_workers(quick),
                f"--junitxml={out / junit}"]
        return Part(name, title, argv, limits[name], test_env, junit)

    if quick:
        # An elementwise rule in fp32, a two-pass one in bf16; one fused Lookahead sync through Triton. The anchor's
        # algorithm, adamw, must be among the optimizers for the speed-up to be measured.
        parity = "(triton-adabelief-ragged and float32) or (triton-lamb-ragged and bfloat16)"
        wrappers: str | None = "fused_sync_matches and adabelief"
        bench = ["--profiles", "resnet50_l1", "--dtypes", "fp32", "--optimizers", "adamw,adabelief", "--steps", "3",
                 "--min-steps", "3", "--warmup", "0", "--max-seconds", "0.2"]
        host = ["--steps", "2", "--profiles", "resnet50", "--optimizers", "AdaBelief", "LAMB"]
    else:
        # fp32 and bf16 params, as issue 16 asks; fp16 is left out to keep the part small (all three:
        # `FUSEDOPTIM_TEST_DEVICE=cuda python -m pytest tests/test_parity.py`).
        parity = "float32 or bfloat16"
        wrappers = None
        bench = ["--profiles", "resnet50,gpt2", "--dtypes", "fp32,bf16", "--steps", "30", "--min-steps", "10",
                 "--warmup", "3", "--max-seconds", "1"]
        host = []
    impl = timed_impl(device)
    return [
        pytest_part("parity", "Triton vs reference, registry cases", "tests/test_parity.py", parity),
        pytest_part("wrappers", "Lookahead, Scout and CUDA-graph capture",
                    "tests/test_wrappers.py tests/test_capturable.py", wrappers),
        Part("benchmark", f"{impl} vs torch fused AdamW",
             ["-m", "benchmarks", "--device", device, *bench, "--impls", impl, "--out", str(out), "--no-progress"],
             limits["benchmark"], bench_env),
        Part("host", "host cost of a Triton step" + (", real launches" if device == "cuda" else ", launches stubbed"),
             ["-m", "benchmarks.host", *(["--real"] if device == "cuda" else []), *host,
              "--json", str(out / "host.json")], limits["host"], bench_env),
    ]


@dataclass
class Outcome:
    """What one part did."""

    name: str
    title: str
    command: str
    rc: int
    timed_out: bool
    wall_s: float
    limit_s: int
    stdout: str
    stderr: str
    tests: dict[str, int] | None = None
    failures: list[str] | None = None
    figures: Any = None


def run_part(part: Part, out: Path) -> Outcome:
    """Run ``part`` in its own process group with its stdout and stderr in ``out``; kill the group at its limit."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # unbuffered: a part killed at its limit keeps its last lines
    for key, value in part.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    stdout, stderr = out / f"{part.name}.stdout.txt", out / f"{part.name}.stderr.txt"
    start = time.perf_counter()
    timed_out = False
    with stdout.open("w") as fo, stderr.open("w") as fe:
        fo.write(f"$ {part.command()}\n")
        fo.flush()
        # Its own session, so that a part out of time is stopped with its children (xdist workers) and only them.
        proc = subprocess.Popen([sys.executable, *part.argv], cwd=ROOT, env=env, stdout=fo, stderr=fe,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=part.limit_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            proc.wait()
            rc = 124  # what timeout(1) returns
            fe.write(f"\ngpu_kit: {part.name} stopped at its time limit of {part.limit_s} s\n")
    outcome = Outcome(part.name, part.title, part.command(), rc, timed_out, round(time.perf_counter() - start, 1),
                      part.limit_s, stdout.name, stderr.name)
    if part.junit:
        outcome.tests, outcome.failures = junit_counts(out / part.junit)
    return outcome


def junit_counts(path: Path) -> tuple[dict[str, int] | None, list[str] | None]:
    """({total, passed, failed, errors, skipped}, the failed and erroring test ids) from a pytest junit xml;
    (None, None) when the file is missing or unreadable (the part crashed or was killed before writing it)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None, None
    counts = {"total": 0, "failed": 0, "errors": 0, "skipped": 0}
    for suite in root.iter("testsuite"):
        counts["total"] += int(suite.get("tests", 0))
        counts["failed"] += int(suite.get("failures", 0))
        counts["errors"] += int(suite.get("errors", 0))
        counts["skipped"] += int(suite.get("skipped", 0))
    counts["passed"] = counts["total"] - counts["failed"] - counts["errors"] - counts["skipped"]
    failures = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                if case.find("failure") is not None or case.find("error") is not None]
    return counts, failures


def benchmark_figures(out: Path, impl: str) -> dict[str, Any] | None:
    """Per (optimizer, profile, dtype): ``impl``'s median step time, speed-up over torch fused AdamW, GB/s and %
    of the copy bandwidth, beside fused AdamW's; and the copy bandwidth. Read from the CSV the benchmark wrote."""
    csvs = sorted(out.glob("*.csv"))
    if not csvs:
        return None
    rows = read_csv(csvs[0])
    runs: dict[str, dict[str, Any]] = {}
    copy_gbps = None
    for row in rows:
        if row.optimizer == "copy":
            copy_gbps = row.p50
        elif row.impl in (impl, "torch-fused"):
            key = f"{row.optimizer} {row.impl} {row.profile} {row.dtype}"
            runs.setdefault(key, {"optimizer": row.optimizer, "impl": row.impl, "profile": row.profile,
                                  "dtype": row.dtype})[row.metric] = row.p50
    return {"csv": csvs[0].name, "device": rows[0].device if rows else None, "copy_gbps": copy_gbps,
            "runs": list(runs.values())}


def host_figures(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "host.json").read_text())
    except (OSError, ValueError):
        return None


def default_out(commit: str, date: datetime.datetime, device: str, quick: bool) -> Path:
    """``benchmarks/results/gpu-kit-<date>-<shortcommit>``, with ``-2``, ``-3``... when it exists (a second run on
    one day must not mix its files with the first's). A quick run goes to ``gpu-kit-quick-<device>-...`` (git
    ignores those): a smoke test must never pass for the proof."""
    kind = f"gpu-kit-quick-{device}" if quick else "gpu-kit"
    base = ROOT / "benchmarks" / "results" / f"{kind}-{date:%Y-%m-%d}-{commit.replace('+', '-')}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def write_summary(out: Path, meta: dict[str, Any], outcomes: list[Outcome]) -> dict[str, Any]:
    """``summary.json`` (everything) and ``summary.md`` (the same, to read)."""
    summary = {**meta, "ok": all(o.rc == 0 for o in outcomes),
               "total_wall_s": round(sum(o.wall_s for o in outcomes), 1),
               "parts": [dataclasses.asdict(o) for o in outcomes]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))
    return summary


def _num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as markdown: the environment, one line per part, then the benchmark's and host part's figures."""
    lines = [f"# GPU proof kit: {summary['gpu']}", "",
             f"{summary['date']} · commit `{summary['commit']}` · torch {summary['torch']} · triton "
             f"{summary['triton']} · python {summary['python']}" + (" · **quick mode**" if summary["quick"] else ""),
             "", f"`{summary['kit_command']}`: {'all parts passed' if summary['ok'] else '**a part failed**'} in "
             f"{summary['total_wall_s']:.0f} s.", "",
             "| part | what | rc | wall s (limit) | passed | failed | errors | skipped | logs |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for part in summary["parts"]:
        tests = part["tests"] or {}
        rc = f"{part['rc']}" + (" (time limit)" if part["timed_out"] else "")
        lines.append(f"| {part['name']} | {part['title']} | {rc} | {part['wall_s']:.0f} ({part['limit_s']}) | "
                     + " | ".join(str(tests.get(k, "-")) for k in ("passed", "failed", "errors", "skipped"))
                     + f" | `{part['stdout']}`, `{part['stderr']}` |")
    for part in summary["parts"]:
        if part["failures"]:
            lines += ["", f"{part['name']} failed: " + ", ".join(f"`{f}`" for f in part["failures"][:10])]
    parts = {p["name"]: p for p in summary["parts"]}
    bench = parts.get("benchmark", {}).get("figures")
    if bench:
        lines += ["", f"## Benchmark (`{bench['csv']}`; copy bandwidth {_num(bench['copy_gbps'])} GB/s)", "",
                  "Median step time (ms), speed-up over torch fused AdamW's steps taken in turn with it (× > 1 is "
                  "faster), effective GB/s (bytes model / step time) and its % of the copy bandwidth.", "",
                  "| optimizer | impl | profile | dtype | ms/step | × fused AdamW | GB/s | % copy BW |",
                  "|---|---|---|---|---:|---:|---:|---:|"]
        for run in bench["runs"]:
            lines.append(f"| {run['optimizer']} | {run['impl']} | {run['profile']} | {run['dtype']} | "
                         f"{_num(run.get('step_ms'))} | {_num(run.get('speedup'))} | {_num(run.get('gbps'))} | "
                         f"{_num(run.get('bw_pct'))} |")
    host = parts.get("host", {}).get("figures")
    if host:
        lines += ["", f"## Host cost of a Triton step ({host['device']}, "
                  f"{'real launches' if host['real_launches'] else 'launches stubbed'}, median of {host['steps']})",
                  "", "| profile | optimizer | kept grads µs | moved grads µs | torch fused AdamW, 1-element tensors "
                  "µs |", "|---|---|---:|---:|---:|"]
        for row in host["rows"]:
            lines.append(f"| {row['profile']} | {row['optimizer']} | {row['kept_us']:.0f} | {row['moved_us']:.0f} | "
                         f"{row['torch_1elem_us']:.0f} |")
    return "\n".join(lines) + "\n"


def refusal(device: str, quick: bool) -> str | None:
    """Why the kit cannot run as asked here, in one line, or None."""
    if device == "cpu" and not quick:
        return "--device cpu runs only with --quick: on CPU the kit is a smoke test of itself, not a proof"
    if device == "cuda" and not torch.cuda.is_available():
        return ("no CUDA device (torch.cuda.is_available() is False): the kit proves the Triton kernels on a GPU; "
                "`--device cpu --quick` smoke-tests it on CPU")
    if device == "cuda" and importlib.util.find_spec("triton") is None:
        return "triton is not installed: pip install -e '.[test,bench]' (it pulls triton)"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_kit", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/gpu-kit-<date>-<commit>)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing, write nothing")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda: the proof; cpu: only with --quick, a smoke test of the kit (interpreted tests)")
    p.add_argument("--quick", action="store_true", help="every part tiny (seconds each): checks the kit runs")
    args = p.parse_args(argv)
    now = datetime.datetime.now(datetime.timezone.utc)
    commit = _git_commit()
    out = (args.out or default_out(commit, now, args.device, args.quick)).resolve()
    parts = plan(out, args.device, args.quick)
    if args.dry_run:
        print(f"would write {out}/ (summary.md, summary.json, one stdout/stderr file per part)")
        for part in parts:
            print(f"[{part.name}, limit {part.limit_s} s] {part.command()}")
        why = refusal(args.device, args.quick)
        if why:
            print(f"(and would refuse here: {why})")
        return 0
    why = refusal(args.device, args.quick)
    if why:
        print(f"gpu_kit: {why}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    env = Environment.detect(torch.device(args.device))  # the GPU's name (or cpu), torch, triton, commit
    kit_command = shlex.join(["python", "-m", "benchmarks.gpu_kit", *(argv if argv is not None else sys.argv[1:])])
    meta = {"kit_command": kit_command, "device": args.device, "quick": args.quick, "gpu": env.device,
            "torch": env.torch, "triton": env.triton, "python": sys.version.split()[0], "commit": env.commit,
            "date": env.date, "out": str(out)}
    outcomes = []
    for part in parts:
        print(f"gpu_kit: {part.name} (limit {part.limit_s} s): {part.command()}", file=sys.stderr, flush=True)
        outcome = run_part(part, out)
        if part.name == "benchmark":
            outcome.figures = benchmark_figures(out, timed_impl(args.device))
        elif part.name == "host":
            outcome.figures = host_figures(out)
        print(f"gpu_kit: {part.name} rc {outcome.rc} in {outcome.wall_s:.0f} s"
              + (f", tests {outcome.tests}" if outcome.tests else ""), file=sys.stderr, flush=True)
        outcomes.append(outcome)
        # Written after every part: a kit stopped from outside still leaves the summary of what ran.
        summary = write_summary(out, meta, outcomes)
    print(f"gpu_kit: {'all parts passed' if summary['ok'] else 'a part FAILED'}; wrote {out}/summary.md",
          file=sys.stderr)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
