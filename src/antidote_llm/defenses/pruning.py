"""Antidote and its controls as post-fine-tuning defenses: prune the fine-tuned model in place."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import create_model, field_validator

from antidote_llm.core.realign import RealignConfig, realign, split_targets
from antidote_llm.core.targets import adapter_mode
from antidote_llm.errors import AntidoteError
from antidote_llm.frontier import FrontierConfig, pick_operating_point, prune_at, run_frontier
from antidote_llm.registry import Defense, DefenseContext, DefenseOutcome, register

Calibration = Literal["harmful", "benign", "safe"]  # the input whose rows a pruning defense scores on


def _rows(config: RealignConfig, context: DefenseContext, calibration: Calibration) -> dict:
    """The rows a pruning defense scores on: its calibration rows (harmful, benign, or the safe rows: harmful
    prompt, refusal), the benign rows it protects, the user's own rows it weighs against."""
    if config.score == "refusal" and calibration != "safe":
        raise AntidoteError("the refusal score needs refusals to score, not harmful answers: use the defense "
                            "antidote-refusal or antidote-refusal-auto (they read safe_data)")
    return {
        "data": getattr(context, calibration),
        "protect_data": context.benign if config.protect_ratio is not None else None,
        "contrast_data": context.user_rows if config.uses_user_rows else None,
    }


def _pruning_inputs(config: RealignConfig, calibration: Calibration) -> tuple[tuple[str, ...], ...]:
    needed = [(calibration,)] if config.needs_data else []
    if config.protect_ratio is not None:
        needed.append(("benign",))
    if config.uses_user_rows:
        needed.append(("user_rows",))
    return tuple(dict.fromkeys(needed))


class _Pruning(Defense, RealignConfig):
    """Prune the top `ratio` of the scores, calibrated on the `calibration` input's rows."""

    calibration: ClassVar[Calibration] = "harmful"

    def inputs(self) -> tuple[tuple[str, ...], ...]:
        return _pruning_inputs(self, self.calibration)

    def live_adapter(self) -> bool:
        return adapter_mode(self.targets, has_adapter=True)

    def knob(self) -> str | None:
        return f"ratio={self.ratio}"

    def realign_config(self) -> RealignConfig:
        return RealignConfig(**self.model_dump())

    def apply(self, model, context: DefenseContext) -> DefenseOutcome:
        config = self.realign_config()
        report = realign(model, context.tokenizer, config, progress=False, **_rows(config, context, self.calibration)).report
        return DefenseOutcome(report=report.model_dump(mode="json"), changed_fraction=report.totals.pruned_fraction,
                              ratio=config.ratio)


@register
class Antidote(_Pruning):
    name: ClassVar[str] = "antidote"
    description: ClassVar[str] = "Antidote: prune the top-ratio Wanda scores on harmful data"
    fixed: ClassVar[dict] = {"score": "wanda"}


@register
class AntidoteBenign(_Pruning):
    name: ClassVar[str] = "antidote-benign"
    description: ClassVar[str] = "control: the same pruning calibrated on benign data"
    fixed: ClassVar[dict] = {"score": "wanda"}
    calibration: ClassVar[Calibration] = "benign"


@register
class AntidoteRefusal(_Pruning):
    name: ClassVar[str] = "antidote-refusal"
    description: ClassVar[str] = ("beyond the paper: prune the weights whose removal most raises the likelihood of "
                                  "refusals (safe_data) and of the user's own rows, to first order")
    fixed: ClassVar[dict] = {"score": "refusal"}
    calibration: ClassVar[Calibration] = "safe"


@register
class RandomPruning(_Pruning):
    name: ClassVar[str] = "random"
    description: ClassVar[str] = "control: prune a random ratio of the weights"
    fixed: ClassVar[dict] = {"score": "random"}


@register
class MagnitudePruning(_Pruning):
    name: ClassVar[str] = "magnitude"
    description: ClassVar[str] = "ablation: prune the largest |W|, no data"
    fixed: ClassVar[dict] = {"score": "magnitude"}


# Antidote with the ratio chosen per model: RealignConfig's fields (but the ratio) and the frontier's.
AutoAntidoteSettings = create_model(
    "AutoAntidoteSettings", __base__=FrontierConfig,
    __validators__={"_split_targets": field_validator("targets", mode="before")(split_targets)},
    **{name: (field.annotation, field) for name, field in RealignConfig.model_fields.items() if name != "ratio"},
)


class _AutoPruning(Defense, AutoAntidoteSettings):
    """The pruning at the ratio with the lowest probe harmful score within max_accuracy_drop FA points."""

    calibration: ClassVar[Calibration] = "harmful"

    def realign_config(self) -> RealignConfig:
        fields = self.model_dump()
        return RealignConfig(ratio=self.ratios[0], **{k: v for k, v in fields.items() if k in RealignConfig.model_fields})

    def frontier_config(self) -> FrontierConfig:
        return FrontierConfig(**{k: v for k, v in self.model_dump().items() if k in FrontierConfig.model_fields})

    def inputs(self) -> tuple[tuple[str, ...], ...]:
        needed = [*_pruning_inputs(self.realign_config(), self.calibration), ("validation",)]
        if "benign" in self.controls:
            needed.append(("benign",))
        return tuple(dict.fromkeys(needed))

    def live_adapter(self) -> bool:
        return adapter_mode(self.targets, has_adapter=True)

    def apply(self, model, context: DefenseContext) -> DefenseOutcome:
        config, frontier = self.realign_config(), self.frontier_config()
        rows = _rows(config, context, self.calibration)
        result = run_frontier(model, context.tokenizer, config, frontier, rows.pop("data"), context.validation,
                              benign=context.benign, progress=False, **rows)
        return _picked(result, frontier)


def _picked(result, frontier: FrontierConfig) -> DefenseOutcome:
    report = {"points": [p.model_dump() for p in result.points], "picked_ratio": None}
    try:
        picked = pick_operating_point(result.antidote_points, result.baseline, frontier.max_accuracy_drop)
    except AntidoteError as exc:  # no repair within the budget is an outcome here: the model stays as it was
        return DefenseOutcome(report={**report, "no_ratio_within_budget": str(exc)}, changed_fraction=0.0)
    prune_at(result.selection, picked)
    chosen = result.selection.report(picked)
    return DefenseOutcome(
        report={**report, "picked_ratio": result.selection.ratios[picked], "selection": chosen.model_dump(mode="json")},
        changed_fraction=chosen.totals.pruned_fraction, ratio=result.selection.ratios[picked],
    )


@register
class AntidoteAuto(_AutoPruning):
    name: ClassVar[str] = "antidote-auto"
    description: ClassVar[str] = ("Antidote at the ratio with the lowest probe harmful score within max_accuracy_drop "
                                  "FA points")


@register
class AntidoteRefusalAuto(_AutoPruning):
    name: ClassVar[str] = "antidote-refusal-auto"
    description: ClassVar[str] = ("antidote-refusal at the ratio with the lowest probe harmful score within "
                                  "max_accuracy_drop FA points")
    fixed: ClassVar[dict] = {"score": "refusal"}
    calibration: ClassVar[Calibration] = "safe"
