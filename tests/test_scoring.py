"""The pure math against brute-force computations."""

import math

import pytest
import torch

from antidote_llm.core import scoring
from antidote_llm.errors import AntidoteError


def brute_row_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per row, the highest-scoring cols - floor(cols*(1-ratio)) entries; ties to the later index."""
    rows, cols = scores.shape
    count = cols - math.floor(cols * (1 - ratio))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for i in range(rows):
        ranked = sorted(range(cols), key=lambda j: (scores[i, j].item(), j))  # stable ascending
        for j in ranked[cols - count:]:
            mask[i, j] = True
    return mask


def test_channel_stats_equal_brute_force_and_skip_padding():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4)
    counted = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    flat = counted.reshape(-1)
    gathered = scoring.squared_sum(x, flat.nonzero().squeeze(1), exclude=False)
    subtracted = scoring.squared_sum(x, (~flat).nonzero().squeeze(1), exclude=True)
    torch.testing.assert_close(gathered, subtracted)
    stats = scoring.ChannelStats(4)
    stats.add_sum(gathered, int(flat.sum()))
    expected = torch.zeros(4)
    n = 0
    for b in range(3):
        for t in range(5):
            if counted[b, t]:
                expected += x[b, t] ** 2
                n += 1
    assert stats.tokens == n == 9
    torch.testing.assert_close(stats.mean_sq, expected / n)


def test_channel_stats_without_tokens_is_an_error():
    with pytest.raises(AntidoteError):
        _ = scoring.ChannelStats(3).mean_sq


def test_wanda_score_is_abs_weight_times_input_norm():
    weight = torch.tensor([[1.0, -2.0], [-3.0, 4.0]])
    mean_sq = torch.tensor([4.0, 0.25])
    expected = torch.tensor([[2.0, 1.0], [6.0, 2.0]])
    torch.testing.assert_close(scoring.wanda_scores(weight, mean_sq), expected)


@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.1, 0.25, 0.5, 0.99])
@pytest.mark.parametrize("cols", [1, 3, 7, 64])
def test_row_selection_matches_brute_force(ratio, cols):
    torch.manual_seed(cols)
    scores = torch.randint(0, 4, (6, cols)).float()  # many ties on purpose
    mask = scoring.select_per_row(scores, ratio)
    assert torch.equal(mask, brute_row_mask(scores, ratio))
    assert (mask.sum(1) == cols - math.floor(cols * (1 - ratio))).all()


def test_prune_count_follows_the_authors_rounding():
    assert scoring.prune_count(4096, 0.05) == 4096 - math.floor(4096 * 0.95)
    assert scoring.prune_count(10, 0.01) == 1  # the authors' code prunes at least one per row when cols*alpha rounds up
    assert scoring.prune_count(100, 0.5) == 50


def test_matrix_selection_takes_top_fraction_of_whole_matrix():
    scores = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    mask = scoring.select_per_matrix(scores, 0.2)
    assert mask.sum() == 4
    assert mask.reshape(-1)[-4:].all()


def test_global_selection_spans_tensors():
    scores = {"a": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([[10.0, 0.0, 9.0]])}
    masks = scoring.select(scores, 0.4, "global")
    assert masks["a"].tolist() == [[False, False]]
    assert masks["b"].tolist() == [[True, False, True]]


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_ratio_outside_open_interval_is_refused(ratio):
    with pytest.raises(AntidoteError, match="ratio"):
        scoring.select({"a": torch.ones(2, 2)}, ratio, "row")


def test_unknown_granularity_is_refused():
    with pytest.raises(AntidoteError, match="granularity"):
        scoring.select({"a": torch.ones(2, 2)}, 0.5, "column")


def test_random_scores_are_seeded():
    w = torch.zeros(3, 4)
    a = scoring.random_scores(w, torch.Generator().manual_seed(1))
    b = scoring.random_scores(w, torch.Generator().manual_seed(1))
    c = scoring.random_scores(w, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_squared_sum_into_a_reused_buffer_equals_brute_force(dtype):
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    padding = torch.tensor([1, 4, 9])
    expected = sum(x.reshape(-1, 7)[i].double() ** 2 for i in range(15) if i not in padding.tolist())
    buffer = torch.full((15, 7), float("nan"))  # stale contents must not matter
    for out in (None, buffer):
        got = scoring.squared_sum(x, padding, exclude=True, out=out)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_nested_levels_and_counts_against_the_masks(k):
    scores = torch.rand(40, 33, generator=torch.Generator().manual_seed(k))
    ratios = [0.05 * (i + 1) for i in range(k)]
    masks = [scoring.select_per_row(scores, ratio) for ratio in ratios]
    levels = scoring.nested_levels(masks)
    first = torch.zeros(scores.shape, dtype=torch.uint8)  # by hand: the first ratio that selects each weight
    for index in reversed(range(k)):
        first[masks[index]] = index + 1
    assert levels.dtype == torch.uint8 and torch.equal(levels, first)
    for index, mask in enumerate(masks):
        assert torch.equal(scoring.level_mask(levels, index), mask)
    assert scoring.selected_counts(levels, k) == [int(mask.sum()) for mask in masks]


def test_masks_that_are_not_nested_are_refused():
    small = torch.tensor([[True, False]])
    with pytest.raises(AssertionError, match="not nested"):
        scoring.nested_levels([small, ~small])
