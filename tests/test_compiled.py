"""What a GPU would execute, checked without one: every Triton kernel variant fusedoptim launches, compiled for
sm_80 / sm_90 / sm_100 by ``python -m benchmarks.compiled`` in its own process (this test process runs the
Triton interpreter, whose kernels cannot be compiled), and the PTX / SASS figures it reads back.

The tests share one compile of all variants (552; 1.5-4 minutes on 2 cores with a cold Triton cache, 13 s
warm): the first xdist worker to need it compiles under a file lock, the others read its JSON (with
``xdist_group`` and ``--dist loadgroup`` the tests still landed on both workers here, pytest 9.2 and pytest-xdist
3.8, and each compiled everything).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import compiled

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def report(tmp_path_factory) -> dict:
    # the run's base directory: shared by its xdist workers (each has a subdirectory), new for every run
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = root / "compiled-variants.json"
    with open(root / "compiled-variants.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker compiles; the others wait for its file
        if not out.exists():
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            partial = out.with_suffix(".partial")
            done = subprocess.run([sys.executable, "-m", "benchmarks.compiled", "--quiet", "--json", str(partial)],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
            assert partial.exists(), f"the compile run wrote nothing (exit {done.returncode}):\n{done.stderr[-3000:]}"
            partial.rename(out)
    return json.loads(out.read_text())


def _streaming(report: dict) -> list[dict]:
    """The step kernels and Lookahead's sync, whose full-block and tail paths are read apart."""
    return [r for r in report["results"] if r["variant"]["pass_"] not in ("segment_sum", "scout")
            and r["error"] is None]


def _name(r: dict) -> str:
    v = r["variant"]
    return f"{v['optimizer']}[{v['options']}] {v['pass_']} {v['dtype']}{' +sync' if v['sync'] else ''} sm_{v['arch']}"


def test_every_variant_compiles_for_every_target(report):
    failed = [f"{_name(r)}: {r['error']}" for r in report["results"] if r["error"]]
    assert not failed, "\n".join(failed)
    expected = compiled.variants()
    assert len(report["results"]) == len(expected)
    # each optimizer and pass, every dtype, with and without the fused sync, on all targets
    full = {(r["variant"]["optimizer"], r["variant"]["pass_"], r["variant"]["dtype"], r["variant"]["sync"],
             r["variant"]["arch"]) for r in report["results"]
            if r["variant"]["options"] in ("default", "sync")}
    for spec in compiled.OPTIMIZERS:
        passes = {r["variant"]["pass_"] for r in report["results"] if r["variant"]["optimizer"] == spec.name} - {
            "segment_sum"}
        last = "step" if "step" in passes else "apply"
        for pass_ in passes:
            for dtype in compiled.DTYPES:
                for arch in compiled.ARCHS:
                    assert (spec.name, pass_, dtype, False, arch) in full
                    assert ((spec.name, pass_, dtype, True, arch) in full) == (pass_ == last)
    assert {arch for o, p, *_, arch in full if o == "lookahead"} == set(compiled.ARCHS)


def test_no_spills(report):
    spilled = [f"{_name(r)}: {r['spill_store_bytes']} B stored, {r['spill_load_bytes']} B loaded, "
               f"{r['local_bytes']} B local in the SASS" for r in report["results"]
               if r["spill_store_bytes"] or r["spill_load_bytes"] or r["stack_bytes"] or r["local_bytes"]]
    assert not spilled, "\n".join(spilled)


def test_full_blocks_stream_128_bit(report):
    """The full-block path (taken by every aligned chunk) moves everything in 128-bit accesses."""
    narrow = [f"{_name(r)}: {r['full_path_widths']}" for r in _streaming(report) if r["full_path_widths"] != [128]]
    assert not narrow, "\n".join(narrow)
    # ptxas keeps the PTX's vector accesses: as many 128-bit LDG / STG in the SASS as ld / st.global.v4 in the PTX
    read = [r for r in _streaming(report) if r["sass_loads"]]
    assert read, "no variant's SASS was read"
    for r in read:
        assert r["sass_loads"].get("128", 0) == r["ptx_loads"].get("128", 0), _name(r)
        assert r["sass_stores"].get("128", 0) == r["ptx_stores"].get("128", 0), _name(r)


def test_bytes_per_param_are_the_minimum(report):
    by_step: dict[tuple, list[dict]] = {}
    for r in _streaming(report):
        v = r["variant"]
        assert len(set(r["path_bytes"])) == 1, f"{_name(r)}: full and tail paths move {r['path_bytes']} B/element"
        if v["optimizer"] == "lookahead":  # the standalone sync: read θ and the fp32 slow weight, write both
            assert r["path_bytes"][0] == v["bytes_model"], _name(r)
            continue
        key = (v["optimizer"], v["options"], v["dtype"], v["arch"])
        by_step.setdefault(key, []).append(r)
    checked = 0
    for (name, options, dtype, _), results in by_step.items():
        plain = sum(r["path_bytes"][0] for r in results if not r["variant"]["sync"])
        model = results[0]["variant"]["bytes_model"]
        assert plain == model, f"{name}[{options}] {dtype}: compiled {plain} B/param, bytes model {model}"
        for synced in (r for r in results if r["variant"]["sync"]):  # + read and write the fp32 slow weight
            apply = next(r for r in results if r["variant"]["pass_"] == synced["variant"]["pass_"]
                         and not r["variant"]["sync"])
            assert synced["path_bytes"][0] == apply["path_bytes"][0] + 8, _name(synced)
        if options == "default":
            spec = compiled.BY_NAME[name]
            minimum = {"fp32": spec.minimal_fp32, "bf16": spec.minimal_bf16, "fp16": spec.minimal_bf16}[dtype]
            assert plain == minimum, f"{name} {dtype}: compiled {plain} B/param, minimum {minimum}"
            checked += 1
    assert checked == len(compiled.OPTIMIZERS) * len(compiled.DTYPES) * len(compiled.ARCHS)


def test_occupancy_of_the_streaming_kernels(report):
    """At least 50% theoretical occupancy on sm_90 for every kernel with fp32 params. 16-bit params take 8
    elements per thread (the price of 128-bit param loads), and the variants that stream 5-7 arrays (Adan, a fused
    sync, AdamP with amsgrad) take 68-85 registers (31-44%; capped at 64 they spill): they must still keep 4x the
    bytes in flight that Little's law asks of an H100 SM (modelled: 3.35 TB/s × 1 µs / 132 SMs). Adan's bf16
    kernel went from 64 to 75 registers when its previous-gradient copy moved to bf16 (38 -> 34 B/param)."""
    low = []
    for r in _streaming(report):
        v = r["variant"]
        if v["arch"] != 90 or r["occupancy"] >= 0.5:
            continue
        result = compiled.Result(None, occupancy=r["occupancy"], load_bytes=r["load_bytes"], block=r["block"],
                                 threads=r["threads"])
        in_flight = compiled.in_flight_bytes(result) / compiled.NEEDED_IN_FLIGHT
        if v["dtype"] == "fp32" or in_flight < 4:
            low.append(f"{_name(r)}: {r['regs']} registers, {r['occupancy']:.0%}, {in_flight:.1f}x in flight")
    assert not low, "\n".join(low)


def test_segment_sums_are_small(report):
    """The segment sums, with each two-pass rule's finalize in their epilogue (fp64 for RaLars, TAdam and AdamP)
    and without, on every target."""
    sums = [r for r in report["results"] if r["variant"]["pass_"] == "segment_sum"]
    assert {r["variant"]["arch"] for r in sums} == set(compiled.ARCHS)
    import fusedoptim

    finalized = {r["variant"]["optimizer"] for r in sums if r["variant"]["rule"][0]}
    assert finalized == {spec.name for spec in compiled.OPTIMIZERS if getattr(fusedoptim, spec.cls).rule.two_pass}
    for r in sums:
        assert r["regs"] <= 64 and r["error"] is None, _name(r)


def test_scouts_kernel_moves_full_blocks_128_bit(report):
    """Scout's ring and coherence kernel in its three launches (a snapshot, the sums, the position read on the
    device), every dtype and target: its full aligned blocks load and store 128 bits at a time (masked everywhere
    before: 32-bit fp32 and 16-bit bf16 accesses only), within 64 registers (50% occupancy) and without a spill."""
    scout = [r for r in report["results"] if r["variant"]["pass_"] == "scout"]
    assert {(r["variant"]["options"], r["variant"]["dtype"], r["variant"]["arch"]) for r in scout} == {
        (mode, dtype, arch) for mode in compiled.SCOUT_MODES for dtype in compiled.DTYPES for arch in compiled.ARCHS}
    for r in scout:
        assert r["error"] is None and r["ptx_loads"].get("128", 0) >= 1 and r["ptx_stores"].get("128", 0) >= 1, (
            _name(r), r["ptx_loads"], r["ptx_stores"])
        if r["variant"]["options"] != "snapshot":  # the slow weights and the ring rows as well as the params
            assert r["ptx_loads"]["128"] >= 3, (_name(r), r["ptx_loads"])
        assert r["regs"] <= 64, (_name(r), r["regs"])


def test_report_counts_launches_under_the_interpreter():
    launches = compiled.count_launches(["adan", "lamb"])
    assert launches == {"adan": 1, "lamb": 3}


def test_tool_reports_are_kept_by_the_tools_and_the_bytes(tmp_path, monkeypatch):
    """ptxas's and cuobjdump's reports are kept under the hash of the tool's bytes, its arguments and the bytes it
    read: the same bytes are not read again, even by the same tool elsewhere (a new virtual environment); other
    bytes or another tool are."""
    import shutil

    import triton

    monkeypatch.setattr(triton.knobs.cache, "dir", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    tool = tmp_path / "tool"
    tool.write_text(f"#!/bin/sh\necho run >> {runs}\nprintf '%s ' \"$@\"\ncat \"$4\" | tr a-z A-Z\n")
    tool.chmod(0o755)

    def report(data: bytes, path=tool) -> str:
        return compiled._tool_output(str(path), ["-v", "-o", "{tmp}/out"], data, "in.txt", "stdout")

    first = report(b"kernel one")
    assert first.startswith("-v -o ") and first.endswith("KERNEL ONE") and "{tmp}" not in first
    assert report(b"kernel one") == first and runs.read_text().count("run") == 1
    assert report(b"kernel two").endswith("KERNEL TWO") and runs.read_text().count("run") == 2
    elsewhere = tmp_path / "venv" / "tool"
    elsewhere.parent.mkdir()
    shutil.copy2(tool, elsewhere)
    assert report(b"kernel one", elsewhere) == first and runs.read_text().count("run") == 2  # the same tool
    other = tmp_path / "other-tool"
    other.write_text(tool.read_text().replace("tr a-z A-Z", "cat"))
    other.chmod(0o755)
    assert report(b"kernel one", other).endswith("kernel one") and runs.read_text().count("run") == 3
