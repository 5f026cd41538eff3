"""Guard as a lab defense: the decision `antidote guard` makes, on the lab's probe prompts and validation rows.
A `rejected` model is left as it was (the provider ships nothing), unless `write_best` asks for the best
candidate; the verdict is a column of the results."""

from __future__ import annotations

from typing import ClassVar

from antidote_llm.core.targets import adapter_mode
from antidote_llm.frontier.guard import GuardSettings, run_guard, split_settings
from antidote_llm.registry import Defense, DefenseContext, DefenseOutcome, register


@register
class Guard(Defense, GuardSettings):
    name: ClassVar[str] = "guard"
    description: ClassVar[str] = ("decide: safe as it is, repaired at the smallest ratio meeting the probe harmful "
                                  "score target within the accuracy budget, or rejected")

    def inputs(self) -> tuple[tuple[str, ...], ...]:
        selection, _ = split_settings(self)
        needed = [("validation",)]
        calibration = _calibration(selection)
        if calibration is not None:
            needed.append((calibration,))
        if selection.uses_user_rows:
            needed.append(("user_rows",))
        if "benign" in self.controls:
            needed.append(("benign",))
        return tuple(needed)

    def live_adapter(self) -> bool:
        return adapter_mode(self.targets, has_adapter=True)

    def knob(self) -> str | None:
        return f"HS<={self.max_harmful:g}, drop<={self.max_accuracy_drop:g}, {self.score}"

    def apply(self, model, context: DefenseContext) -> DefenseOutcome:
        selection, decision = split_settings(self)
        calibration = _calibration(selection)
        outcome = run_guard(model, context.tokenizer, selection, decision,
                            getattr(context, calibration) if calibration else None,
                            context.validation, benign=context.benign,
                            contrast_data=context.user_rows if selection.uses_user_rows else None)
        result = outcome.result
        changed = outcome.selection.report(outcome.index).totals.pruned_fraction if outcome.index is not None else 0.0
        return DefenseOutcome(report=result.model_dump(mode="json"), changed_fraction=changed,
                              ratio=result.ratio if outcome.index is not None else None, verdict=result.verdict)


def _calibration(selection) -> str | None:
    """The input the selection reads its calibration rows from: the harmful rows for Wanda; the refusals (safe) for
    the refusal score, and for an anchored re-fit of a selection that reads no rows (the random control), so the
    control keeps the same re-fit."""
    if selection.score == "wanda":
        return "harmful"
    if selection.score == "refusal" or (selection.compensate and selection.compensation_anchor):
        return "safe"
    return None
