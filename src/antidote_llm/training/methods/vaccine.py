"""PLACEHOLDER: replaced by the real implementation."""

from antidote_llm.training.methods.base import MethodSettings, TrainingMethod, method_trainer_class


class VACCINESettings(MethodSettings):
    pass


VACCINE = TrainingMethod(name="vaccine", stage="align", description="placeholder", settings=VACCINESettings,
                    presets={"paper": {}, "cpu": {}}, trainer=method_trainer_class)
