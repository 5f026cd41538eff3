"""The results table: one row per evaluated model, read from its stage folders once the graph has run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from antidote_llm.evaluation.evaluate import METRICS_FILE
from antidote_llm.evaluation.intervals import wilson
from antidote_llm.evaluation.metrics import EvalMetrics
from antidote_llm.lab.work import DEFENSE_FILE, DefenseRecord
from antidote_llm.registry import Defense
from antidote_llm.training.report import TrainReport
from antidote_llm.training.sft import REPORT_FILE as TRAIN_REPORT


@dataclass
class Row:
    """A table row, read from its stage folders once the graph has run (skipped when one of them is missing)."""

    needs: tuple[str, ...]
    read: Callable[[], dict]


def train_seconds(folder: Path) -> float:
    return TrainReport.model_validate_json((folder / TRAIN_REPORT).read_text(encoding="utf-8")).seconds


def _metrics(folder: Path) -> EvalMetrics:
    return EvalMetrics.model_validate_json((folder / METRICS_FILE).read_text(encoding="utf-8"))


def _bounds(count: int | None, total: int | None) -> tuple[float | None, float | None]:
    if count is None or not total:
        return None, None
    interval = wilson(count, total)
    return round(interval.low, 2), round(interval.high, 2)


def _row(values: dict, stage: str, label: str, method: str | None, ratio, metrics: EvalMetrics, setting: str | None = None,
         **times) -> dict:
    harmful_low, harmful_high = _bounds(metrics.harmful_count, metrics.prompts)
    task = metrics.task
    accuracy_low, accuracy_high = _bounds(task.correct, task.rows) if task is not None else (None, None)
    return {
        **values,
        "stage": stage,
        "defense": label,
        "method": method,
        "ratio": ratio,
        "setting": setting,
        "harmful_score": metrics.harmful_score,
        "degenerate_rate": metrics.degenerate_rate,
        "compliance_rate": metrics.compliance_rate,
        "finetune_accuracy": metrics.finetune_accuracy,
        "harmful_low": harmful_low, "harmful_high": harmful_high,  # 95% intervals (Wilson)
        "finetune_low": accuracy_low, "finetune_high": accuracy_high,
        "harmful_by_category": {name: rate.model_dump() for name, rate in metrics.harmful_by_category.items()},
        **times,
    }


def eval_row(values: dict, stage: str, folder: Path, align_folder: Path | None) -> Callable[[], dict]:
    """The row of the base or aligned model (with the alignment's time)."""
    return lambda: _row(values, stage, stage, None, None, _metrics(folder),
                        align_s=train_seconds(align_folder) if align_folder else None)


def defense_row(values: dict, label: str, chosen: Defense, folder: Path, finetune_folder: Path,
                align_folder: Path | None) -> Callable[[], dict]:
    """The row of a defended model: its metrics, what it changed, its time and memory."""

    def read() -> dict:
        record = DefenseRecord.model_validate_json((folder / DEFENSE_FILE).read_text(encoding="utf-8"))
        memory, ratio = record.memory, record.outcome.ratio
        return _row(
            values, "fine-tuned", label, chosen.name, ratio, _metrics(folder / "eval"),
            setting=chosen.knob() or (f"ratio={ratio:g}" if ratio else None), verdict=record.outcome.verdict,
            verdict_reason=(record.outcome.report or {}).get("reason") if record.outcome.verdict else None,
            pruned_fraction=record.outcome.changed_fraction,
            defense_s=record.defense_s, finetune_s=train_seconds(finetune_folder),
            align_s=train_seconds(align_folder) if align_folder else None,
            defense_peak_rss_mb=round(memory.peak_rss_bytes / 2**20) if memory else None,
            defense_added_rss_mb=round((memory.peak_rss_bytes - memory.rss_start_bytes) / 2**20) if memory else None,
        )

    return read
