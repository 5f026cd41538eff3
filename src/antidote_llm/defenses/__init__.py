"""Defenses against harmful fine-tuning, one registry keyed by name, each declaring the stage it acts on."""

from antidote_llm.defenses.interpolate import INTERPOLATE
from antidote_llm.defenses.pruning import AUTO_DEFENSES, PRUNING_DEFENSES
from antidote_llm.defenses.registry import (
    Defense,
    DefenseContext,
    DefenseOutcome,
    DefenseStage,
    get_defense,
    registry,
)
from antidote_llm.defenses.resta import RESTA
from antidote_llm.defenses.safe_delta import SAFE_DELTA
from antidote_llm.defenses.safelora import SAFELORA
from antidote_llm.training.methods import TRAINING_METHODS, TrainingMethod

NO_DEFENSE = Defense(
    name="none", stage="post", description="no defense: the fine-tuned model as the user got it",
    apply=lambda model, settings, context: DefenseOutcome(),
)


def _trained(method: TrainingMethod) -> Defense:
    """A training-stage defense in the registry: it acts while its stage trains, so afterwards it changes nothing."""
    return Defense(
        name=method.name, stage=method.stage, description=method.description, settings=method.settings,
        apply=lambda model, settings, context: DefenseOutcome(), training=method,
        knob=lambda settings: ", ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                                        for key, value in settings.model_dump().items()),
    )


DEFENSES: dict[str, Defense] = registry(NO_DEFENSE, *map(_trained, TRAINING_METHODS.values()), *PRUNING_DEFENSES,
                                        *AUTO_DEFENSES, INTERPOLATE, SAFELORA, RESTA, SAFE_DELTA)


def defense(name: str, stage: DefenseStage | None = None) -> Defense:
    """The registered defense `name`; with `stage`, refuse one that acts at another stage."""
    return get_defense(DEFENSES, name, stage)


__all__ = ["DEFENSES", "Defense", "DefenseContext", "DefenseOutcome", "DefenseStage", "defense"]
