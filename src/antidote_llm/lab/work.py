"""The stage work of the lab: picklable, so a stage can run in this process, another process or a cluster job.
Each work object carries everything its stage needs, the defense object included (never a name to look up)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from antidote_llm import training
from antidote_llm.data.records import PairSet
from antidote_llm.evaluation.evaluate import EvalInputs, write_eval
from antidote_llm.frontier import FrontierPoint
from antidote_llm.frontier.disk import write_frontier
from antidote_llm.registry import Defense, DefenseContext, DefenseOutcome
from antidote_llm.runtime.loading import ModelSource, load_model
from antidote_llm.runtime.outputs import atomic_dir, write_report
from antidote_llm.runtime.runinfo import MemoryMonitor, MemoryReport
from antidote_llm.training.methods import MethodRun

DEFENSE_FILE = "defense.json"


class DefenseRecord(BaseModel):
    """defense.json of a lab defense stage: which defense, its settings, its time and what it did."""

    method: str
    stage: str
    settings: dict | None
    defense_s: float
    outcome: DefenseOutcome
    memory: MemoryReport | None = None  # over the defense alone (the fine-tuned model already loaded)


@dataclass(frozen=True)
class AlignWork:
    """Safety alignment of the base model (`antidote align`, and the lab's align stage)."""

    base: ModelSource
    pairs: PairSet
    benign: PairSet | None
    config: training.TrainConfig
    progress: bool = True
    method: MethodRun | None = None  # an alignment-stage defense
    report_to: tuple[str, ...] = ()  # trackers of the loss curves (never part of the stage's key)

    def __call__(self, folder: Path) -> training.TrainResult:
        loaded = load_model(self.base)
        return training.align(loaded.model, loaded.tokenizer, self.pairs, self.config, folder, benign=self.benign,
                              method=self.method, model_info=self.base.describe(), progress=self.progress,
                              report_to=self.report_to)


@dataclass(frozen=True)
class FinetuneWork:
    """The user's fine-tuning on the aligned model (`antidote finetune`, and the lab's finetune stage)."""

    aligned: ModelSource
    task_pairs: tuple
    harmful: PairSet | None
    harmful_fraction: float
    samples: int
    config: training.TrainConfig
    progress: bool = True
    method: MethodRun | None = None  # a fine-tuning-stage defense the provider runs
    report_to: tuple[str, ...] = ()

    def __call__(self, folder: Path) -> training.FinetuneResult:
        loaded = load_model(self.aligned)
        return training.finetune(loaded.model, loaded.tokenizer, self.task_pairs, self.harmful,
                                 harmful_fraction=self.harmful_fraction, n=self.samples, config=self.config,
                                 out_dir=folder, method=self.method, model_info=self.aligned.describe(),
                                 progress=self.progress, report_to=self.report_to)


@dataclass(frozen=True)
class UnalignWork:
    """RESTA's unaligned model: a short harmful LoRA SFT of the aligned model."""

    aligned: ModelSource
    pairs: PairSet
    config: training.TrainConfig
    progress: bool = True
    report_to: tuple[str, ...] = ()

    def __call__(self, folder: Path) -> training.TrainResult:
        loaded = load_model(self.aligned)
        return training.unalign(loaded.model, loaded.tokenizer, self.pairs, self.config, folder,
                                model_info=self.aligned.describe(), progress=self.progress, report_to=self.report_to)


@dataclass(frozen=True)
class EvalWork:
    source: ModelSource
    evaluation: EvalInputs
    progress: bool

    def __call__(self, folder: Path) -> None:
        loaded = load_model(self.source)
        write_eval(self.evaluation.run(loaded.model, loaded.tokenizer, progress=self.progress), folder)


@dataclass(frozen=True)
class DefenseWork:
    """A post-fine-tuning defense on a fresh copy of the fine-tuned model, then its evaluation."""

    finetuned: ModelSource
    defense: Defense
    evaluation: EvalInputs
    progress: bool
    inputs: dict = field(default_factory=dict)  # the defense's inputs by name (DefenseContext)

    def __call__(self, folder: Path) -> None:
        chosen = self.defense
        # A fresh copy of the fine-tuned model for every defense: no defense sees another's changes.
        loaded = load_model(self.finetuned, keep_adapter=chosen.live_adapter())
        context = DefenseContext(loaded.tokenizer, **self.inputs)
        started = time.perf_counter()
        with MemoryMonitor() as memory:
            outcome = chosen.apply(loaded.model, context)
        defense_s = round(time.perf_counter() - started, 2)
        result = self.evaluation.run(loaded.model, loaded.tokenizer, progress=self.progress)
        with atomic_dir(folder, replace=True) as tmp:  # the stage's lock makes this run its only writer
            write_eval(result, tmp / "eval")
            write_report(tmp / DEFENSE_FILE, DefenseRecord(method=chosen.name, stage=chosen.stage,
                                                          settings=chosen.settings() or None, defense_s=defense_s,
                                                          outcome=outcome, memory=memory.report()))
            if outcome.report and outcome.report.get("points"):  # a defense that walked a frontier draws it
                write_frontier(tmp, [FrontierPoint(**p) for p in outcome.report["points"]], outcome.ratio)
