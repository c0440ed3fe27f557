"""Render benchmark rows as a markdown table and a PNG chart. Both read only the CSV rows, so a committed
CSV can be re-rendered: ``python -m benchmarks.report benchmarks/results/cpu.csv``.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from pathlib import Path

from .harness import NOISE_THRESHOLD, Row, Skip, noise_warning, read_csv
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


def _ratio(row: Row | None) -> str:
    """A ratio cell: the median over rounds with its min–max; a noisy row only its range, no headline figure."""
    if row is None:
        return "–"
    if row.noisy:
        return f"noisy: {row.min:.2f}–{row.max:.2f}"
    return f"**{row.p50:.2f}** ({row.min:.2f}–{row.max:.2f})"


def markdown(rows: Sequence[Row], skips: Sequence[Skip] = (), settings: str = "", load: str = "") -> str:
    """The report: an environment line, the noise warning if any, then one table per (profile, dtype), then what
    was skipped."""
    lines = []
    first = rows[0] if rows else None
    if first is not None:
        lines.append(f"**{first.device}** · {first.date} · commit `{first.commit}` · torch {first.torch} · "
                     f"triton {first.triton}" + (f" · {settings}" if settings else ""))
        lines.append("")
    warning = noise_warning(rows, load)
    if warning is not None:
        lines += [f"> **{warning}**", ""]
    copy = copy_row(rows)
    if copy is not None:
        lines.append(f"Memory bandwidth measured in this run (`copy_`, read + write): **{_fmt(copy.p50)} GB/s** "
                     f"(p20 {_fmt(copy.p20)}, p80 {_fmt(copy.p80)}).")
        lines.append("")
    lines += ["Ratios are per round (the anchor's step, then ours, under the same load): median (min–max). "
              "*baseline spread* is max/min of the anchor's rounds in that run, *drift* their median over the median "
              f"of all the anchor's steps here; a spread over {NOISE_THRESHOLD:g}, or a drift beyond it either way, "
              "makes the row noisy: it shows only its range. A wrapper's sync steps are timed apart: *sync step ms*, "
              "and its ratio to the base optimizer's step alone.", ""]
    for (profile, dtype), impls in blocks(rows).items():
        lines += [f"### {_profile_title(profile, dtype)}", "",
                  "| optimizer | impl | B/param | ms/step p50 | p20–p80 | GB/s | % copy BW | × torch fused AdamW "
                  "| × its GB/s | baseline spread (drift) | sync step ms (× base step) | first step ms |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for (optimizer, impl), m in impls.items():
            step = m["step_ms"]
            spread = f"{m['anchor_spread'].p50:.2f}" if "anchor_spread" in m else "–"
            if "anchor_drift" in m:
                spread += f" ({m['anchor_drift'].p50:.2f})"
            sync = "–"
            if "sync_step_ms" in m:
                sync = _fmt(m["sync_step_ms"].p50)
                if "sync_x_base" in m:
                    x = m["sync_x_base"]
                    sync += f" ({x.min:.2f}–{x.max:.2f}×, noisy)" if x.noisy else f" ({x.p50:.2f}×)"
            lines.append(f"| {optimizer} | {impl} | {_fmt(m['bytes'].p50)} | {_fmt(step.p50)} | "
                         f"{_fmt(step.p20)}–{_fmt(step.p80)} | {_fmt(m['gbps'].p50)} | {m['bw_pct'].p50:.0f} | "
                         f"{_ratio(m.get('speedup'))} | {_ratio(m.get('gbps_ratio'))} | {spread} | {sync} | "
                         f"{_fmt(m['first_step_ms'].p50)} |")
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
    the copy bandwidth. Bars are medians; whiskers min–max over the rounds for the speed-up, p20–p80 for GB/s.
    Noisy runs (the baseline's rounds disagreed) are hatched, pale and labelled "noisy"."""
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
        noisy = [any(r.noisy for r in m.values()) for m in impls.values()]
        labels = [f"{optimizer} · {impl}" + ("  (noisy)" if n else "")
                  for (optimizer, impl), n in zip(impls, noisy, strict=True)]
        ys = range(len(impls))[::-1]
        colours = [_COLOURS.get(impl, "#999999") for _, impl in impls]
        for ax, metric in ((ax_speed, "speedup"), (ax_bw, "gbps")):
            vals = [m[metric] if metric in m else None for m in impls.values()]
            mids = [v.p50 if v else 0.0 for v in vals]
            if metric == "speedup":  # the spread over the rounds
                low, high = ([getattr(v, q) if v else 0.0 for v in vals] for q in ("min", "max"))
            else:
                low = [min(v.p20, v.p80) if v else 0.0 for v in vals]
                high = [max(v.p20, v.p80) if v else 0.0 for v in vals]
            err = [[m - lo for m, lo in zip(mids, low, strict=True)],
                   [hi - m for m, hi in zip(mids, high, strict=True)]]
            bars = ax.barh(list(ys), mids, xerr=err, color=colours, edgecolor="black", linewidth=0.4,
                           error_kw={"elinewidth": 0.8, "capsize": 2})
            for bar, is_noisy in zip(bars, noisy, strict=True):
                if is_noisy:
                    bar.set_hatch("///")
                    bar.set_alpha(0.45)
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
    warning = noise_warning(rows)
    if warning is not None:
        print(warning, file=sys.stderr)
    plot(rows, csv_path.with_suffix(".png"))


if __name__ == "__main__":
    main()
