"""What a GPU would execute, checked without one: every Triton kernel variant fusedoptim launches, compiled for
sm_80 / sm_90 / sm_100 by ``python -m benchmarks.compiled`` in its own process (this test process runs the
Triton interpreter, whose kernels cannot be compiled), and the PTX / SASS figures it reads back.

The tests share one compile of all variants (about 540, 4-7 minutes of CPU on 2 cores) and run on one xdist
worker (``xdist_group``; the suite runs with ``--dist loadgroup``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import compiled

pytestmark = pytest.mark.xdist_group("compiled")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")  # not "module": an xdist worker that runs another module's test in between would
def report(tmp_path_factory) -> dict:  # tear a module fixture down and compile everything again
    out = tmp_path_factory.mktemp("compiled") / "variants.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.compiled", "--quiet", "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert out.exists(), f"the compile run wrote nothing (exit {done.returncode}):\n{done.stderr[-3000:]}"
    return json.loads(out.read_text())


def _streaming(report: dict) -> list[dict]:
    return [r for r in report["results"] if r["variant"]["pass_"] != "segment_sum" and r["error"] is None]


def _name(r: dict) -> str:
    v = r["variant"]
    return (f"{v['optimizer']}[{v['options']}] {v['pass_']} {v['dtype']} {'aligned' if v['aligned'] else 'unaligned'}"
            f"{' +sync' if v['sync'] else ''} sm_{v['arch']}")


def test_every_variant_compiles_for_every_target(report):
    failed = [f"{_name(r)}: {r['error']}" for r in report["results"] if r["error"]]
    assert not failed, "\n".join(failed)
    expected = compiled.variants()
    assert len(report["results"]) == len(expected)
    # each optimizer and pass, every dtype, aligned and not, with and without the fused sync, on all targets
    full = {(r["variant"]["optimizer"], r["variant"]["pass_"], r["variant"]["dtype"], r["variant"]["aligned"],
             r["variant"]["sync"], r["variant"]["arch"]) for r in report["results"]
            if r["variant"]["options"] in ("default", "sync")}
    for spec in compiled.OPTIMIZERS:
        passes = {r["variant"]["pass_"] for r in report["results"] if r["variant"]["optimizer"] == spec.name} - {
            "segment_sum"}
        last = "step" if "step" in passes else "apply"
        for pass_ in passes:
            for dtype in compiled.DTYPES:
                for aligned in (True, False):
                    for arch in compiled.ARCHS:
                        assert (spec.name, pass_, dtype, aligned, False, arch) in full
                        assert ((spec.name, pass_, dtype, aligned, True, arch) in full) == (pass_ == last)
    assert {arch for o, p, *_, arch in full if o == "lookahead"} == set(compiled.ARCHS)


def test_no_spills(report):
    spilled = [f"{_name(r)}: {r['spill_store_bytes']} B stored, {r['spill_load_bytes']} B loaded, "
               f"{r['local_bytes']} B local in the SASS" for r in report["results"]
               if r["spill_store_bytes"] or r["spill_load_bytes"] or r["stack_bytes"] or r["local_bytes"]]
    assert not spilled, "\n".join(spilled)


def test_aligned_variants_stream_128_bit(report):
    narrow = [f"{_name(r)}: {r['full_path_widths']}" for r in _streaming(report)
              if r["variant"]["aligned"] and r["full_path_widths"] != [128]]
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
        key = (v["optimizer"], v["options"], v["dtype"], v["aligned"], v["arch"])
        by_step.setdefault(key, []).append(r)
    checked = 0
    for (name, options, dtype, _, _), results in by_step.items():
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
    assert checked == len(compiled.OPTIMIZERS) * len(compiled.DTYPES) * 2 * len(compiled.ARCHS)


def test_occupancy_of_the_streaming_kernels(report):
    """At least 50% theoretical occupancy on sm_90 for every aligned kernel with fp32 params, and with 16-bit
    params for the default options without a sync. The 16-bit variants that stream 6-7 arrays at 8 elements per
    thread (the price of 128-bit param loads) may take up to 84 registers (31%): they must still keep 4x the
    bytes in flight that Little's law asks of an H100 SM (modelled: 3.35 TB/s × 1 µs / 132 SMs)."""
    low = []
    for r in _streaming(report):
        v = r["variant"]
        if v["arch"] != 90 or not v["aligned"] or r["occupancy"] >= 0.5:
            continue
        result = compiled.Result(None, occupancy=r["occupancy"], load_bytes=r["load_bytes"], block=r["block"],
                                 threads=r["threads"])
        in_flight = compiled.in_flight_bytes(result) / compiled.NEEDED_IN_FLIGHT
        if v["dtype"] == "fp32" or (v["options"] == "default" and not v["sync"]) or in_flight < 4:
            low.append(f"{_name(r)}: {r['regs']} registers, {r['occupancy']:.0%}, {in_flight:.1f}x in flight")
    assert not low, "\n".join(low)


def test_segment_sums_are_small(report):
    sums = [r for r in report["results"] if r["variant"]["pass_"] == "segment_sum"]
    assert {r["variant"]["arch"] for r in sums} == set(compiled.ARCHS)
    for r in sums:
        assert r["regs"] <= 64 and r["error"] is None, _name(r)


def test_report_counts_launches_under_the_interpreter():
    launches = compiled.count_launches(["adan", "lamb"])
    assert launches == {"adan": 1, "lamb": 3}
