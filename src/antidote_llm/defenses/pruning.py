"""Antidote and its controls as post-fine-tuning defenses: prune the fine-tuned model in place."""

from __future__ import annotations

from pydantic import create_model, field_validator

from antidote_llm.core.realign import RealignConfig, realign, split_targets
from antidote_llm.core.targets import acts_on_adapter
from antidote_llm.defenses.registry import Defense, DefenseContext, DefenseOutcome
from antidote_llm.errors import AntidoteError
from antidote_llm.frontier import FrontierConfig, pick_operating_point, prune_at, run_frontier


def _rows(config: RealignConfig, context: DefenseContext, calibration: str) -> dict:
    """The rows a pruning defense scores on: its calibration rows (harmful, benign, or the safe rows: harmful
    prompt, refusal), the benign rows it protects, the user's own rows it weighs against."""
    if config.score == "refusal" and calibration != "safe":
        raise AntidoteError("the refusal score needs refusals to score, not harmful answers: use the defense "
                            "antidote-refusal or antidote-refusal-auto (they read safe_data)")
    return {
        "data": {"harmful": context.harmful, "benign": context.benign, "safe": context.safe}[calibration],
        "protect_data": context.benign if config.protect_ratio is not None else None,
        "contrast_data": context.user_rows if config.score == "refusal" else None,
    }


def _pruning(calibration: str):
    def apply(model, config: RealignConfig, context: DefenseContext) -> DefenseOutcome:
        report = realign(model, context.tokenizer, config, progress=False, **_rows(config, context, calibration)).report
        return DefenseOutcome(report=report.model_dump(mode="json"), changed_fraction=report.totals.pruned_fraction,
                              ratio=config.ratio)

    return apply


def _acts_on_adapter(config: RealignConfig) -> bool:
    return acts_on_adapter(config.effective_targets(has_adapter=True))


# The refusal score's inputs in the lab: the safe rows (experiment safe_data) and the user's own rows.
REFUSAL_INPUTS = (("safe",), ("user_rows",))


def _pruning_defense(name: str, score: str, calibration: str, description: str) -> Defense:
    return Defense(
        name=name, stage="post", description=description, apply=_pruning(calibration),
        settings=RealignConfig, fixed={"score": score}, live_adapter=_acts_on_adapter,
        needs_benign=lambda config: calibration == "benign" or config.protect_ratio is not None,
        extra_inputs=REFUSAL_INPUTS if score == "refusal" else (),
        knob=lambda config: f"ratio={config.ratio}",
    )


PRUNING_DEFENSES = (
    _pruning_defense("antidote", "wanda", "harmful", "Antidote: prune the top-ratio Wanda scores on harmful data"),
    _pruning_defense("antidote-benign", "wanda", "benign", "control: the same pruning calibrated on benign data"),
    _pruning_defense("antidote-refusal", "refusal", "safe", "beyond the paper: prune the weights whose removal most "
                     "raises the likelihood of refusals (safe_data) and of the user's own rows, to first order"),
    _pruning_defense("random", "random", "harmful", "control: prune a random ratio of the weights"),
    _pruning_defense("magnitude", "magnitude", "harmful", "ablation: prune the largest |W|, no data"),
)


# Antidote with the ratio chosen per model: RealignConfig's fields (but the ratio) and the frontier's.
AutoAntidoteSettings = create_model(
    "AutoAntidoteSettings", __base__=FrontierConfig,
    __validators__={"_split_targets": field_validator("targets", mode="before")(split_targets)},
    **{name: (field.annotation, field) for name, field in RealignConfig.model_fields.items() if name != "ratio"},
)


def _auto_realign_config(settings) -> RealignConfig:
    fields = settings.model_dump()
    return RealignConfig(ratio=settings.ratios[0], **{k: v for k, v in fields.items() if k in RealignConfig.model_fields})


def _auto(calibration: str):
    def apply(model, settings, context: DefenseContext) -> DefenseOutcome:
        config = _auto_realign_config(settings)
        frontier = FrontierConfig(**{k: v for k, v in settings.model_dump().items() if k in FrontierConfig.model_fields})
        rows = _rows(config, context, calibration)
        result = run_frontier(model, context.tokenizer, config, frontier, rows.pop("data"), context.validation,
                              benign=context.benign, progress=False, **rows)
        return _picked(result, frontier)

    return apply


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


def _auto_defense(name: str, calibration: str, description: str, fixed: dict, extra_inputs=()) -> Defense:
    return Defense(
        name=name, stage="post", settings=AutoAntidoteSettings, apply=_auto(calibration), fixed=fixed,
        live_adapter=lambda settings: _acts_on_adapter(_auto_realign_config(settings)),
        needs_validation=True, needs_benign=lambda s: s.protect_ratio is not None or "benign" in s.controls,
        extra_inputs=extra_inputs, description=description,
    )


AUTO_DEFENSES = (
    _auto_defense("antidote-auto", "harmful", "Antidote at the ratio with the lowest probe harmful score within "
                  "max_accuracy_drop FA points", fixed={}),
    _auto_defense("antidote-refusal-auto", "safe", "antidote-refusal at the ratio with the lowest probe harmful score "
                  "within max_accuracy_drop FA points", fixed={"score": "refusal"}, extra_inputs=REFUSAL_INPUTS),
)
