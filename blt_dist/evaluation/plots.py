"""The PNG plots of `blt-dist compare` (matplotlib, no display needed).

Figures are built from `matplotlib.figure.Figure`, not pyplot: savefig then renders with Agg and
nothing global (backend, open figures) changes in the process that calls us.

    bpb_vs_flops.png         held-out bpb against training FLOPs (log x): a line per family, a point
                             per run (error bar: 1 SE over documents), compressors as dashed lines
    training_curves.png      training bpb (line) and validation bpb (dots) against FLOPs seen
    bpb_by_content_type.png  grouped bars: content types x runs and compressors
    patch_sizes.png          patch-length distribution per content type, one panel per BLT run
    noise_gap.png            clean-to-noised gap per run, one bar group per noise (with --noise)
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from blt_dist.evaluation.statistics import ratio_estimate

FAMILY_COLORS = {"blt": "#1f77b4", "bpe": "#ff7f0e", "byte": "#2ca02c", "entropy": "#9467bd"}
COMPRESSOR_COLORS = {"gzip -9": "#7f7f7f", "bz2 -9": "#a0a0a0", "xz -9e": "#c8c8c8"}


def _figure(width: float = 7.0, height: float = 4.5):
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _color(family: str, fallback: int) -> str:
    return FAMILY_COLORS.get(family, f"C{4 + fallback % 6}")


def write_all(rows, compressors: dict, noises: list, out: Path) -> list[str]:
    """Writes every plot that applies; returns their file names (relative to `out`)."""
    written = [bpb_vs_flops(rows, compressors["clean"], out / "bpb_vs_flops.png"),
               training_curves(rows, out / "training_curves.png"),
               bpb_by_content_type(rows, compressors["clean"], out / "bpb_by_content_type.png")]
    if any(r.run.family == "blt" for r in rows):
        written.append(patch_sizes(rows, out / "patch_sizes.png"))
    if noises:
        written.append(noise_gap(rows, compressors, [n.name for n in noises], out / "noise_gap.png"))
    return [path.name for path in written]


def bpb_vs_flops(rows, compressors: dict, path: Path) -> Path:
    fig = _figure()
    ax = fig.add_subplot()
    families = list(dict.fromkeys(r.run.family for r in rows))
    for i, family in enumerate(families):
        mine = sorted((r for r in rows if r.run.family == family), key=lambda r: r.run.flops_spent)
        x = [r.run.flops_spent for r in mine]
        estimates = [ratio_estimate(r.clean) for r in mine]
        y = [e.value for e in estimates]
        err = [e.se if math.isfinite(e.se) else 0.0 for e in estimates]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=_color(family, i), label=family.upper())
    for name, c in compressors.items():
        ax.axhline(c["bpb"], linestyle="--", linewidth=1, color=COMPRESSOR_COLORS.get(name, "gray"), label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title("Held-out bpb against training FLOPs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path)
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
