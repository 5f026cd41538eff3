"""PLACEHOLDER: replaced by the real implementation."""

from antidote_llm.training.methods.base import MethodSettings, TrainingMethod, method_trainer_class


class REPNOISESettings(MethodSettings):
    pass


REPNOISE = TrainingMethod(name="repnoise", stage="align", description="placeholder", settings=REPNOISESettings,
                    presets={"paper": {}, "cpu": {}}, trainer=method_trainer_class)
