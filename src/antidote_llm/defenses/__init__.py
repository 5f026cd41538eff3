"""Defenses against harmful fine-tuning, one registry keyed by name (antidote_llm.registry), each declaring
the stage it acts on. Importing this package registers every defense: the training-stage methods, every
module of this package, and third-party defenses declared under the entry-point group `antidote_llm.defenses`."""

import importlib
import pkgutil
from importlib.metadata import entry_points

import antidote_llm.training.methods  # noqa: F401 - registers the training-stage defenses
from antidote_llm.registry import DEFENSES, Defense, DefenseStage, defense_class

ENTRY_POINT_GROUP = "antidote_llm.defenses"


def defense(name: str, stage: DefenseStage | None = None) -> type[Defense]:
    """The registered defense class `name`; with `stage`, refuse one that acts at another stage."""
    return defense_class(name, stage)


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
for _entry in entry_points(group=ENTRY_POINT_GROUP):
    _entry.load()



__all__ = ["DEFENSES", "defense"]
