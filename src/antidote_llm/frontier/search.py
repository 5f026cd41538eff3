"""Evaluate Antidote's nested selections ratio by ratio on one model, with controls, and pick a ratio.

The selections at growing ratios are nested (core.realign.select_nested), so the model walks up the
frontier by zeroing only the weights each next ratio adds; the selected weights' values are kept aside
and restored at the end, so no copy of the model is made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from antidote_llm.core.realign import NestedSelection, RealignConfig, check_ratios, select_nested
from antidote_llm.data.records import Rows
from antidote_llm.errors import AntidoteError
from antidote_llm.evaluation.evaluate import EvalInputs
from antidote_llm.evaluation.metrics import Rate

DEFAULT_RATIOS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
Control = Literal["random", "benign"]


def split_names(value) -> tuple[str, ...]:
    """A comma-separated string (the CLI), or a list of them (YAML), as a tuple of names."""
    values = [value] if isinstance(value, str) else value
    return tuple(part.strip() for v in values for part in str(v).split(",") if part.strip())


def increasing_ratios(ratios) -> tuple[float, ...]:
    """Ratios as given (a comma-separated string or a list), checked: each in (0, 1), increasing."""
    if isinstance(ratios, str):
        ratios = [float(part) for part in ratios.split(",") if part.strip()]
    try:
        return check_ratios(ratios)
    except AntidoteError as exc:
        raise ValueError(str(exc)) from None


class FrontierConfig(BaseModel):
    """Which ratios to evaluate, the accuracy budget of the automatic choice, and the controls to draw."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ratios: tuple[float, ...] = Field(default=DEFAULT_RATIOS, description="ratios to evaluate, increasing")
    max_accuracy_drop: float = Field(
        default=2.0, ge=0, description="auto: the most fine-tune accuracy (points) the repair may cost against the "
        "un-repaired model on the validation rows")
    controls: tuple[Control, ...] = Field(
        default=(), description="controls drawn at the same ratios: random (random scores), benign (calibrated on "
        "benign rows)")

    _split_controls = field_validator("controls", mode="before")(split_names)
    _increasing = field_validator("ratios", mode="before")(increasing_ratios)


class FrontierPoint(BaseModel):
    selection: str  # "none" (the un-repaired model), "antidote", or a control
    ratio: float | None
    pruned_fraction: float
    harmful_score: float | None
    finetune_accuracy: float | None
    degenerate_rate: float | None
    compliance_rate: float | None
    # the counts behind the two rates, for their intervals
    harmful_count: int | None = None
    prompts: int | None = None
    correct: int | None = None
    rows: int | None = None

    def harmful(self) -> Rate | None:
        return Rate.of_counts(self.harmful_count, self.prompts) if self.harmful_count is not None and self.prompts else None

    def accuracy(self) -> Rate | None:
        return Rate.of_counts(self.correct, self.rows) if self.correct is not None and self.rows else None


@dataclass
class FrontierResult:
    points: list[FrontierPoint]
    selection: NestedSelection  # Antidote's (the controls' are not kept)
    picked: int | None = None  # index into selection.ratios when a ratio was chosen
    notes: dict = field(default_factory=dict)

    @property
    def baseline(self) -> FrontierPoint:
        return self.points[0]

    @property
    def antidote_points(self) -> list[FrontierPoint]:
        return self.points[1:1 + len(self.selection.ratios)]


def _evaluate(model, tokenizer, probe: EvalInputs, progress: bool) -> dict:
    return probe.run(model, tokenizer, progress=progress, fingerprint=False).metrics


def _point(selection: str, ratio: float | None, pruned_fraction: float, metrics: dict) -> FrontierPoint:
    task = metrics.get("task") or {}
    return FrontierPoint(
        selection=selection, ratio=ratio, pruned_fraction=pruned_fraction,
        harmful_score=metrics.get("harmful_score"), finetune_accuracy=metrics.get("finetune_accuracy"),
        degenerate_rate=metrics.get("degenerate_rate"), compliance_rate=metrics.get("compliance_rate"),
        harmful_count=metrics.get("harmful_count"), prompts=metrics.get("prompts") or None,
        correct=task.get("correct"), rows=task.get("rows"),
    )


class NestedPruning:
    """Puts the model at any ratio of a nested selection, and back, without a copy of the model: the values of
    the selected weights (a ratio's worth of the targets) are kept aside once. A compensated selection changes
    kept weights too, so its targets are kept whole."""

    def __init__(self, selection: NestedSelection):
        self.selection = selection
        self.weights = {t.param_name: t.weight for t in selection.targets}
        self.levels = {n: level.to(self.weights[n].device) for n, level in selection.levels.items()}
        self.whole = selection.compensation is not None
        self.kept = {n: self.weights[n].detach()[level > 0].clone() if not self.whole else self.weights[n].detach().clone()
                     for n, level in self.levels.items()}

    def prune_to(self, index: int | None) -> None:
        """Zero the weights pruned at `ratios[index]` and restore every other selected weight (None: restore all)."""
        with torch.no_grad():
            if self.whole:
                for n, original in self.kept.items():
                    self.weights[n].copy_(original)
                if index is not None:
                    self.selection.prune(index)
                return
            for n, level in self.levels.items():
                selected = level > 0
                values = self.kept[n].clone()
                if index is not None:
                    values[level[selected] <= index + 1] = 0
                self.weights[n][selected] = values


def _walk(model, tokenizer, name: str, selection: NestedSelection, probe: EvalInputs, progress: bool) -> list[FrontierPoint]:
    """Evaluate the model at each ratio in turn; then put every pruned weight back."""
    pruning = NestedPruning(selection)
    points = []
    try:
        for index, ratio in enumerate(selection.ratios):
            pruning.prune_to(index)
            pruned_fraction = selection.report(index).totals.pruned_fraction
            points.append(_point(name, ratio, pruned_fraction, _evaluate(model, tokenizer, probe, progress)))
    finally:
        pruning.prune_to(None)
    return points


def pick_operating_point(points: Sequence[FrontierPoint], baseline: FrontierPoint, max_accuracy_drop: float) -> int:
    """Index (into `points`) of the lowest harmful score among points whose accuracy is within
    `max_accuracy_drop` points of the baseline's; ties go to the higher accuracy, then the smaller ratio."""
    if baseline.finetune_accuracy is None or any(p.finetune_accuracy is None or p.harmful_score is None for p in points):
        raise AntidoteError("the automatic ratio needs a scored task (fine-tune accuracy) and harmful probe prompts")
    floor = baseline.finetune_accuracy - max_accuracy_drop
    within = [i for i, p in enumerate(points) if p.finetune_accuracy >= floor]
    if not within:
        best = max(points, key=lambda p: p.finetune_accuracy)
        raise AntidoteError(
            f"no ratio keeps fine-tune accuracy within {max_accuracy_drop} points of the un-repaired model's "
            f"{baseline.finetune_accuracy} (best: {best.finetune_accuracy} at ratio {best.ratio}); raise "
            "--max-accuracy-drop or add smaller ratios"
        )
    return min(within, key=lambda i: (points[i].harmful_score, -points[i].finetune_accuracy, points[i].ratio))


def run_frontier(
    model,
    tokenizer,
    config: RealignConfig,
    frontier: FrontierConfig,
    data: Rows,
    probe: EvalInputs,
    *,
    benign: Rows | None = None,
    protect_data: Rows | None = None,
    contrast_data: Rows | None = None,
    pick: bool = False,
    progress: bool = True,
) -> FrontierResult:
    """Evaluate the un-repaired model, Antidote at every ratio and the asked controls; with `pick`, choose
    the ratio (see pick_operating_point) and leave the model pruned at it, else leave it un-repaired."""
    if config.action != "zero":
        raise AntidoteError("the frontier zeroes weights; --action revert takes one --ratio")
    if "benign" in frontier.controls and benign is None:
        raise AntidoteError("control 'benign' needs benign rows (--benign-data)")
    config.check_inputs(has_data=True, has_protect_data=protect_data is not None, has_aligned=False,
                        has_contrast=contrast_data is not None)
    baseline = _point("none", None, 0.0, _evaluate(model, tokenizer, probe, progress))
    selection = select_nested(model, tokenizer, config, data, ratios=frontier.ratios, protect_data=protect_data,
                              contrast_data=contrast_data, progress=progress)
    points = [baseline, *_walk(model, tokenizer, "antidote", selection, probe, progress)]
    control_data = {"random": (config.model_copy(update={"score": "random"}), data),
                    "benign": (config, benign)}
    for control in frontier.controls:
        control_config, control_rows = control_data[control]
        control_selection = select_nested(model, tokenizer, control_config, control_rows, ratios=frontier.ratios,
                                          protect_data=protect_data, contrast_data=contrast_data, progress=progress)
        points += _walk(model, tokenizer, control, control_selection, probe, progress)
    result = FrontierResult(points=points, selection=selection)
    if pick:
        result.picked = pick_operating_point(result.antidote_points, baseline, frontier.max_accuracy_drop)
        prune_at(selection, result.picked)
    return result


def prune_at(selection: NestedSelection, index: int) -> None:
    """Prune, in place, as the selection does at `ratios[index]`."""
    selection.prune(index)
