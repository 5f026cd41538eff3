"""PLACEHOLDER: replaced by the real implementation."""

from antidote_llm.training.methods.base import MethodSettings, TrainingMethod, method_trainer_class


class BOOSTERSettings(MethodSettings):
    pass


BOOSTER = TrainingMethod(name="booster", stage="align", description="placeholder", settings=BOOSTERSettings,
                    presets={"paper": {}, "cpu": {}}, trainer=method_trainer_class)
