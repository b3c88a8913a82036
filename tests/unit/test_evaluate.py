"""The win rate evaluate reports: ties, answers alike, and its bootstrap interval."""

from __future__ import annotations

import pytest

from jobs.evaluate import win_rate


def test_ties_and_answers_alike_count_half():
    # a win, a loss, equal scores, and one answer given by both models that the scorer
    # (two batches, bf16) scored a hair apart
    candidate, baseline = [3.0, 1.0, 2.0, 2.0], [1.0, 3.0, 2.0, 2.001]
    rate, _, _ = win_rate(candidate, baseline, seed=0, same=[False, False, False, True])
    assert rate == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    assert win_rate(candidate, baseline, seed=0)[0] == pytest.approx(1.5 / 4)


def test_the_interval_is_a_bootstrap_over_prompts():
    # 7 wins in 10: the 2.5% and 97.5% points of Binomial(10, 0.7) / 10 are 0.4 and 1.0
    candidate, baseline = [1.0] * 7 + [0.0] * 3, [0.5] * 10
    rate, low, high = win_rate(candidate, baseline, seed=3)
    assert rate == pytest.approx(0.7)
    assert 0.3 <= low <= 0.5 and 0.9 <= high <= 1.0, (low, high)
    assert win_rate(candidate, baseline, seed=3) == (rate, low, high)  # seeded
    assert win_rate([1.0] * 5, [0.0] * 5, seed=0) == (1.0, 1.0, 1.0)  # no doubt left
