"""Scaling fits for a sweep's report (issue #21, item 2): bpb against training FLOPs on log-log
axes, one straight line per family (log10 bpb = intercept + exponent * log10 FLOPs), and where two
families' lines cross.

A line through fewer than MIN_BUDGETS distinct budgets is not fitted: two points always fit a
line exactly, so its exponent would say nothing about the trend. The crossing's uncertainty comes
from the seeds: every budget's seeds are resampled (a bootstrap, fixed generator so the report is
reproducible) and both lines refitted; the crossing is given with its 16th-84th percentile range
(about +-1 SE) over the resamples whose lines still cross; `inside` says whether the crossing lies
within the fitted budgets or is an extrapolation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

MIN_BUDGETS = 3
BOOTSTRAP = 400


@dataclass
class Fit:
    exponent: float  # d log10(bpb) / d log10(FLOPs): negative when more compute helps
    intercept: float
    budgets: int

    def bpb(self, flops: float) -> float:
        return 10 ** (self.intercept + self.exponent * math.log10(flops))


def _points(points: list[tuple[float, float]]) -> dict[float, list[float]]:
    by_budget: dict[float, list[float]] = {}
    for flops, bpb in points:
        by_budget.setdefault(float(flops), []).append(float(bpb))
    return by_budget


def _line(by_budget: dict[float, list[float]]) -> Fit:
    # seeds of a budget are averaged first, so a budget with 3 seeds does not weigh 3x in the fit
    x = np.log10(np.array(sorted(by_budget)))
    y = np.log10(np.array([np.mean(by_budget[b]) for b in sorted(by_budget)]))
    slope, intercept = np.polyfit(x, y, 1)
    return Fit(float(slope), float(intercept), len(x))


def fit_family(points: list[tuple[float, float]]) -> tuple[Optional[Fit], str]:
    """(fit, "") or (None, why not): points are (training FLOPs, bpb), several seeds per budget allowed."""
    by_budget = _points(points)
    if len(by_budget) < MIN_BUDGETS:
        return None, f"not fitted: {len(by_budget)} budget(s), a trend needs at least {MIN_BUDGETS}"
    return _line(by_budget), ""


def _crossing(a: Fit, b: Fit) -> Optional[float]:
    if a.exponent == b.exponent:
        return None  # parallel: never cross
    return 10 ** ((b.intercept - a.intercept) / (a.exponent - b.exponent))


@dataclass
class Crossing:
    flops: Optional[float]  # None: parallel lines
    low: Optional[float]  # 16th-84th percentile over seed resamples (None: one seed per budget)
    high: Optional[float]
    inside: bool  # within the budgets the lines were fitted on (otherwise an extrapolation)


def crossing(points_a: list[tuple[float, float]], points_b: list[tuple[float, float]],
             seed: int = 0) -> tuple[Optional[Crossing], str]:
    """Where family A's line meets family B's, with its seed uncertainty; (None, why) when either
    line is not fitted."""
    fit_a, why_a = fit_family(points_a)
    fit_b, why_b = fit_family(points_b)
    if fit_a is None or fit_b is None:
        return None, why_a or why_b
    at = _crossing(fit_a, fit_b)
    budgets = sorted(set(_points(points_a)) | set(_points(points_b)))
    inside = at is not None and budgets[0] <= at <= budgets[-1]
    by_a, by_b = _points(points_a), _points(points_b)
    if all(len(v) < 2 for v in (*by_a.values(), *by_b.values())):
        return Crossing(at, None, None, inside), ""
    rng = np.random.default_rng(seed)
    resampled = []
    for _ in range(BOOTSTRAP):
        ra = {k: list(rng.choice(v, len(v))) for k, v in by_a.items()}
        rb = {k: list(rng.choice(v, len(v))) for k, v in by_b.items()}
        c = _crossing(_line(ra), _line(rb))
        if c is not None and math.isfinite(c):
            resampled.append(math.log10(c))
    if not resampled:
        return Crossing(at, None, None, inside), ""
    low, high = np.percentile(resampled, [16, 84])
    return Crossing(at, float(10 ** low), float(10 ** high), inside), ""
