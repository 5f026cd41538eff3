"""95% intervals for the rates the evaluation reports, and what a sample size can decide.

A rate k/n (a harmful score, a fine-tune accuracy) gets the Wilson score interval: the p whose score test
|k/n - p| <= z sqrt(p (1 - p) / n) accepts, which keeps its coverage near 95% at small n and at 0 or n,
where the normal approximation collapses to a point. A drop in accuracy measured on the same rows before and
after a repair gets Newcombe's hybrid score interval for paired proportions (Newcombe 1998, method 10): the
two Wilson intervals combined with the correlation of the paired outcomes, so a repair that changes no
answer has an interval around 0 however small the set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054  # the two-sided 95% normal quantile


@dataclass(frozen=True)
class Interval:
    """A rate in percent with its 95% interval."""

    value: float
    low: float
    high: float

    def text(self) -> str:
        return f"{self.value:.1f} [{self.low:.1f}, {self.high:.1f}]"


def wilson(successes: int, total: int, z: float = Z95) -> Interval:
    """The Wilson score interval of successes/total, in percent."""
    if total <= 0 or not 0 <= successes <= total:
        raise ValueError(f"need 0 <= successes <= total and total > 0, got {successes}/{total}")
    p = successes / total
    denominator = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    # at 0 and n the algebra leaves float noise beyond the closed end
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == total else min(1.0, center + half)
    return Interval(100 * p, 100 * low, 100 * high)


def paired_difference(before: Sequence[bool], after: Sequence[bool], z: float = Z95) -> Interval:
    """before-rate minus after-rate on the same rows (a drop when positive), in points, with Newcombe's hybrid
    score interval for paired proportions."""
    if len(before) != len(after) or not before:
        raise ValueError("paired outcomes need the same, non-empty rows before and after")
    n = len(before)
    both = sum(b and a for b, a in zip(before, after, strict=True))
    only_before = sum(b and not a for b, a in zip(before, after, strict=True))
    only_after = sum(a and not b for b, a in zip(before, after, strict=True))
    neither = n - both - only_before - only_after
    first, second = wilson(both + only_before, n, z), wilson(both + only_after, n, z)
    p1, l1, u1 = first.value / 100, first.low / 100, first.high / 100
    p2, l2, u2 = second.value / 100, second.low / 100, second.high / 100
    margins = (both + only_before) * (neither + only_after) * (both + only_after) * (neither + only_before)
    phi = (both * neither - only_before * only_after) / math.sqrt(margins) if margins else 0.0
    delta = p1 - p2
    low = delta - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = delta + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return Interval(100 * delta, 100 * max(-1.0, low), 100 * min(1.0, high))


def most_failures_within(total: int, target: float, z: float = Z95) -> int | None:
    """The largest count k of `total` whose Wilson upper bound is within `target` percent; None when not even
    0 of `total` is (the set is too small to show a rate that low)."""
    best = None
    for count in range(total + 1):
        if wilson(count, total, z).high > target:
            break
        best = count
    return best


def smallest_set_for(target: float, z: float = Z95) -> int | None:
    """The fewest items with which 0 failures shows a rate within `target` percent (None for a target of 0:
    no finite set does): n >= z^2 (1 - t) / t, from the Wilson upper bound at 0 successes, z^2 / (n + z^2)."""
    if target <= 0:
        return None
    if target >= 100:
        return 1
    t = target / 100
    return max(1, math.ceil(z * z * (1 - t) / t - 1e-9))
