"""The training-stage defenses: Vaccine, RepNoise, Booster (alignment stage), Lisa, LDIFS (the user's
fine-tuning). Each is a TrainingDefense registered by name with a Trainer subclass; see base.py. Every module
of this package is imported here, so a new method file registers itself."""

import importlib
import pkgutil

from antidote_llm.training.methods.base import MethodRun

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["MethodRun"]
