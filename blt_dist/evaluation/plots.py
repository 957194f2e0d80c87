"""The PNG plots of `blt-dist compare` (matplotlib, no display needed).

Figures are built from `matplotlib.figure.Figure`, not pyplot: savefig then renders with Agg and
nothing global (backend, open figures) changes in the process that calls us.

    bpb_vs_flops.png         held-out bpb against training FLOPs (log-log, each axis a decade or more):
                             a point per run (error bar: 1 SE over documents), the power-law fit per
                             series with 3+ budgets; one budget: a point chart per family; compressors
                             as dashed lines named on the plot
    training_curves.png      training bpb (line) and validation bpb (dots) against FLOPs seen
    bpb_by_content_type.png  grouped bars: content types x runs and compressors
    patch_sizes.png          patch-length distribution per content type, one panel per BLT run
    noise_gap.png            clean-to-noised gap per run, one bar group per noise (with --noise)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatterSciNotation, LogLocator, MaxNLocator, NullFormatter, StrMethodFormatter

from blt_dist.evaluation.scaling import fit_family
from blt_dist.evaluation.statistics import ratio_estimate

FAMILY_COLORS = {"blt": "#1f77b4", "bpe": "#ff7f0e", "byte": "#2ca02c", "entropy": "#9467bd"}
BUDGET_GROUPING = 0.10  # as compare.BUDGET_TOLERANCE: budgets this close are one budget
COMPRESSOR_COLORS = {"gzip -9": "#7f7f7f", "bz2 -9": "#a0a0a0", "xz -9e": "#c8c8c8"}


def _figure(width: float = 7.0, height: float = 4.5):
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _color(family: str, fallback: int) -> str:
    return FAMILY_COLORS.get(family, f"C{4 + fallback % 6}")


def write_all(rows, compressors: dict, noises: list, out: Path) -> list[str]:
    """Writes every plot that applies; returns their file names (relative to `out`)."""
    fits = {label: fit_family([(x, y) for x, y, _ in pts])[0] for label, pts in scaling_points(rows).items()}
    written = [bpb_vs_flops(rows, compressors["clean"], out / "bpb_vs_flops.png", fits),
               training_curves(rows, out / "training_curves.png"),
               bpb_by_content_type(rows, compressors["clean"], out / "bpb_by_content_type.png")]
    if any(r.run.family == "blt" for r in rows):
        written.append(patch_sizes(rows, out / "patch_sizes.png"))
    if noises:
        written.append(noise_gap(rows, compressors, [n.name for n in noises], out / "noise_gap.png"))
    return [path.name for path in written]


def series_label(row, rows) -> str:
    """The scaling line a run belongs to: its family, and for BLT its mean patch size and its
    layout (model.layout) where the runs hold more than one of either (a sweep's patch_sizes
    axis; runs of both layouts), so that different models never share one fitted line."""
    family = row.run.family
    if family != "blt":
        return family.upper()
    blts = [r.run.cfg for r in rows if r.run.family == "blt"]
    label = "BLT"
    if len({c.data.patching.target_mean_size for c in blts}) > 1:
        label += f" p{row.run.cfg.data.patching.target_mean_size:g}"
    if len({c.model.layout for c in blts}) > 1:
        label += f" {row.run.cfg.model.layout}"
    return label


def scaling_points(rows) -> dict[str, list[tuple[float, float, float]]]:
    """series label -> [(training FLOPs, bpb, SE)], one point per run (its seeds are separate points)."""
    out: dict[str, list[tuple[float, float, float]]] = {}
    for r in sorted(rows, key=lambda r: r.run.flops_spent):
        e = ratio_estimate(r.clean)
        out.setdefault(series_label(r, rows), []).append(
            (r.run.flops_spent, e.value, e.se if math.isfinite(e.se) else 0.0))
    return out


def _decade(low: float, high: float) -> tuple[float, float]:
    """Log-axis limits holding [low, high] that span at least a decade, centred geometrically."""
    low, high = low / 1.15, high * 1.15
    if high / low < 10:
        centre = math.sqrt(low * high)
        low, high = centre / math.sqrt(10), centre * math.sqrt(10)
    return low, high


def _log_axis(axis, low: float, high: float, plain: bool = False) -> None:
    """Major ticks at 1, 2, 5 per decade (decades only beyond 3), all labelled; minor ticks
    unlabelled, so labels never crowd. `plain`: labels as numbers (bpb), else 2x10^12 style."""
    subs = (1.0, 2.0, 5.0) if math.log10(high / low) <= 3 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=12))
    axis.set_major_formatter(StrMethodFormatter("{x:g}") if plain else
                             LogFormatterSciNotation(base=10, labelOnlyBase=False,
                                                     minor_thresholds=(math.inf, math.inf)))
    axis.set_minor_locator(LogLocator(base=10, subs=np.arange(2, 10) * 1.0, numticks=12))
    axis.set_minor_formatter(NullFormatter())


COMPRESSOR_LABEL_SLOTS = [(1.0, 1), (1.0, -1), (0.72, 1), (0.72, -1), (0.44, 1), (0.44, -1)]


def _label_compressors(ax, compressors: dict) -> None:
    """Compressors as dashed lines, each named on the plot just above (or, where the line before
    is too close, below or further left of) its line. Call after the axis limits are set."""
    placed: list[tuple[float, float]] = []
    to_axes = ax.transAxes.inverted()
    for name, c in sorted(compressors.items(), key=lambda kv: kv[1]["bpb"]):
        color = COMPRESSOR_COLORS.get(name, "gray")
        ax.axhline(c["bpb"], linestyle="--", linewidth=1, color=color)
        y = to_axes.transform(ax.transData.transform((1.0, c["bpb"])))[1]
        x, side = next(((x, side) for x, side in COMPRESSOR_LABEL_SLOTS
                        if all(px != x or abs(py - (y + side * 0.025)) > 0.05 for px, py in placed)),
                       COMPRESSOR_LABEL_SLOTS[0])
        placed.append((x, y + side * 0.025))
        ax.annotate(name, xy=(x, c["bpb"]), xycoords=("axes fraction", "data"), xytext=(-3, 2 * side),
                    textcoords="offset points", ha="right", va="bottom" if side > 0 else "top",
                    fontsize="small", color="dimgray")


def bpb_vs_flops_figure(points: dict[str, list[tuple[float, float, float]]], compressors: dict,
                        fits: Optional[dict] = None) -> Figure:
    """points: series -> [(FLOPs, bpb, SE)]; fits: series -> scaling.Fit (None: not drawn).

    With at least two distinct budgets: log-log axes, each spanning at least a decade, a point per
    run and the fitted line of each series with at least MIN_BUDGETS budgets. With one budget a
    trend cannot be drawn: a labelled point chart, one column per series."""
    fits = fits or {}
    fig = _figure()
    ax = fig.add_subplot()
    budgets = {x for pts in points.values() for x, _, _ in pts}
    # budgets within BUDGET_GROUPING of each other are one budget (a demo's runs differ by <1%)
    clusters = 0
    for i, x in enumerate(sorted(budgets)):
        clusters += i == 0 or x > sorted(budgets)[i - 1] * (1 + BUDGET_GROUPING)
    values = [y for pts in points.values() for _, y, _ in pts] + [c["bpb"] for c in compressors.values()]
    if clusters >= 2:
        used: set[str] = set()
        for i, (label, pts) in enumerate(points.items()):
            color = _color(label.split()[0].lower(), i)
            color = color if color not in used else f"C{(4 + i) % 10}"
            used.add(color)
            fit = fits.get(label)
            name = f"{label} (exponent {fit.exponent:+.3f})" if fit is not None else label
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        linestyle="none", capsize=3, color=color, label=name)
            if fit is not None:
                xs = np.geomspace(min(p[0] for p in pts), max(p[0] for p in pts), 50)
                ax.plot(xs, [fit.bpb(x) for x in xs], color=color, linewidth=1.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        xlim, ylim = _decade(min(budgets), max(budgets)), _decade(min(values), max(values))
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        _log_axis(ax.xaxis, *xlim)
        _log_axis(ax.yaxis, *ylim, plain=True)
        ax.set_xlabel("training FLOPs")
        ax.set_title("Held-out bpb against training FLOPs (log-log; lines: power-law fits)")
    else:
        labels = list(points)
        for i, label in enumerate(labels):
            pts = points[label]
            ax.errorbar([i] * len(pts), [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        linestyle="none", capsize=3, color=_color(label.split()[0].lower(), i))
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlim(-0.6, len(labels) - 0.4)
        ax.set_ylim(0, max(values) * 1.12)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=8))
        budget = min(budgets) if budgets else math.nan
        ax.set_xlabel(f"series (one budget, ~{budget:.3g} training FLOPs: no trend to fit)")
        ax.set_title("Held-out bpb at one training budget")
    _label_compressors(ax, compressors)
    ax.set_ylabel("held-out bits per byte")
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="lower left")
    return fig


def bpb_vs_flops(rows, compressors: dict, path: Path, fits: Optional[dict] = None) -> Path:
    bpb_vs_flops_figure(scaling_points(rows), compressors, fits).savefig(path)
    return path


def training_curves(rows, path: Path) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    for i, r in enumerate(rows):
        train = r.run.train_records
        color = _color(r.run.family, i)
        style = ["-", "--", ":", "-."][i % 4]
        ax.plot([t["flops_seen"] for t in train], [t["bpb"] for t in train], style, color=color, linewidth=1,
                label=f"{r.label} (train)")
        flops_at = {t["step"]: t["flops_seen"] for t in train}
        val = [v for v in r.run.records if "val_bpb" in v and v["step"] in flops_at]
        if val:
            ax.plot([flops_at[v["step"]] for v in val], [v["val_bpb"] for v in val], "o", color=color, markersize=4,
                    label=f"{r.label} (val)")
    if any(t.get("flops_seen", 0) > 0 for r in rows for t in r.run.train_records):
        ax.set_xscale("log")
    ax.set_xlabel("training FLOPs seen")
    ax.set_ylabel("bits per byte")
    ax.set_title("bpb during training (metrics.jsonl)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="x-small")
    fig.savefig(path)
    return path


def bpb_by_content_type(rows, compressors: dict, path: Path) -> Path:
    types = sorted({c for r in rows for c in r.clean["by_content_type"]})
    groups = [*types, "all"]
    series = [(r.label, _color(r.run.family, i), [*(r.clean["by_content_type"].get(t, {}).get("bpb") for t in types),
                                                    r.clean["bpb"]], None) for i, r in enumerate(rows)]
    series += [(name, COMPRESSOR_COLORS.get(name, "gray"),
                [*(c["by_content_type"].get(t, {}).get("bpb") for t in types), c["bpb"]], "//")
               for name, c in compressors.items()]
    fig = _figure(max(7.0, 1.2 * len(groups) * max(1, len(series)) / 3), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for k, (label, color, values, hatch) in enumerate(series):
        heights = [v if v is not None else 0.0 for v in values]
        ax.bar(x + (k - (len(series) - 1) / 2) * width, heights, width, label=label, color=color, hatch=hatch,
               edgecolor="white" if hatch is None else "black", linewidth=0.5)
    ax.set_xticks(x, groups)
    ax.set_ylabel("held-out bits per byte")
    ax.set_title("bpb per content type (clean)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="x-small", ncols=2)
    fig.savefig(path)
    return path


def patch_sizes(rows, path: Path) -> Path:
    """Share of patches of each length, per content type: where the BLT spends its global steps."""
    blt = [r for r in rows if r.run.family == "blt"]
    cols = min(3, len(blt))
    nrows = math.ceil(len(blt) / cols)
    fig = _figure(4.2 * cols, 3.4 * nrows)
    for k, r in enumerate(blt):
        ax = fig.add_subplot(nrows, cols, k + 1)
        for ctype, t in sorted(r.clean["by_content_type"].items()):
            histogram = np.asarray(t.get("patch_length_histogram") or [0], dtype=float)
            if histogram.sum() == 0:
                continue
            lengths = np.arange(len(histogram))
            mean = t["mean_patch_size"]
            ax.plot(lengths[1:], histogram[1:] / histogram.sum(), marker=".", label=f"{ctype} (mean {mean:.2f})")
        ax.set_title(r.label, fontsize="small")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("patch length (positions)")
        ax.set_ylabel("share of patches")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.suptitle("Patch lengths on the held-out text", fontsize="medium")
    fig.savefig(path)
    return path


def noise_gap(rows, compressors: dict, noise_names: list[str], path: Path) -> Path:
    labels = [r.label for r in rows] + list(compressors["clean"])
    colors = [_color(r.run.family, i) for i, r in enumerate(rows)] + [COMPRESSOR_COLORS.get(n, "gray")
                                                                       for n in compressors["clean"]]
    fig = _figure(max(7.0, 1.0 * len(noise_names) * len(labels) / 2), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / len(labels)
    x = np.arange(len(noise_names))
    for k, label in enumerate(labels):
        if k < len(rows):
            r = rows[k]
            gaps = [r.noised[n]["bpb"] - r.clean["bpb"] for n in noise_names]
        else:
            gaps = [compressors[n][label]["bpb"] - compressors["clean"][label]["bpb"] for n in noise_names]
        ax.bar(x + (k - (len(labels) - 1) / 2) * width, gaps, width, label=label, color=colors[k],
               hatch=None if k < len(rows) else "//", edgecolor="black", linewidth=0.5)
    ax.set_xticks(x, noise_names)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("noised - clean bits per byte")
    ax.set_title("Clean-to-noised gap (smaller is more robust)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="x-small", ncols=2)
    fig.savefig(path)
    return path
