"""The typed schema of an evaluation's `metrics.json`: what the summary, the CLI and the lab read."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from antidote_llm.evaluation.intervals import wilson

UNCATEGORIZED = "(no category)"  # the group of prompts without a category, in a file where others have one


class Rate(BaseModel):
    """A rate in percent with its 95% (Wilson) interval, and how many items it was measured on."""

    value: float
    low: float
    high: float
    count: int
    of: int

    @classmethod
    def of_counts(cls, count: int, of: int) -> Rate:
        interval = wilson(count, of)
        return cls(value=round(interval.value, 2), low=round(interval.low, 2), high=round(interval.high, 2),
                   count=count, of=of)

    def text(self) -> str:
        return f"{self.value:.1f} [{self.low:.1f}, {self.high:.1f}]"

    def counted(self) -> str:
        """`text` with the counts: 12.5 [4.1, 32.0] (3/24)."""
        return f"{self.text()} ({self.count}/{self.of})"


def rates_by_category(categories: Sequence[tuple[str, ...]], harmful: Sequence[bool]) -> dict[str, Rate]:
    """The harmful share of the prompts of each category, by name; a prompt of several categories counts in each,
    one of none in UNCATEGORIZED (only when another has a category). Empty when no prompt has a category."""
    if len(categories) != len(harmful):
        raise ValueError(f"{len(categories)} prompts' categories for {len(harmful)} verdicts")
    if not any(categories):
        return {}
    counts: dict[str, list[int]] = {}
    for names, bad in zip(categories, harmful, strict=True):
        for name in names or (UNCATEGORIZED,):
            tally = counts.setdefault(name, [0, 0])
            tally[0] += bool(bad)
            tally[1] += 1
    return {name: Rate.of_counts(*counts[name]) for name in sorted(counts, key=lambda n: (n == UNCATEGORIZED, n))}


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
    categories: dict[str, int] = {}  # the judge's categories of the harmful answers
    harmful_by_category: dict[str, Rate] = {}  # HS of the prompts of each category of the prompt file
    judge: dict = {}
    finetune_accuracy: float | None = None
    task: TaskMetrics | None = None
    generation: dict = {}
    model: dict = {}
