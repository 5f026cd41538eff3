"""The pure math of Antidote: input statistics, weight scores, and which weights to prune.

Every weight is handled in Linear layout `[out_features, in_features]`: row i is output i, column j
multiplies input channel j. Callers transpose GPT-2 Conv1D and embedding weights into that layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from antidote_llm.errors import AntidoteError


class ChannelStats:
    """Running sum of squared inputs per input channel over counted tokens, in fp32.

    `mean_sq` is s_j = (1/N) sum_tokens x_j^2; the 1/N is common to every module seeing the same
    tokens, so it changes no row, matrix or global selection (the authors divide by rows).
    """

    def __init__(self, channels: int, device: torch.device | str = "cpu"):
        self.sum_sq = torch.zeros(channels, dtype=torch.float32, device=device)
        self.tokens = 0

    def add_sum(self, sum_sq: torch.Tensor, tokens: int) -> None:
        self.sum_sq += sum_sq
        self.tokens += tokens

    def add_counts(self, counts: torch.Tensor, tokens: int) -> None:
        """For one-hot inputs (embeddings): x_j^2 summed is how often token j occurred."""
        self.add_sum(counts.float(), tokens)

    @property
    def mean_sq(self) -> torch.Tensor:
        if self.tokens == 0:
            raise AntidoteError("no tokens were counted for a scored module; check --tokens and the data")
        return self.sum_sq / self.tokens


def _squares(flat: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """x^2 in fp32, into `out` when given (a reused buffer: no fresh allocation, and its page faults, per call)."""
    if out is None:
        return flat.float().pow(2)
    if flat.dtype == torch.float32:
        return torch.mul(flat, flat, out=out)
    return out.copy_(flat).mul_(out)  # square after the cast: bf16 squares would lose precision


def squared_sum(x: torch.Tensor, rows: torch.Tensor, exclude: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_t x_tj^2 in fp32 over the rows of `x` flattened to [tokens, channels]: the given `rows`, or with
    `exclude` all rows but those. Summing everything and subtracting a few padding rows copies far less
    than gathering the many counted ones. `out`: an fp32 buffer of the flattened shape for the squares."""
    flat = x.reshape(-1, x.shape[-1])
    if not exclude:
        return flat.index_select(0, rows).float().pow(2).sum(0)  # einsum is ~10x slower here on CPU
    total = _squares(flat, out).sum(0)
    if rows.numel():
        total -= flat.index_select(0, rows).float().pow(2).sum(0)
    return total


def wanda_scores(weight: torch.Tensor, mean_sq: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| * ||x_j||: the weights that carry the most signal on the calibration data."""
    return weight.detach().float().abs().mul_(mean_sq.to(weight.device).float().sqrt().unsqueeze(0))


def first_order_scores(weight: torch.Tensor, loss_grad: torch.Tensor) -> torch.Tensor:
    """S_ij = W_ij * dL/dW_ij: by first-order Taylor, how much zeroing W_ij lowers the loss L (zeroing moves
    W_ij by -W_ij, so L changes by about -W_ij * dL/dW_ij). Signed: weights whose removal raises L score < 0."""
    return weight.detach().float() * loss_grad.to(weight.device).float()


COMPENSATION_DAMPING = 0.01  # SparseGPT's percdamp: 1% of the mean diagonal keeps H_KK invertible
COMPENSATION_CHUNK_ELEMENTS = 1 << 24  # pruned rows solved at once: their [rows, |P|, |P|] systems stay near 64 MB


def compensate(weight: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor,
               damping: float = COMPENSATION_DAMPING, anchor: torch.Tensor | None = None) -> torch.Tensor:
    """The weight with `pruned` zeroed and every kept weight of a pruned row re-fitted so the row's outputs on the
    rows behind `gram` change least: per row w, with P its pruned and K its kept columns and H = sum_x x x^T
    (+ `damping` times H's mean diagonal on the diagonal), the least-squares fit min ||X (w' - w)||^2 subject to
    w'_P = 0 (SparseGPT's update, exact per row; IRR's recipe). `anchor` (A, a Gram matrix already weighted) adds
    the penalty (w' - w_zeroed)^T A (w' - w_zeroed), which keeps the zeroing's effect on A's rows.
    Solved in OBS form: with G = (H + A)^-1, the unconstrained optimum is w* = G (H w + A w_zeroed) (w itself
    without A), and the constraint w'_P = 0 moves it to w' = w* - G_:P G_PP^-1 w*_P: one [in, in] inverse per
    weight, then one [|P|, |P|] solve per pruned row (the same as solving (H + A)_KK per row, in |P|^3, not |K|^3).
    H + A must be positive definite: a positive `damping` makes it so. Linear layout [out, in]; the inverse in
    fp64, the rest in fp32, the weight's dtype back.
    """
    weight32 = weight.detach().float()
    pruned = pruned.to(weight.device)
    gram = gram.to(weight.device).float()
    ridge = damping * gram.diagonal().mean().clamp_min(torch.finfo(torch.float32).tiny)
    damped = gram + ridge * torch.eye(gram.shape[0], device=gram.device)
    anchor = None if anchor is None else anchor.to(weight.device).float()
    system = damped if anchor is None else damped + anchor
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(system.double())).float()
    result = weight32.masked_fill(pruned, 0)
    rows = pruned.any(1).nonzero().squeeze(1)
    counts = pruned[rows].sum(1)
    width = int(counts.max()) if rows.numel() else 0
    chunk = max(1, COMPENSATION_CHUNK_ELEMENTS // max(width * width, weight.shape[1]))
    for start in range(0, rows.numel(), chunk):
        index = rows[start:start + chunk]
        # w* = G (H w + A w_zeroed) = w - G A w_P (w_P: w on the pruned columns, zero elsewhere); rows as row vectors
        optimum = weight32[index]
        if anchor is not None:
            optimum = optimum - ((optimum * pruned[index]) @ anchor) @ inverse
        # each row's pruned columns first (stable), padded to `width` by identity equations with zero right-hand side
        columns = torch.argsort(pruned[index].to(torch.int8), dim=1, descending=True, stable=True)[:, :width]
        valid = torch.arange(width, device=weight.device) < counts[start:start + chunk, None]
        pair = valid.unsqueeze(2) & valid.unsqueeze(1)
        block = torch.where(pair, inverse[columns.unsqueeze(2), columns.unsqueeze(1)],
                            torch.eye(width, device=weight.device).expand_as(pair))
        multipliers = torch.linalg.solve(block, optimum.gather(1, columns) * valid)
        spread = torch.zeros_like(optimum).scatter_(1, columns, multipliers * valid)
        result[index] = (optimum - spread @ inverse).masked_fill(pruned[index], 0)
    return result.to(weight.dtype)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs()


def random_scores(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(weight.shape, generator=generator, dtype=torch.float32).to(weight.device)


def prune_count(size: int, ratio: float) -> int:
    """How many of `size` weights the top fraction `ratio` is: size - floor(size * (1 - ratio)), as the authors' code."""
    return size - math.floor(size * (1.0 - ratio))


def check_ratio(ratio: float, name: str = "ratio") -> None:
    if not (0.0 < ratio < 1.0) or math.isnan(ratio):
        raise AntidoteError(f"{name} must be in (0, 1), got {ratio}; e.g. 0.05 prunes the top 5%")


def _kth_largest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The `count`-th largest entry along the last dim (keepdim); topk of the smaller side is fastest."""
    size = scores.shape[-1]
    if count <= size - count + 1:
        return torch.topk(scores, count, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    return torch.topk(scores, size - count + 1, dim=-1, largest=False, sorted=False).values.amax(-1, keepdim=True)


def _top_by_stable_sort(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the `count` largest entries along the last dim, ties going to the later index, exactly
    as taking the tail of a stable ascending sort would choose; in linear time (topk), not a sort."""
    if count == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = _kth_largest(scores, count)
    at_least = scores >= threshold
    if bool((at_least.sum(-1) == count).all()):  # the common case: no tie straddles the cut
        return at_least
    above = scores > threshold
    tied = at_least & ~above
    needed = count - above.sum(-1, keepdim=True)
    ties_from_right = tied.flip(-1).cumsum(-1).flip(-1)  # ties at or after each position
    return above | (tied & (ties_from_right <= needed))


def select_per_row(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """The authors' selection: in each output row, the top `ratio` of weights by score."""
    return _top_by_stable_sort(scores, prune_count(scores.shape[-1], ratio))


def select_per_matrix(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    flat = scores.reshape(-1)
    return _top_by_stable_sort(flat, prune_count(flat.numel(), ratio)).reshape(scores.shape)


def select_global(scores: Mapping[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """The top `ratio` of all weights of all targets together (targets compete for one budget)."""
    names = list(scores)
    flat = torch.cat([scores[name].reshape(-1).cpu() for name in names])
    chosen = _top_by_stable_sort(flat, prune_count(flat.numel(), ratio))
    masks, offset = {}, 0
    for name in names:
        size = scores[name].numel()
        masks[name] = chosen[offset:offset + size].reshape(scores[name].shape).to(scores[name].device)
        offset += size
    return masks


GRANULARITIES = ("row", "matrix", "global")


def select(scores: Mapping[str, torch.Tensor], ratio: float, granularity: str) -> dict[str, torch.Tensor]:
    """Masks (True = selected) of the top `ratio` weights by score at the given granularity."""
    check_ratio(ratio)
    if granularity == "global":
        return select_global(scores, ratio)
    per_tensor = {"row": select_per_row, "matrix": select_per_matrix}.get(granularity)
    if per_tensor is None:
        raise AntidoteError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    return {name: per_tensor(score, ratio) for name, score in scores.items()}


def nested_levels(masks) -> torch.Tensor:
    """One uint8 tensor for masks selected at increasing ratios: 0 = never selected, i = selected from the
    i-th mask on. Refuses masks that are not nested (each contained in the next)."""
    if len(masks) > 255:
        raise AntidoteError(f"at most 255 ratios at once, got {len(masks)}")
    for smaller, larger in zip(masks, masks[1:], strict=False):
        if bool(torch.gt(smaller, larger).any()):
            raise AssertionError("selections at growing ratios are not nested")
    depth = masks[0].to(torch.uint8)  # how many of the masks select each weight: k - level + 1 where selected
    if len(masks) == 1:
        return depth
    for mask in masks[1:]:
        depth += mask
    return torch.where(depth > 0, len(masks) + 1 - depth, 0)


def selected_counts(levels: torch.Tensor, ratios: int) -> list[int]:
    """How many weights the selection at each of `ratios` ratios holds, from nested levels in one pass."""
    per_level = torch.bincount(levels.reshape(-1), minlength=ratios + 1)
    return per_level[1:ratios + 1].cumsum(0).tolist()


def level_mask(levels: torch.Tensor, index: int) -> torch.Tensor:
    """The selection at the `index`-th ratio (0-based) from nested levels."""
    return (levels > 0) & (levels <= index + 1)
