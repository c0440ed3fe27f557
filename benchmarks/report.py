"""Render benchmark rows as a markdown table and a PNG chart. Both read only the CSV rows, so a committed
CSV can be re-rendered: ``python -m benchmarks.report benchmarks/results/cpu.csv``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

from .harness import Row, Skip, read_csv
from .profiles import PROFILES, numel

Key = tuple[str, str]  # (optimizer, impl)


def blocks(rows: Sequence[Row]) -> dict[tuple[str, str], dict[Key, dict[str, Row]]]:
    """Rows grouped as {(profile, dtype): {(optimizer, impl): {metric: row}}}, in the order they ran."""
    out: dict[tuple[str, str], dict[Key, dict[str, Row]]] = {}
    for row in rows:
        if row.optimizer == "copy":
            continue
        out.setdefault((row.profile, row.dtype), {}).setdefault((row.optimizer, row.impl), {})[row.metric] = row
    return out


def copy_row(rows: Sequence[Row]) -> Row | None:
    return next((r for r in rows if r.optimizer == "copy"), None)


def _fmt(x: float) -> str:
    """3 significant digits, no exponent for the magnitudes that occur here."""
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _profile_title(profile: str, dtype: str) -> str:
    if profile not in PROFILES:
        return f"{profile} · {dtype}"
    shapes = PROFILES[profile]()
    return f"{profile} · {dtype} · {numel(shapes) / 1e6:.1f} M params in {len(shapes)} tensors"


def markdown(rows: Sequence[Row], skips: Sequence[Skip] = (), settings: str = "") -> str:
    """The report: an environment line, then one table per (profile, dtype), then what was skipped."""
    lines = []
    first = rows[0] if rows else None
    if first is not None:
        lines.append(f"**{first.device}** · {first.date} · commit `{first.commit}` · torch {first.torch} · "
                     f"triton {first.triton}" + (f" · {settings}" if settings else ""))
        lines.append("")
    copy = copy_row(rows)
    if copy is not None:
        lines.append(f"Memory bandwidth measured in this run (`copy_`, read + write): **{_fmt(copy.p50)} GB/s** "
                     f"(p20 {_fmt(copy.p20)}, p80 {_fmt(copy.p80)}).")
        lines.append("")
    for (profile, dtype), impls in blocks(rows).items():
        lines += [f"### {_profile_title(profile, dtype)}", "",
                  "| optimizer | impl | B/param | ms/step p50 | p20–p80 | GB/s | % copy BW | × torch fused AdamW "
                  "| × its GB/s | first step ms |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for (optimizer, impl), m in impls.items():
            step = m["step_ms"]
            speedup, ratio = (f"{m[name].p50:.2f}" if name in m else "–" for name in ("speedup", "gbps_ratio"))
            lines.append(f"| {optimizer} | {impl} | {_fmt(m['bytes'].p50)} | {_fmt(step.p50)} | "
                         f"{_fmt(step.p20)}–{_fmt(step.p80)} | {_fmt(m['gbps'].p50)} | {m['bw_pct'].p50:.0f} | "
                         f"{speedup} | {ratio} | {_fmt(m['first_step_ms'].p50)} |")
        lines.append("")
    if skips:
        lines += ["Not run here:", ""]
        seen = set()
        for s in skips:  # one line per (optimizer, impl, reason): the same reason repeats per profile
            key = (s.optimizer, s.impl, s.reason)
            if key not in seen:
                seen.add(key)
                where = sorted({f"{x.profile}/{x.dtype}" for x in skips if (x.optimizer, x.impl, x.reason) == key})
                lines.append(f"- {s.optimizer} · {s.impl} ({', '.join(where)}): {s.reason}")
        lines.append("")
    return "\n".join(lines)


# Colours by implementation family: ours green, torch blue/grey, peers warm.
_COLOURS = {"fusedoptim-triton": "#1b7837", "fusedoptim-cpu": "#5aae61", "fusedoptim-reference": "#a6dba0",
            "torch-fused": "#2166ac", "torch-foreach": "#67a9cf", "torch-forloop": "#b3b3b3",
            "timm": "#e08214", "pytorch-optimizer": "#b2182b", "holocron": "#8073ac"}


def plot(rows: Sequence[Row], path: Path, title: str = "") -> None:
    """One row of two panels per (profile, dtype): speed-up against torch fused AdamW, and GB/s against
    the copy bandwidth. Bars are medians, whiskers p20–p80."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    groups = blocks(rows)
    copy = copy_row(rows)
    heights = [0.8 + 0.24 * len(impls) for impls in groups.values()]
    # constrained layout leaves room for the suptitle (tight_layout drew it over the first panel's title)
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 1.0 + sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights}, layout="constrained")
    for (profile, dtype), (ax_speed, ax_bw) in zip(groups, axes, strict=True):
        impls = groups[(profile, dtype)]
        labels = [f"{optimizer} · {impl}" for optimizer, impl in impls]
        ys = range(len(impls))[::-1]
        colours = [_COLOURS.get(impl, "#999999") for _, impl in impls]
        for ax, metric in ((ax_speed, "speedup"), (ax_bw, "gbps")):
            vals = [m[metric] if metric in m else None for m in impls.values()]
            mids = [v.p50 if v else 0.0 for v in vals]
            err = [[v.p50 - min(v.p20, v.p80) if v else 0.0 for v in vals],
                   [max(v.p20, v.p80) - v.p50 if v else 0.0 for v in vals]]
            ax.barh(list(ys), mids, xerr=err, color=colours, edgecolor="black", linewidth=0.4,
                    error_kw={"elinewidth": 0.8, "capsize": 2})
            ax.set_yticks(list(ys), labels if ax is ax_speed else [""] * len(labels), fontsize=8)
            ax.grid(axis="x", alpha=0.3, which="both")
            ax.tick_params(axis="x", labelsize=8)
            ax.set_ylim(-0.6, len(impls) - 0.4)
            for i, ((opt_a, _), (opt_b, _)) in enumerate(itertools.pairwise(impls)):  # separate optimizers
                if opt_a != opt_b:
                    ax.axhline(len(impls) - 1.5 - i, color="grey", linewidth=0.6)
        ax_speed.set_xscale("log")
        ax_speed.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax_speed.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax_speed.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax_speed.axvline(1.0, color="#2166ac", linestyle="--", linewidth=1)
        ax_speed.set_xlabel("speed-up vs torch.optim.AdamW(fused=True)  (×, log scale; > 1 is faster)", fontsize=9)
        ax_speed.set_title(_profile_title(profile, dtype), fontsize=10, loc="left")
        ax_bw.set_xlabel("effective bandwidth (GB/s) = bytes model / step time", fontsize=9)
        if copy is not None:
            ax_bw.axvline(copy.p50, color="black", linestyle=":", linewidth=1)
            ax_bw.text(copy.p50, len(impls) - 0.5, f"copy {copy.p50:.3g} GB/s ", fontsize=8, ha="right", va="top")
    first = rows[0] if rows else None
    if first is not None:
        fig.suptitle(title or f"fusedoptim optimizer step · {first.device} · torch {first.torch} · "
                     f"commit {first.commit} · {first.date}", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    """Re-render the markdown and PNG of a CSV written by ``python -m benchmarks``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    parser.add_argument("csv", type=Path, help="a CSV written by python -m benchmarks")
    csv_path = parser.parse_args(argv).csv
    if not csv_path.is_file():
        parser.error(f"no such file: {csv_path}")
    rows = read_csv(csv_path)
    print(markdown(rows))
    plot(rows, csv_path.with_suffix(".png"))


if __name__ == "__main__":
    main()
