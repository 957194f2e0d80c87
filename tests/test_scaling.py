"""Scaling fits (issue #21, item 2) on exact power laws and hand-made seed noise."""
import math

import pytest

from blt_dist.evaluation.scaling import crossing, fit_family

BUDGETS = [1e12, 2e12, 4e12, 8e12, 1.6e13]


def law(a: float, k: float):
    return lambda c: a * c ** k


def test_exact_power_laws_give_their_exponents_and_crossing():
    blt, bpe = law(40.0, -0.08), law(12.0, -0.04)
    fit, why = fit_family([(c, blt(c)) for c in BUDGETS])
    assert why == "" and fit.exponent == pytest.approx(-0.08) and fit.budgets == 5
    # 40 c^-0.08 = 12 c^-0.04  ->  c = (40/12)^(1/0.04)
    cross, _ = crossing([(c, blt(c)) for c in BUDGETS], [(c, bpe(c)) for c in BUDGETS])
    assert cross.flops == pytest.approx((40 / 12) ** 25, rel=1e-6)
    assert cross.low is None and cross.inside  # one seed: no spread; 1.18e13 lies within the budgets


def test_too_few_budgets_are_not_fitted_and_say_so():
    fit, why = fit_family([(1e12, 2.0), (1e12, 2.1), (2e12, 1.9)])
    assert fit is None and "2 budget(s)" in why and "at least 3" in why
    cross, why = crossing([(1e12, 2.0), (2e12, 1.9)], [(c, 2.0) for c in BUDGETS])
    assert cross is None and "not fitted" in why


def test_seed_spread_gives_a_range_around_the_crossing():
    blt, bpe = law(40.0, -0.08), law(12.0, -0.04)
    mid = (40 / 12) ** 25
    grid = [mid / 4, mid / 2, mid, mid * 2, mid * 4]
    a = [(c, blt(c) * f) for c in grid for f in ((0.98, 1.0, 1.02) if c == grid[0] else (1.0,))]
    b = [(c, bpe(c)) for c in grid]
    cross, _ = crossing(a, b)
    assert cross.inside and cross.low < cross.flops * 1.001 and cross.high > cross.flops * 0.999
    assert cross.low < cross.high and math.isfinite(cross.low)
