"""The typed schema of a training stage's `report.json` (align, finetune)."""

from __future__ import annotations

from pydantic import BaseModel

from antidote_llm.runtime.runinfo import MemoryReport
from antidote_llm.training.config import TrainConfig


class TrainFacts(BaseModel):
    rows: int
    dropped_no_answer: int  # rows whose prompt filled max_length
    tokens: int
    answer_tokens: int
    steps: int
    train_loss: float
    loss_history: list[dict]


class TrainReport(BaseModel):
    stage: str
    model: dict | None
    config: TrainConfig
    data: dict
    train: TrainFacts
    outputs: dict
    timings: dict[str, float]
    memory: MemoryReport
    versions: dict[str, str]
    defense: dict | None = None  # the training-stage defense: name, settings, its extra rows

    @property
    def seconds(self) -> float:
        return round(sum(self.timings.values()), 2)
