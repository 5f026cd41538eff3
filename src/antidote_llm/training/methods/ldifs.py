"""PLACEHOLDER: replaced by the real implementation."""

from antidote_llm.training.methods.base import MethodSettings, TrainingMethod, method_trainer_class


class LDIFSSettings(MethodSettings):
    pass


LDIFS = TrainingMethod(name="ldifs", stage="finetune", description="placeholder", settings=LDIFSSettings,
                    presets={"paper": {}, "cpu": {}}, trainer=method_trainer_class)
