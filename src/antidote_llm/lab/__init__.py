"""The lab: alignment, poisoned fine-tuning, defenses and evaluation as one cached, sweepable pipeline."""

from antidote_llm.lab.config import Experiment, expand_sweep, load_experiment
from antidote_llm.lab.runner import LabResult, run_experiment

__all__ = ["Experiment", "LabResult", "expand_sweep", "load_experiment", "run_experiment"]
