"""Seed-layout patch statistics (issue #21, item 4) on hand-counted inputs."""
import math

import numpy as np
import pytest

from blt_dist.data.patch_stats import patch_stats, patch_stats_table


def test_buckets_and_entropy_bands_by_hand():
    # patches: 1, 4 (1-4); 5 (5-8); 12 (9-12); 13, 16 (13-16) -> 2/6, 1/6, 1/6, 2/6; mean 51/6
    # entropies: 0.5, 1.99 (<2); 2.0, 5.0 (2-5, edges inclusive); 5.01 (>5)
    stats = patch_stats(np.array([1, 4, 5, 12, 13, 16]), np.array([0.5, 1.99, 2.0, 5.0, 5.01]))
    assert stats.length_shares == pytest.approx({"1-4": 2 / 6, "5-8": 1 / 6, "9-12": 1 / 6, "13-16": 2 / 6})
    assert stats.entropy_shares == pytest.approx({"<2": 2 / 5, "2-5": 2 / 5, ">5": 1 / 5})
    assert stats.mean_patch_size == pytest.approx(51 / 6)
    table = patch_stats_table({"code": stats})
    assert "| code | 8.50 | 33.3% | 16.7% | 16.7% | 33.3% | 40.0% | 40.0% | 20.0% |" in table


def test_longer_patches_than_the_buckets_are_refused_and_empty_input_is_nan():
    with pytest.raises(ValueError, match="1..16"):
        patch_stats(np.array([3, 17]), np.array([1.0]))
    assert math.isnan(patch_stats(np.array([], dtype=np.int64), np.array([])).mean_patch_size)


def test_stats_from_an_eval_records_counts():
    from blt_dist.data.patch_stats import patch_stats_from_counts

    # [n] = patches of n positions: 2 of 1, 1 of 4, 3 of 6, 4 of 16
    histogram = [0, 2, 0, 0, 1, 0, 3] + [0] * 9 + [4]
    stats = patch_stats_from_counts(histogram, [5, 3, 2], 7.5)
    assert stats.length_shares == {"1-4": 0.3, "5-8": 0.3, "9-12": 0.0, "13-16": 0.4}
    assert stats.entropy_shares == {"<2": 0.5, "2-5": 0.3, ">5": 0.2}
    assert (stats.patches, stats.positions, stats.mean_patch_size) == (10, 10, 7.5)
    assert stats.row().endswith("50.0% | 30.0% | 20.0%")
    no_bands = patch_stats_from_counts(histogram, None, 7.5)
    assert no_bands.row().endswith("- | - | -")
    with pytest.raises(ValueError, match="1..16"):
        patch_stats_from_counts([0] * 17 + [1])
