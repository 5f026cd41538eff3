"""Antidote and its controls as post-fine-tuning defenses: prune the fine-tuned model in place."""

from __future__ import annotations

from antidote_llm.core.realign import RealignConfig, realign
from antidote_llm.defenses.registry import Defense, DefenseContext, DefenseOutcome


def _pruning(calibration: str):
    def apply(model, config: RealignConfig, context: DefenseContext) -> DefenseOutcome:
        data = context.benign if calibration == "benign" else context.harmful
        protect = context.benign if config.protect_ratio is not None else None
        report = realign(model, context.tokenizer, config, data, protect_data=protect, progress=False).report
        return DefenseOutcome(report=report.model_dump(mode="json"), changed_fraction=report.totals.pruned_fraction)

    return apply


def _acts_on_adapter(config: RealignConfig) -> bool:
    return config.effective_targets(has_adapter=True) == ("adapter",)


def _pruning_defense(name: str, score: str, calibration: str, description: str) -> Defense:
    return Defense(
        name=name, stage="post", description=description, apply=_pruning(calibration),
        settings=RealignConfig, fixed={"score": score}, live_adapter=_acts_on_adapter,
        needs_benign=lambda config: calibration == "benign" or config.protect_ratio is not None,
        knob=lambda config: f"ratio={config.ratio}",
    )


PRUNING_DEFENSES = (
    _pruning_defense("antidote", "wanda", "harmful", "Antidote: prune the top-ratio Wanda scores on harmful data"),
    _pruning_defense("antidote-benign", "wanda", "benign", "control: the same pruning calibrated on benign data"),
    _pruning_defense("random", "random", "harmful", "control: prune a random ratio of the weights"),
    _pruning_defense("magnitude", "magnitude", "harmful", "ablation: prune the largest |W|, no data"),
)
