"""PLACEHOLDER: replaced by the real implementation."""

from antidote_llm.training.methods.base import MethodSettings, TrainingMethod, method_trainer_class


class LISASettings(MethodSettings):
    pass


LISA = TrainingMethod(name="lisa", stage="finetune", description="placeholder", settings=LISASettings,
                    presets={"paper": {}, "cpu": {}}, trainer=method_trainer_class)
