"""The benchmarks' statistics for paired rounds (benchmarks/common.py)."""

from __future__ import annotations

import math
import random

import pytest

from benchmarks.common import Paired, median_interval, paired_ratios


def test_median_interval_uses_the_binomial_order_statistics() -> None:
    # Published ranks for the 95% interval of a median: n=6 -> 1st and 6th, n=10 -> 2nd and
    # 9th, n=30 -> 10th and 21st.
    assert median_interval(list(range(1, 7))) == (1, 6)
    assert median_interval(list(range(1, 11))) == (2, 9)
    assert median_interval(list(range(1, 31))) == (10, 21)
    assert median_interval([5.0, 1.0, 3.0, 6.0, 2.0, 4.0]) == (1.0, 6.0)


def test_median_interval_is_undefined_for_too_few_values() -> None:
    low, high = median_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert math.isnan(low) and math.isnan(high)


@pytest.mark.parametrize("n", [8, 15, 30])
def test_median_interval_covers_the_median_at_least_95_percent(n: int) -> None:
    rng = random.Random(n)
    trials = 3000
    covered = 0
    for _ in range(trials):
        values = [rng.lognormvariate(0.0, 0.2) for _ in range(n)]  # true median 1.0
        low, high = median_interval(values)
        covered += low <= 1.0 <= high
    # Exact coverage is >= 95% by construction; 3,000 trials put the estimate within ~1%.
    assert covered / trials >= 0.935


def test_paired_ratios_summarise_each_pair() -> None:
    speed = paired_ratios([110, 90, 120, 104, 100, 96, 130, 116], [100] * 8)
    assert speed.median == pytest.approx(1.07)
    assert (speed.low, speed.high) == (pytest.approx(0.9), pytest.approx(1.3))
    assert speed.interval == (pytest.approx(0.9), pytest.approx(1.3))
    assert speed.wins == 5 and speed.pairs == 8
    assert speed.ratio_text() == "1.07x [0.90-1.30] (0.90-1.30, 5/8 > 1)"


def test_paired_ignores_pairs_without_a_reference() -> None:
    speed = paired_ratios([1.0, 2.0], [0.0, 1.0])
    assert speed.pairs == 1 and speed.median == 2.0
    assert Paired.of([]).ratio_text() == "-"


def test_head_to_head_target_needs_bare_parity_production_lead_and_no_errors() -> None:
    from benchmarks.common import head_to_head_target

    ahead = paired_ratios([110, 105, 120], [100, 100, 100])
    level = paired_ratios([100, 100, 100], [100, 100, 100])
    behind = paired_ratios([90, 95, 99], [100, 100, 100])
    met = head_to_head_target("t", "median of paired rounds", level, ahead)
    assert met.met is True
    assert met.goal == ">= 1.00x bare and > 1.00x production (median of paired rounds)"
    assert head_to_head_target("t", "x", behind, ahead).met is False
    assert head_to_head_target("t", "x", ahead, level).met is False
    failed = head_to_head_target("t", "x", ahead, ahead, "2 errors")
    assert failed.met is False and failed.measured.endswith(", 2 errors")
