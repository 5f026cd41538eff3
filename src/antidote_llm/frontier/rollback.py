"""Restore with rollback (beyond the paper; arXiv 2504.09757's recipe on Antidote's selection): prune the
selection in small groups, in the order of its score, and roll a group back when the accuracy on the user's
validation rows falls more than a tolerance below the un-repaired model's.

Each ratio's step (from the previous ratio to it) is cut into `groups` equal groups of the score order; the
groups are tried in order and a kept group stays kept, so the selections at the ratios stay nested. On a LoRA
adapter restoring a weight to its aligned value is zeroing the adapter entry, so the groups are the pruning's.
Cost: one validation evaluation per group, plus one of the un-repaired model.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import BaseModel, ConfigDict, Field

from antidote_llm.core import scoring
from antidote_llm.core.realign import NestedSelection, RealignConfig, check_ratios, select_nested
from antidote_llm.data.records import Rows
from antidote_llm.evaluation.evaluate import EvalInputs, evaluate_model
from antidote_llm.frontier.search import NestedPruning


class RollbackConfig(BaseModel):
    """How much validation accuracy a group may cost, and how finely each ratio's step is cut."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tolerance: float = Field(ge=0, description="roll a group back when the validation accuracy falls more than this "
                             "many points below the un-repaired model's")
    groups: int = Field(default=4, ge=1, le=32, description="groups per ratio step, tried in score order")


def group_ratios(ratios: tuple[float, ...], groups: int) -> tuple[float, ...]:
    """Every ratio's step from the previous ratio (0 for the first) cut into `groups` equal parts; the ratios
    themselves end their steps."""
    fine, low = [], 0.0
    for ratio in ratios:
        fine += [low + (ratio - low) * (part + 1) / groups for part in range(groups - 1)] + [ratio]
        low = ratio
    return check_ratios(fine)


def kept_levels(levels: torch.Tensor, rolled_back: set[int], groups: int) -> torch.Tensor:
    """Levels over the groups (1-based, 0 = never selected) as levels over the ratios, without the groups rolled
    back: group g belongs to the ratio ceil(g / groups)."""
    result = torch.div(_without(levels, rolled_back).long() + groups - 1, groups, rounding_mode="floor")
    return result.to(torch.uint8)


def _without(levels: torch.Tensor, groups: set[int]) -> torch.Tensor:
    """The levels with the given groups never selected."""
    return levels.masked_fill(torch.isin(levels, torch.tensor(sorted(groups), dtype=levels.dtype)), 0)


def _accuracy(model, tokenizer, validation: EvalInputs) -> float:
    result = evaluate_model(model, tokenizer, harmful_prompts=None, task=validation.task, task_pairs=list(validation.rows),
                            settings=validation.settings, template=validation.template, progress=False,
                            fingerprint=False)
    return 100.0 * sum(row["correct"] is True for row in result.task_answers) / len(result.task_answers)


def select_with_rollback(
    model, tokenizer, config: RealignConfig, data: Rows, validation: EvalInputs, rollback: RollbackConfig, *,
    ratios: tuple[float, ...], contrast_data: Rows | None = None, progress: bool = False,
) -> NestedSelection:
    """The nested selection at `ratios` with the groups that cost more than `rollback.tolerance` accuracy points
    rolled back. The model is left as it was; the selection's method report says which groups were rolled back
    and the accuracy after each group."""
    ratios = check_ratios(ratios)
    fine = select_nested(model, tokenizer, config, data, ratios=group_ratios(ratios, rollback.groups),
                         contrast_data=contrast_data, progress=progress)
    base = _accuracy(model, tokenizer, validation)
    rolled_back: set[int] = set()
    tried = []
    for group in range(1, len(fine.ratios) + 1):
        pruning = NestedPruning(replace(fine, levels={n: _without(level, rolled_back) for n, level in fine.levels.items()}))
        try:
            pruning.prune_to(group - 1)
            accuracy = _accuracy(model, tokenizer, validation)
        finally:
            pruning.prune_to(None)
        kept = base - accuracy <= rollback.tolerance
        if not kept:
            rolled_back.add(group)
        tried.append({"ratio": fine.ratios[group - 1], "accuracy": round(accuracy, 2), "kept": kept})
    levels = {n: kept_levels(level, rolled_back, rollback.groups) for n, level in fine.levels.items()}
    record = {**rollback.model_dump(), "validation_rows": len(validation.rows), "accuracy_before": round(base, 2),
              "groups_tried": tried}
    return NestedSelection(
        targets=fine.targets, ratios=ratios, levels=levels,
        selected={n: scoring.selected_counts(level, len(ratios)) for n, level in levels.items()},
        data=fine.data, protection=fine.protection, contrast=fine.contrast,
        method=fine.method.model_copy(update={"rollback": record}), timings=fine.timings,
        compensation=fine.compensation,
    )
