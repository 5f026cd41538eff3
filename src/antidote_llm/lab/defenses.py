"""Defenses the lab compares, applied in memory to the fine-tuned model. A registry, not a switch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..engine import RealignConfig, realign
from ..records import PairSet
from .config import DefenseSpec


@dataclass(frozen=True)
class DefenseContext:
    tokenizer: object
    template: str
    seed: int
    harmful: PairSet  # re-alignment rows, disjoint from the poison rows
    benign: PairSet | None


@dataclass(frozen=True)
class Defense:
    """`apply(model, spec, context)` changes the model in place and returns its report (or None)."""

    apply: Callable[[object, DefenseSpec, DefenseContext], dict | None]
    description: str
    needs_ratio: bool = True
    needs_benign: bool = False


def _realign_config(spec: DefenseSpec, context: DefenseContext, score: str) -> RealignConfig:
    return RealignConfig(
        ratio=spec.ratio, score=score, granularity=spec.granularity, targets=spec.targets, tokens=spec.tokens,
        template=context.template, max_length=spec.max_length, batch_size=spec.batch_size, seed=context.seed,
        protect_ratio=spec.protect_ratio,
    )


def _pruning(score: str, calibration: str) -> Callable:
    def apply(model, spec: DefenseSpec, context: DefenseContext) -> dict:
        data = context.benign if calibration == "benign" else context.harmful
        protect = context.benign if spec.protect_ratio is not None else None
        result = realign(model, context.tokenizer, _realign_config(spec, context, score), data,
                         protect_data=protect, progress=False)
        return result.report

    return apply


DEFENSES: dict[str, Defense] = {
    "none": Defense(lambda model, spec, context: None, "no defense: the fine-tuned model as the user got it", needs_ratio=False),
    "antidote": Defense(_pruning("wanda", "harmful"), "Antidote: prune the top-ratio Wanda scores on harmful data"),
    "antidote-benign": Defense(_pruning("wanda", "benign"), "control: the same pruning calibrated on benign data", needs_benign=True),
    "random": Defense(_pruning("random", "harmful"), "control: prune a random ratio of the weights"),
    "magnitude": Defense(_pruning("magnitude", "harmful"), "ablation: prune the largest |W|, no data"),
}
