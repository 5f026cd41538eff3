"""The intervals against brute force: Wilson by inverting its score test on a grid, the paired interval by its
coverage in a seeded simulation, and the sample-size rules by enumeration."""

import random

import pytest

from antidote_llm.evaluation.intervals import (
    Z95,
    most_failures_within,
    paired_difference,
    smallest_set_for,
    wilson,
)


@pytest.mark.parametrize(("successes", "total"), [(0, 32), (1, 32), (16, 32), (31, 32), (32, 32), (3, 7), (97, 200)])
def test_wilson_is_the_set_of_rates_its_score_test_accepts(successes, total):
    observed = successes / total
    grid = [i / 100_000 for i in range(100_001)]
    accepted = [p for p in grid if (observed - p) ** 2 <= Z95 ** 2 * p * (1 - p) / total]
    interval = wilson(successes, total)
    assert interval.value == pytest.approx(100 * observed)
    assert interval.low == pytest.approx(100 * min(accepted), abs=2e-3)
    assert interval.high == pytest.approx(100 * max(accepted), abs=2e-3)


def _coverage(trials: int, n: int, both: float, only_before: float, only_after: float) -> float:
    rng = random.Random(0)
    truth = 100 * (only_before - only_after)
    covered = 0
    for _ in range(trials):
        before, after = [], []
        for _ in range(n):
            u = rng.random()
            before.append(u < both + only_before)
            after.append(u < both or both + only_before <= u < both + only_before + only_after)
        interval = paired_difference(before, after)
        covered += interval.low <= truth <= interval.high
    return covered / trials


@pytest.mark.parametrize(("n", "cells"), [(60, (0.7, 0.1, 0.05)), (100, (0.75, 0.03, 0.02)), (40, (0.5, 0.2, 0.1))])
def test_the_paired_drop_interval_covers_the_true_drop_about_95_percent_of_the_time(n, cells):
    assert 0.93 <= _coverage(1500, n, *cells) <= 0.99


def test_the_paired_drop_of_unchanged_answers_is_zero_with_an_interval_around_it():
    answers = [True] * 40 + [False] * 20
    same = paired_difference(answers, answers)
    assert same.value == 0 and same.low < 0 < same.high and same.high < 7
    worse = paired_difference(answers, [False] * 10 + answers[10:])  # 10 of 60 rows lost
    assert worse.value == pytest.approx(100 * 10 / 60) and worse.low > 0
    with pytest.raises(ValueError):
        paired_difference(answers, answers[:-1])


def test_sample_sizes_that_can_show_a_harmful_score_within_the_target():
    for target in (5.0, 10.0, 20.0):
        smallest = smallest_set_for(target)
        for n in range(1, 200):
            assert (most_failures_within(n, target) is None) == (n < smallest)
            allowed = most_failures_within(n, target)
            if allowed is not None:  # brute force: the largest count whose upper bound is within the target
                assert max(k for k in range(n + 1) if wilson(k, n).high <= target) == allowed
    assert smallest_set_for(10) == 35  # 32 probe prompts cannot show HS <= 10 even with no harmful answer
    assert most_failures_within(64, 10) == 1 and smallest_set_for(0) is None  # 64 prompts: at most 1 harmful
