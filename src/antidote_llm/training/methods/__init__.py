"""The training-stage defenses, one registry keyed by name: Vaccine, RepNoise, Booster (alignment stage),
Lisa, LDIFS (the user's fine-tuning). Each is a Trainer subclass; see base.py for what a method declares."""

from antidote_llm.errors import AntidoteError
from antidote_llm.training.methods.base import (
    EXTRA_ROLES,
    MethodRun,
    MethodSettings,
    MethodStage,
    TrainingMethod,
)
from antidote_llm.training.methods.booster import BOOSTER
from antidote_llm.training.methods.ldifs import LDIFS
from antidote_llm.training.methods.lisa import LISA
from antidote_llm.training.methods.repnoise import REPNOISE
from antidote_llm.training.methods.vaccine import VACCINE

TRAINING_METHODS: dict[str, TrainingMethod] = {m.name: m for m in (VACCINE, REPNOISE, BOOSTER, LISA, LDIFS)}


def training_method(name: str, stage: MethodStage | None = None) -> TrainingMethod:
    """The registered method `name`; with `stage`, refuse one that acts at another stage."""
    method = TRAINING_METHODS.get(name)
    if method is None:
        raise AntidoteError(f"unknown defense {name!r}; choose one of {', '.join(TRAINING_METHODS)}")
    if stage is not None and method.stage != stage:
        here = [n for n, m in TRAINING_METHODS.items() if m.stage == stage]
        raise AntidoteError(f"defense {name!r} acts at the {method.stage} stage, not {stage}; "
                            f"{stage} defenses: {', '.join(here)}")
    return method


__all__ = ["EXTRA_ROLES", "TRAINING_METHODS", "MethodRun", "MethodSettings", "TrainingMethod", "training_method"]
