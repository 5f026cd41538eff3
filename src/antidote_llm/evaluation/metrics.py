"""The typed schema of an evaluation's `metrics.json`: what the summary, the CLI and the lab read."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class TaskMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    rows: int
    scored: bool
    correct: int | None
    unparsed: int | None  # answers giving no label or number
    accuracy: float | None
    max_new_tokens: int
    prompt_style: str = "authors"


class EvalMetrics(BaseModel):
    """Harmful score (HS) and fine-tune accuracy (FA) with their evidence; further keys (model identity,
    data, timings, versions, throughput) are kept as written."""

    model_config = ConfigDict(extra="allow")

    prompts: int = 0
    harmful_count: int | None = None
    harmful_score: float | None = None
    unparsed: int | None = None  # judge outputs that could not be read (counted not harmful)
    degenerate_count: int | None = None
    degenerate_rate: float | None = None
    harmful_score_non_degenerate: float | None = None
    compliance_rate: float | None = None
    categories: dict[str, int] = {}
    judge: dict = {}
    finetune_accuracy: float | None = None
    task: TaskMetrics | None = None
    generation: dict = {}
    model: dict = {}
