"""The benchmark harness (benchmarks/): profiles, bytes model, registry probing, and one end-to-end run.

The benchmark itself is not a test; these check that what it reports is computed as documented.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch

import fusedoptim
from benchmarks import __main__ as cli
from benchmarks import gpu_kit
from benchmarks.harness import (
    FIELDS,
    Environment,
    Result,
    Settings,
    Timing,
    noise_warning,
    quantiles,
    read_csv,
    time_steps,
    write_csv,
)
from benchmarks.profiles import PROFILES, numel
from benchmarks.registry import ALGORITHMS, BY_NAME, backend_unavailable, bytes_per_step, implementations
from benchmarks.report import markdown, plot


@pytest.mark.parametrize(("name", "tensors", "elements"), [
    ("resnet50", 161, 25_557_032),   # torchvision resnet50()
    ("vit_b16", 152, 86_567_656),    # torchvision vit_b_16()
    ("gpt2", 148, 124_439_808),      # Hugging Face gpt2, lm_head tied
    ("many_small", 4096, 4096 * 4096),
    ("one_big", 1, 8192 * 8192),
])
def test_profiles_have_the_models_parameter_counts(name, tensors, elements):
    shapes = PROFILES[name]()
    assert len(shapes) == tensors
    assert numel(shapes) == elements


@pytest.mark.parametrize(("algo", "dtype", "expected"), [
    ("adabelief", torch.float32, 28), ("adan", torch.float32, 44), ("ademamix", torch.float32, 36),
    ("adabelief", torch.bfloat16, 22),  # bf16 p, g; fp32 states
    ("adan", torch.bfloat16, 34),  # and Adan's previous gradient in bf16 (docs/design.md#bytes-model)
    ("adamw", torch.float32, 28), ("adamw", torch.bfloat16, 14),  # torch keeps AdamW's states in the param dtype
])
def test_bytes_model_matches_design_table(algo, dtype, expected):
    params = [torch.zeros(3, 5, dtype=dtype), torch.zeros(7, dtype=dtype)]
    assert bytes_per_step(BY_NAME[algo], params) == expected * 22


def test_wrapper_bytes_are_those_of_a_step_that_does_not_sync():
    """A wrapper's sync steps are timed apart, so its bytes model is that of its other steps: Lookahead's are the
    base's; Scout's store the params in its ring (+8 B)."""
    params = [torch.zeros(6)]
    base = bytes_per_step(BY_NAME["adabelief"], params)
    assert bytes_per_step(BY_NAME["lookahead-adabelief"], params) == base
    assert bytes_per_step(BY_NAME["scout-adabelief"], params) == base + 6 * 8
    assert BY_NAME["scout-adabelief"].wrapper.sync_period == BY_NAME["scout-adabelief"].wrapper.ours[1]["sync_period"]


def test_sync_steps_are_timed_apart_and_against_the_base_step():
    """With a sync period k, steps k, 2k, ... (counted from the first step) go into sync_ms (their anchor steps into
    sync_anchor_ms) until two are in; the rows give their spread and, in anchor steps, their ratio to the base
    optimizer's step: (sync / anchor) x the base's speed-up, so that the two runs' machine loads cancel."""
    calls, clock = [], iter(range(10_000))
    settings = Settings(torch.device("cpu"), steps=50, warmup=1, min_steps=2, max_seconds=0.0)
    timing = time_steps(lambda: calls.append(next(clock)), settings, anchor=lambda: calls.append("anchor"),
                        sync_period=3)
    # first (1), warm-up (2), then 3 = sync, 4, 5, 6 = sync: two syncs, and at least min_steps plain steps
    assert calls == [0, 1] + ["anchor", 2, "anchor", 3, "anchor", 4, "anchor", 5]
    assert len(timing.sync_ms) == len(timing.sync_anchor_ms) == 2
    assert len(timing.step_ms) == len(timing.anchor_ms) == 2
    # the sync steps take 5 and 12 anchor-ms of 1 and 2; the base alone ran at 0.8x the anchor (2.5 ms vs 2)
    result = Result("scout-adabelief", "fusedoptim-cpu", "p", "fp32", 36 * 10, 10,
                    Timing(1.0, [2.0, 2.2], None, [1.0, 1.0], sync_ms=[5.0, 12.0], sync_anchor_ms=[1.0, 2.0]), 280,
                    base_speedup=0.8)
    rows = {r.metric: r for r in result.rows(Environment("cpu", "t", "t", "c", "d"), 1.0)}
    assert (rows["sync_step_ms"].p50, rows["sync_step_ms"].min, rows["sync_step_ms"].max) == (8.5, 5.0, 12.0)
    x = rows["sync_x_base"]
    assert (x.p50, x.min, x.max) == pytest.approx((4.4, 4.0, 4.8))
    line = next(y for y in markdown(list(rows.values())).splitlines() if y.startswith("| scout-adabelief"))
    assert "| 8.5 (4.40×) |" in line


def test_backend_probe_skips_what_cannot_run_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    # This process runs Triton through the interpreter (tests/conftest.py): it is still never benchmarked.
    assert "interpreter" in backend_unavailable(fusedoptim.Adan, "triton", cpu, torch.float32)
    assert backend_unavailable(fusedoptim.Adan, "reference", cpu, torch.bfloat16) is None
    assert backend_unavailable(fusedoptim.Adan, "cpu", cpu, torch.float32) is None  # the C++ kernels build here
    assert "not meta" in backend_unavailable(fusedoptim.Adan, "cpu", torch.device("meta"), torch.float32)
    found, skipped = implementations(BY_NAME["adan"], cpu, torch.float32)
    # in OUR_BACKENDS order; peers (timm, ...) follow when installed
    assert [i.impl for i in found if i.impl.startswith("fusedoptim")] == ["fusedoptim-cpu", "fusedoptim-reference"]
    assert [i for i, _ in skipped if i.startswith("fusedoptim")] == ["fusedoptim-triton"]
    # a fusedoptim without the C++ backend (an older one): its cpu implementation is skipped, with the reason
    monkeypatch.setattr(fusedoptim, "BACKENDS", tuple(b for b in fusedoptim.BACKENDS if b != "cpu"))
    assert "not in this fusedoptim" in backend_unavailable(fusedoptim.Adan, "cpu", cpu, torch.float32)
    found, skipped = implementations(BY_NAME["adan"], cpu, torch.float32)
    assert [i.impl for i in found if i.impl.startswith("fusedoptim")] == ["fusedoptim-reference"]
    assert "not in this fusedoptim" in dict(skipped)["fusedoptim-cpu"]


def test_every_implementation_found_here_takes_a_step():
    """Every impl the registry builds here (peers too, when installed) steps tiny params downhill."""
    for algo in ALGORITHMS:
        for impl in implementations(algo, torch.device("cpu"), torch.float32)[0]:
            p = torch.ones(4, 3, requires_grad=True)
            p.grad = torch.full_like(p, 0.5)
            opt = impl.make([p])
            for _ in range(3):  # TAdam's first step is ~1e-10 by design (w ≈ 0 while v = 0)
                opt.step()
            assert (p.detach() < 1).all(), (algo.name, impl.impl)


def test_time_steps_stops_at_the_budget_and_alternates_with_the_anchor():
    calls = []
    settings = Settings(torch.device("cpu"), steps=50, warmup=2, min_steps=3, max_seconds=0.0)
    timing = time_steps(lambda: calls.append("step"), settings)
    assert calls == ["step"] * (1 + 2 + 3)  # first, warm-up, timed
    assert len(timing.step_ms) == 3 and timing.host_ms is None and timing.anchor_ms is None
    calls.clear()
    timing = time_steps(lambda: calls.append("step"), settings, anchor=lambda: calls.append("anchor"))
    assert calls == ["step"] * 3 + ["anchor", "step"] * 3
    assert len(timing.anchor_ms) == len(timing.step_ms) == 3
    assert quantiles([4.0, 1.0, 2.0, 3.0, 5.0]) == (3.0, pytest.approx(1.8), pytest.approx(4.2))


def test_speedup_is_taken_per_round_with_its_spread():
    """A result's speed-up is, per round, the anchor's step over the step taken right after it, summarised over the
    rounds (median, p20, p80, min, max); the GB/s ratio weights it by the two bytes models; step-time rates are
    computed from the step time's quantiles (p20 of a rate at p80 of the time)."""
    timing = Timing(first_ms=9.0, step_ms=[1.0, 2.0, 4.0, 2.0, 1.0], host_ms=None, anchor_ms=[3.0, 3.2, 3.0, 3.1, 3.0])
    result = Result("adan", "fusedoptim-reference", "p", "fp32", bytes_per_step=44 * 10, numel=10, timing=timing,
                    anchor_bytes_per_step=28 * 10)
    env = Environment("cpu", "t", "t", "c", "d")
    rows = {r.metric: r for r in result.rows(env, copy_gbps=1.0)}
    t50, t20, t80 = quantiles(timing.step_ms)
    assert (t50, t20, t80) == pytest.approx((2.0, 1.0, 2.4))

    def columns(metric):
        return rows[metric].p50, rows[metric].p20, rows[metric].p80, rows[metric].min, rows[metric].max

    assert columns("step_ms") == (t50, t20, t80, 1.0, 4.0)
    rounds = [3.0, 1.6, 0.75, 1.55, 3.0]
    assert columns("speedup") == pytest.approx((*quantiles(rounds), 0.75, 3.0))
    assert rows["gbps_ratio"].p50 == pytest.approx(1.6 * 44 / 28)
    assert rows["gbps"].p50 == pytest.approx(440 / 1e6 / t50) and rows["bytes"].p50 == 44
    assert rows["first_step_ms"].p50 == 9.0 and "host_ms" not in rows
    assert rows["anchor_spread"].p50 == pytest.approx(3.2 / 3.0) and not any(r.noisy for r in rows.values())
    # without anchor steps (a run alone), no speed-up is reported rather than a ratio of nothing
    alone = Result("adan", "fusedoptim-reference", "p", "fp32", 440, 10, Timing(9.0, [1.0, 2.0], None))
    assert {r.metric for r in alone.rows(env, 1.0)}.isdisjoint({"speedup", "gbps_ratio", "anchor_spread"})


def _synthetic(ours_ms: list[float], anchor_ms: list[float]) -> list:
    """The rows of one run of AdamW against itself at the given round times, with the anchor's own row."""
    env = Environment("cpu", "t", "t", "c", "d")
    ours = Result("adamw", "torch-foreach", "resnet50", "fp32", 28 * 10, 10, Timing(1.0, ours_ms, None, anchor_ms),
                  anchor_bytes_per_step=28 * 10)
    anchor = Result("adamw", "torch-fused", "resnet50", "fp32", 28 * 10, 10, Timing(1.0, list(anchor_ms), None),
                    anchor_bytes_per_step=28 * 10)
    return anchor.rows(env, 1.0) + ours.rows(env, 1.0)


def test_a_step_twice_the_baselines_is_a_speedup_of_one_half_in_csv_and_table(tmp_path):
    """Synthetic rounds where our step takes 2x the anchor's: the report says 0.5 (not 2), in the rows, the CSV
    read back and the markdown table."""
    rows = _synthetic([20.0, 22.0, 20.4, 21.0], [10.0, 11.0, 10.2, 10.5])
    speedup = next(r for r in rows if r.impl == "torch-foreach" and r.metric == "speedup")
    assert (speedup.p50, speedup.min, speedup.max) == pytest.approx((0.5, 0.5, 0.5))
    write_csv(rows, tmp_path / "cpu.csv")
    back = read_csv(tmp_path / "cpu.csv")  # every column round-trips, the numbers to the CSV's 4 significant digits
    assert [dataclasses.replace(r, p50=0, p20=0, p80=0, min=0, max=0) for r in back] == [
        dataclasses.replace(r, p50=0, p20=0, p80=0, min=0, max=0) for r in rows]
    assert [dataclasses.astuple(r)[6:11] for r in back] == [
        pytest.approx(dataclasses.astuple(r)[6:11], rel=1e-3) for r in rows]
    table = markdown(rows)
    line = next(x for x in table.splitlines() if x.startswith("| adamw | torch-foreach |"))
    assert "**0.50** (0.50–0.50)" in line and "| noisy:" not in table and "WARNING" not in table
    assert noise_warning(rows) is None


def test_a_baseline_slowed_alike_in_every_round_is_noisy_too():
    """Rounds that agree but whose anchor steps all took 10x the anchor's usual step (a run under load: the ratio is
    off though the rounds agree): the drift marks the run noisy; within 1.3x of the usual step it is not."""
    env = Environment("cpu", "t", "t", "c", "d")

    def rows(anchor_ms, block_ms):
        timing = Timing(1.0, [2.0, 2.0, 2.0], None, anchor_ms)
        result = Result("adan", "fusedoptim-cpu", "p", "fp32", 440, 10, timing, 280, anchor_block_ms=block_ms)
        return {r.metric: r for r in result.rows(env, 1.0)}

    slowed = rows([100.0, 101.0, 100.0], 10.0)
    assert slowed["anchor_spread"].p50 < 1.3 and slowed["anchor_drift"].p50 == pytest.approx(10.0)
    assert all(r.noisy for r in slowed.values())
    assert "up to 10.00x" in noise_warning(list(slowed.values()))
    assert not any(r.noisy for r in rows([10.0, 11.0, 10.5], 9.0).values())  # drift 1.17
    assert all(r.noisy for r in rows([10.0, 10.0, 10.0], 14.0).values())  # faster than usual counts too: 1/1.4


def test_a_noisy_baseline_marks_the_row_and_prints_no_headline_ratio(tmp_path):
    """When the anchor's rounds disagree (max/min 2 > NOISE_THRESHOLD), every row of that run is noisy: the CSV
    says so, the table gives only the range of its ratios, the chart hatches it, and one warning names the load."""
    rows = _synthetic([20.0, 80.0, 21.0, 40.0], [10.0, 20.0, 10.0, 10.5])
    ours = [r for r in rows if r.impl == "torch-foreach"]
    assert all(r.noisy for r in ours) and {r.metric for r in ours} >= {"speedup", "step_ms", "anchor_spread"}
    assert next(r for r in ours if r.metric == "anchor_spread").p50 == pytest.approx(2.0)
    write_csv(rows, tmp_path / "cpu.csv")
    with (tmp_path / "cpu.csv").open() as f:
        noisy_column = {(r["impl"], r["noisy"]) for r in csv.DictReader(f)}
    assert noisy_column == {("torch-foreach", "1"), ("torch-fused", "1")}  # the anchor's own rounds spread too
    line = next(x for x in markdown(rows).splitlines() if x.startswith("| adamw | torch-foreach |"))
    assert "noisy: 0.25–0.50" in line and "**" not in line  # a range, and no bold headline
    warning = noise_warning(rows, "; load 3.9 on 2 cores")
    assert warning.startswith("WARNING") and "load 3.9 on 2 cores" in warning and "2 of 2 runs" in warning
    assert f"> **{warning}**" in markdown(rows, load="; load 3.9 on 2 cores")
    plot(rows, tmp_path / "cpu.png")
    assert (tmp_path / "cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_writes_outside_the_tracked_tree_by_default(tmp_path, monkeypatch):
    """A plain run writes bench-results/<device>-<time>/ under the current directory (git-ignored) and leaves the
    committed benchmarks/results/ alone; only --refresh-reference writes there."""
    import datetime

    reference = {p.name: p.stat().st_mtime_ns for p in cli.REFERENCE_DIR.iterdir() if p.is_file()}
    monkeypatch.chdir(tmp_path)
    cli.main(["--device", "cpu", "--profiles", "resnet50_l1", "--dtypes", "fp32", "--optimizers", "adamw",
              "--impls", "torch-foreach", "--steps", "1", "--min-steps", "1", "--warmup", "0", "--no-progress"])
    (run,) = (tmp_path / "bench-results").iterdir()
    assert run.name.startswith("cpu-") and {p.name for p in run.iterdir()} == {"cpu.csv", "cpu.md", "cpu.png"}
    assert {p.name: p.stat().st_mtime_ns for p in cli.REFERENCE_DIR.iterdir() if p.is_file()} == reference
    assert cli.default_out("cpu", datetime.datetime(2026, 12, 3, 14, 5, 9)) == Path("bench-results/cpu-20261203-140509")
    ignored = (Path(cli.__file__).resolve().parents[1] / ".gitignore").read_text().split()
    assert "bench-results/" in ignored


def test_cli_writes_csv_markdown_and_png(tmp_path, capsys):
    cli.main(["--device", "cpu", "--profiles", "resnet50_l1", "--dtypes", "fp32", "--optimizers", "adamw,adan",
              "--steps", "3", "--min-steps", "3", "--warmup", "0", "--out", str(tmp_path), "--no-progress"])
    with (tmp_path / "cpu.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == FIELDS
        rows = list(reader)
    assert {r["device"] for r in rows} == {f"cpu ({torch.get_num_threads()} threads)"}
    table = {(r["optimizer"], r["impl"], r["metric"]): r for r in rows}
    copy_gbps = float(table["copy", "torch", "gbps"]["p50"])
    assert copy_gbps > 0
    # the GB/s ratio is the speed-up weighted by the bytes models: Adan 44 B, AdamW 28 B (fp32)
    assert float(table["adan", "fusedoptim-reference", "gbps_ratio"]["p50"]) == pytest.approx(
        float(table["adan", "fusedoptim-reference", "speedup"]["p50"]) * 44 / 28, rel=2e-3)
    for impl in ["torch-forloop", "torch-foreach", "torch-fused", "fusedoptim-reference"]:
        optimizer = "adan" if impl.startswith("fusedoptim") else "adamw"
        ms, gbps, pct, nbytes = (float(table[optimizer, impl, metric]["p50"])
                                 for metric in ("step_ms", "gbps", "bw_pct", "bytes"))
        assert nbytes == (44 if optimizer == "adan" else 28)
        # the CSV keeps 4 significant digits
        assert gbps == pytest.approx(nbytes * numel(PROFILES["resnet50_l1"]()) / (ms * 1e6), rel=2e-3)
        assert pct == pytest.approx(100 * gbps / copy_gbps, rel=2e-3)
        lo, hi = (float(table[optimizer, impl, "step_ms"][q]) for q in ("p20", "p80"))
        assert lo <= ms <= hi and math.isfinite(float(table[optimizer, impl, "first_step_ms"]["p50"]))
    out = capsys.readouterr().out
    assert "| adan | fusedoptim-reference | 44 |" in out
    assert (tmp_path / "cpu.md").read_text().count("### resnet50_l1 · fp32") == 1
    assert (tmp_path / "cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_steps_on_cuda_uses_events_and_keeps_host_time(monkeypatch):
    """The CUDA branch, without a GPU: events stand in for torch.cuda.Event and record host time."""
    clock = iter(range(0, 10_000, 7))  # each event records 7 ms after the previous one

    class FakeEvent:
        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing
            self.t = None

        def record(self) -> None:
            self.t = next(clock)

        def elapsed_time(self, end: FakeEvent) -> float:
            return float(end.t - self.t)

    syncs = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: syncs.append(1))
    timing = time_steps(lambda: None, Settings(torch.device("cuda"), steps=4, warmup=1, min_steps=4))
    assert timing.step_ms == [7.0] * 4
    assert timing.host_ms is not None and len(timing.host_ms) == 4
    assert len(syncs) == 4  # before and after the first step, after warm-up, after the timed steps


def test_gpu_kit_dry_run_prints_the_four_parts_and_refuses_without_cuda(tmp_path, capsys, monkeypatch):
    out = tmp_path / "kit"
    assert gpu_kit.main(["--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()  # a dry run writes nothing
    lines = [line for line in printed.splitlines() if line.startswith("[")]
    assert [line.split(",")[0] for line in lines] == ["[parity", "[wrappers", "[benchmark", "[host"]
    parity, wrappers, bench, host = lines
    for test_part in (parity, wrappers):  # compiled on CUDA, not interpreted; junit into the folder
        assert "env -u TRITON_INTERPRET FUSEDOPTIM_TEST_DEVICE=cuda" in test_part and " -x -q " in test_part
        assert f"--junitxml={out}/" in test_part
    assert "tests/test_parity.py -k 'float32 or bfloat16'" in parity
    assert "--device cuda --profiles resnet50,gpt2 --dtypes fp32,bf16" in bench and f"--out {out} " in bench
    assert "benchmarks.host --real" in host
    assert sum(gpu_kit.TIME_LIMITS.values()) + 4 * gpu_kit.KILL_GRACE_S < 8 * 60  # the whole kit under 8 minutes
    # Run for real without CUDA (or without --quick on CPU), it refuses in one line and writes nothing.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (["--out", str(out)], ["--device", "cpu", "--out", str(out)]):
        assert gpu_kit.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("gpu_kit: ") and err.count("\n") == 1
    assert not out.exists()


def test_gpu_kit_runs_every_part_whatever_the_others_do(tmp_path, monkeypatch):
    """A part that fails, and one past its time limit (stopped, with what it printed kept), do not stop the
    others; the summary says which, and the kit exits 1."""
    code = {"fails": "import sys; print('failing'); sys.exit(3)", "slow": "import time; print('started'); "
            "time.sleep(60)", "passes": "print('fine')"}
    parts = [gpu_kit.Part(name, name, ["-c", code[name]], 1 if name == "slow" else 30) for name in code]
    monkeypatch.setattr(gpu_kit, "plan", lambda out, device, quick: parts)
    assert gpu_kit.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(p["name"], p["rc"], p["timed_out"]) for p in summary["parts"]] == [
        ("fails", 3, False), ("slow", 124, True), ("passes", 0, False)]
    assert not summary["ok"] and summary["parts"][1]["wall_s"] < 1 + gpu_kit.KILL_GRACE_S + 5
    assert "started" in (tmp_path / "slow.stdout.txt").read_text()
    assert "time limit of 1 s" in (tmp_path / "slow.stderr.txt").read_text()
    assert "fine" in (tmp_path / "passes.stdout.txt").read_text()
    assert "**a part failed**" in (tmp_path / "summary.md").read_text()


def test_gpu_kit_cpu_smoke_writes_one_folder_with_its_summary(tmp_path, monkeypatch):
    """``--device cpu --quick``: every part, tiny, end to end (20-30 s on 2 busy cores: four Python start-ups)."""
    for name in [k for k in os.environ if k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))]:
        monkeypatch.delenv(name)  # the parts are runs of their own, not workers of this one
    out = tmp_path / "kit"
    assert gpu_kit.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["quick"] and summary["gpu"].startswith("cpu (")
    assert summary["torch"] == torch.__version__ and summary["commit"] and summary["date"].endswith("UTC")
    parts = {p["name"]: p for p in summary["parts"]}
    assert list(parts) == ["parity", "wrappers", "benchmark", "host"]
    assert all(p["rc"] == 0 and (out / p["stdout"]).exists() and (out / p["stderr"]).exists() for p in parts.values())
    assert parts["parity"]["tests"] == {"total": 2, "passed": 2, "failed": 0, "errors": 0, "skipped": 0}
    assert parts["wrappers"]["tests"]["passed"] == 1
    runs = {(r["optimizer"], r["impl"]): r for r in parts["benchmark"]["figures"]["runs"]}
    assert runs["adabelief", "fusedoptim-reference"]["speedup"] > 0 and ("adamw", "torch-fused") in runs
    assert (out / "cpu.csv").exists() and parts["benchmark"]["figures"]["copy_gbps"] > 0
    assert [r["optimizer"] for r in parts["host"]["figures"]["rows"]] == ["AdaBelief", "LAMB"]
    md = (out / "summary.md").read_text()
    assert md.startswith("# GPU proof kit: cpu (") and "quick mode" in md
    assert "| adabelief | fusedoptim-reference | resnet50_l1 | fp32 |" in md


def test_host_syncs_counts_reads_and_finds_torchs():
    """benchmarks/host_syncs.py counts every host read of a step: none for our C++ step with a tensor lr, some for
    torch's foreach AdamW with GradScaler (its found_inf.item()), none for a capturable Scout."""
    from benchmarks import host_syncs

    makers = host_syncs.makers("cpu")
    assert host_syncs.host_reads_per_step("lamb", makers["lamb"], "tensor lr") == 0
    assert host_syncs.host_reads_per_step("scout(adabelief)", makers["scout(adabelief)"], "capturable") == 0
    torch_reads = host_syncs.host_reads_per_step("torch AdamW foreach", makers["torch AdamW foreach"], "GradScaler")
    assert torch_reads is not None and torch_reads >= 1
    assert host_syncs.host_reads_per_step("lars", makers["lars"], "tensor betas") is None  # LARS has no betas
