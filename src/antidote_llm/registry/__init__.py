"""The defense registry and the table of defense inputs: the layer every defense, the lab and the CLI share."""

from antidote_llm.registry.defense import (
    DEFENSES,
    Defense,
    DefenseContext,
    DefenseOutcome,
    DefenseStage,
    TrainingDefense,
    defense_class,
    register,
)
from antidote_llm.registry.inputs import INPUTS, DefenseInput, input_spec, register_input

__all__ = ["DEFENSES", "INPUTS", "Defense", "DefenseContext", "DefenseInput", "DefenseOutcome", "DefenseStage",
           "TrainingDefense", "defense_class", "input_spec", "register", "register_input"]
