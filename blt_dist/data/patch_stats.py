"""Patch statistics in the seed's layout (issue #21, item 4): per content type, the share of
patches whose length falls in 1-4 / 5-8 / 9-12 / 13-16 bytes and the share of byte positions
whose next-byte entropy is below 2, from 2 to 5, and above 5 nats, beside the mean patch size.
Inputs are what calibration and `blt-dist patch` already compute: bytes per non-empty patch and
the per-position entropies (nats) of the documents' bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

LENGTH_BUCKETS = ((1, 4), (5, 8), (9, 12), (13, 16))  # bytes per patch, inclusive
ENTROPY_EDGES = (2.0, 5.0)  # nats: low < 2 <= middle <= 5 < high


@dataclass
class PatchStats:
    mean_patch_size: float
    length_shares: dict[str, float]  # "1-4" -> share of patches
    entropy_shares: dict[str, float]  # "<2" / "2-5" / ">5" -> share of positions
    patches: int
    positions: int

    def row(self) -> str:
        cells = [f"{self.mean_patch_size:.2f}"] + [f"{100 * v:.1f}%" for v in self.length_shares.values()]
        return " | ".join(cells + [f"{100 * v:.1f}%" if v == v else "-" for v in self.entropy_shares.values()])


def patch_stats(bytes_per_patch: np.ndarray, entropies: np.ndarray) -> PatchStats:
    """Shares of patches per length bucket and of positions per entropy band. A patch longer than
    16 bytes (a max_patch_length above the seed's) is refused rather than silently left out of
    every bucket, which would make the shares not sum to one."""
    lengths = np.asarray(bytes_per_patch, dtype=np.int64)
    H = np.asarray(entropies, dtype=np.float64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > LENGTH_BUCKETS[-1][1]):
        raise ValueError(f"patch lengths must lie in 1..{LENGTH_BUCKETS[-1][1]} for the seed's buckets, "
                         f"got {lengths.min()}..{lengths.max()}")
    n = max(lengths.size, 1)
    length_shares = {f"{lo}-{hi}": float(((lengths >= lo) & (lengths <= hi)).sum()) / n for lo, hi in LENGTH_BUCKETS}
    m = max(H.size, 1)
    low, high = ENTROPY_EDGES
    entropy_shares = {f"<{low:g}": float((H < low).sum()) / m,
                      f"{low:g}-{high:g}": float(((H >= low) & (H <= high)).sum()) / m,
                      f">{high:g}": float((H > high).sum()) / m}
    mean = float(lengths.sum()) / lengths.size if lengths.size else float("nan")
    return PatchStats(mean, length_shares, entropy_shares, int(lengths.size), int(H.size))


def patch_stats_from_counts(histogram, band_positions=None, mean_patch_size: Optional[float] = None) -> PatchStats:
    """PatchStats from what an eval record holds per content type: patch_length_histogram
    ([n] = patches of n positions) and entropy_band_positions ([<2, 2-5, >5] positions; None
    when the BLT patches without entropies: its shares are nan)."""
    counts = np.asarray(histogram, dtype=np.int64)
    lengths = np.arange(counts.size)
    if counts.size > LENGTH_BUCKETS[-1][1] + 1 and counts[LENGTH_BUCKETS[-1][1] + 1:].any():
        raise ValueError(f"patch lengths must lie in 1..{LENGTH_BUCKETS[-1][1]} for the seed's buckets")
    n = max(int(counts.sum()), 1)
    length_shares = {f"{lo}-{hi}": float(counts[(lengths >= lo) & (lengths <= hi)].sum()) / n
                     for lo, hi in LENGTH_BUCKETS}
    low, high = ENTROPY_EDGES
    names = (f"<{low:g}", f"{low:g}-{high:g}", f">{high:g}")
    if band_positions is None:
        entropy_shares, positions = {k: float("nan") for k in names}, 0
    else:
        b = np.asarray(band_positions, dtype=np.int64)
        positions = int(b.sum())
        entropy_shares = {k: float(v) / max(positions, 1) for k, v in zip(names, b)}
    mean = mean_patch_size if mean_patch_size is not None else float("nan")
    return PatchStats(float(mean), length_shares, entropy_shares, int(counts.sum()), positions)


def patch_stats_table(per_type: dict[str, PatchStats]) -> str:
    """Markdown table, one row per content type, in the seed's column order."""
    head = ["content type", "mean patch size", *(f"{lo}-{hi} B" for lo, hi in LENGTH_BUCKETS),
            "H < 2", "2 <= H <= 5", "H > 5"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [f"| {name} | {stats.row()} |" for name, stats in per_type.items()]
    return "\n".join(lines)
