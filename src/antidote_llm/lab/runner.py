"""Run an experiment: every stage once per distinct configuration, cached under a hash of its inputs.

A stage's folder appears only when the stage has finished (it is written atomically), so a re-run
or a grown sweep reuses finished stages and an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from antidote_llm import training
from antidote_llm.data.records import pairs_sha256
from antidote_llm.defenses import DefenseContext, DefenseOutcome, defense
from antidote_llm.errors import AntidoteError
from antidote_llm.evaluation import tasks
from antidote_llm.evaluation.evaluate import METRICS_FILE, evaluate_model, write_eval
from antidote_llm.evaluation.metrics import EvalMetrics
from antidote_llm.lab.config import Experiment, expand_sweep, stage_key
from antidote_llm.lab.results import write_results
from antidote_llm.runtime.loading import ModelSource, load_base_model, load_model
from antidote_llm.runtime.outputs import atomic_dir, write_report
from antidote_llm.runtime.runinfo import MemoryMonitor, MemoryReport
from antidote_llm.training.report import TrainReport
from antidote_llm.training.sft import REPORT_FILE as TRAIN_REPORT

STAGES_DIR = "stages"
DEFENSE_FILE = "defense.json"


class DefenseRecord(BaseModel):
    """defense.json of a lab defense stage: which defense, its settings, its time and what it did."""

    method: str
    stage: str
    settings: dict | None
    defense_s: float
    outcome: DefenseOutcome
    memory: MemoryReport | None = None  # over the defense alone (the fine-tuned model already loaded)


@dataclass
class LabResult:
    out_dir: Path
    rows: list[dict]
    files: dict[str, Path] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)  # stage folders computed in this run (the rest were cached)


def _train_seconds(folder: Path) -> float:
    return TrainReport.model_validate_json((folder / TRAIN_REPORT).read_text(encoding="utf-8")).seconds


class _Setting:
    """One point of the sweep: its stages, models and evaluations."""

    def __init__(self, experiment: Experiment, values: dict, stages: Path, progress: bool, log: Callable[[str], None], ran: list[str]):
        self.exp = experiment
        self.values = values
        self.stages = stages
        self.progress = progress
        self.log = log
        self.ran = ran
        spec = experiment.model
        self.base_source = ModelSource(spec.model, dtype=spec.dtype, device=spec.device)
        self._load_data()

    def _load_data(self) -> None:
        """Every row this setting uses, loaded and checked before any model is touched."""
        exp = self.exp
        if exp.alignment is not None:
            self.align_pairs = exp.alignment.data.load("safe")
            self.align_benign = exp.alignment.benign.load() if exp.alignment.benign else None
        ft = exp.finetune
        self.task_train = tasks.load_task_pairs(ft.task, ft.task_data, "train")
        self.harmful = ft.harmful.load("unsafe")
        mix = training.mix_spec(ft.harmful_fraction, ft.samples)
        training.check_mix_counts(mix, len(self.task_train), len(self.harmful))
        poison = self.harmful.pairs[:mix.harmful_rows]  # the fine-tuning takes the leading harmful rows
        poison_indices = self.harmful.indices[:mix.harmful_rows]
        self.realign_pairs = _disjoint_rows(exp, exp.realign_data, "re-alignment", "realign_data", poison_indices, poison)
        self.benign = exp.benign_data.load(require_response=False) if exp.benign_data else None
        self.safe = exp.safe_data.load("safe") if exp.safe_data else None
        spec = exp.evaluation
        self.prompts = spec.harmful_prompts.load("unsafe", require_response=False)
        self.unalign_pairs = None
        if exp.unalign is not None:
            self.unalign_pairs = _disjoint_rows(exp, exp.unalign.data, "unalignment", "unalign.data", poison_indices, poison,
                                                taken=self.realign_pairs.pairs)
            shared = {p.prompt for p in self.unalign_pairs.pairs} & {p.prompt for p in self.prompts.pairs}
            if shared:
                raise AntidoteError(f"{len(shared)} unalignment prompts are evaluation prompts; give unalign.data other rows")
        self.task_test = tasks.load_task_pairs(ft.task, spec.task_data, "test", limit=spec.task_samples)
        self.eval_key = stage_key(spec, self.prompts.sha256, pairs_sha256(self.task_test), exp.model.template)

    def _stage_dir(self, kind: str, key: str) -> Path:
        return self.stages / f"{kind}-{key}"

    def run_stage(self, kind: str, key: str, work: Callable[[Path], None]) -> Path:
        folder = self._stage_dir(kind, key)
        if folder.is_dir():
            self.log(f"[cached] {kind} {key}")
            return folder
        self.log(f"[run] {kind} {key}")
        started = time.perf_counter()
        work(folder)
        self.ran.append(folder.name)
        self.log(f"[done] {kind} {key} in {time.perf_counter() - started:.0f}s")
        return folder

    # --- training stages ---------------------------------------------------------------------------

    def align(self) -> tuple[str, ModelSource, float | None]:
        exp = self.exp
        if exp.alignment is None:
            return stage_key("given", self.base_source.describe()), self.base_source, None
        pairs, benign = self.align_pairs, self.align_benign
        config = training.preset(exp.alignment.training.preset, "align", seed=exp.seed, template=exp.model.template,
                                 **exp.alignment.training.overrides)
        key = stage_key("align", self.base_source.describe(), pairs.sha256, benign and benign.sha256, config)

        def work(folder: Path) -> None:
            model, tokenizer = load_base_model(self.base_source)
            training.align(model, tokenizer, pairs, config, folder, benign=benign,
                           model_info=self.base_source.describe(), progress=self.progress)

        folder = self.run_stage("align", key, work)
        source = ModelSource(str(folder / "merged"), dtype=exp.model.dtype, device=exp.model.device)
        return key, source, _train_seconds(folder)

    def finetune(self, align_key: str, aligned: ModelSource) -> tuple[str, Path, float]:
        spec = self.exp.finetune
        task_pairs, harmful = self.task_train, self.harmful
        config = training.preset(spec.training.preset, "finetune", seed=self.exp.seed, template=self.exp.model.template,
                                 **spec.training.overrides)
        key = stage_key("finetune", align_key, spec.task, pairs_sha256(task_pairs), harmful.sha256,
                        spec.harmful_fraction, spec.samples, config)

        def work(folder: Path) -> None:
            loaded = load_model(aligned)
            training.finetune(loaded.model, loaded.tokenizer, task_pairs, harmful, harmful_fraction=spec.harmful_fraction,
                              n=spec.samples, config=config, out_dir=folder, seed=self.exp.seed,
                              model_info=aligned.describe(), progress=self.progress)

        folder = self.run_stage("finetune", key, work)
        return key, folder / "adapter", _train_seconds(folder)

    def unalign(self, align_key: str, aligned: ModelSource) -> tuple[str, Path]:
        """RESTA's unaligned model: a short harmful LoRA SFT of the aligned model; returns its adapter."""
        exp = self.exp
        pairs = self.unalign_pairs
        config = training.preset(exp.unalign.training.preset, "unalign", seed=exp.seed, template=exp.model.template,
                                 **exp.unalign.training.overrides)
        key = stage_key("unalign", align_key, pairs.sha256, config)

        def work(folder: Path) -> None:
            loaded = load_model(aligned)
            training.unalign(loaded.model, loaded.tokenizer, pairs, config, folder, model_info=aligned.describe(),
                             progress=self.progress)

        return key, self.run_stage("unalign", key, work) / "adapter"

    # --- evaluation ----------------------------------------------------------------------------------

    def evaluate(self, model, tokenizer):
        spec = self.exp.evaluation
        return evaluate_model(
            model, tokenizer, harmful_prompts=list(self.prompts.pairs), task=self.exp.finetune.task,
            task_pairs=self.task_test, settings=spec, template=self.exp.model.template, progress=self.progress,
        )


def _disjoint_rows(exp: Experiment, spec, role: str, key: str, poison_indices, poison_pairs, taken=()):
    """Harmful rows for `role`, never the poison rows (by index when both share a source, and by content), nor
    the rows `taken` by another role."""
    same_source = (spec.source, spec.safety) == (exp.finetune.harmful.source, exp.finetune.harmful.safety)
    pairs = spec.load("unsafe", exclude=poison_indices if same_source else ())
    overlap = set(pairs.pairs) & (set(poison_pairs) | set(taken))
    if overlap:
        others = "poison or re-alignment" if taken else "poison"
        raise AntidoteError(f"{len(overlap)} {role} rows are also {others} rows; give {key} a disjoint source or skip window")
    return pairs


def _metrics(folder: Path) -> EvalMetrics:
    return EvalMetrics.model_validate_json((folder / METRICS_FILE).read_text(encoding="utf-8"))


def _row(values: dict, stage: str, label: str, method: str | None, ratio, metrics: EvalMetrics, setting: str | None = None,
         **times) -> dict:
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
        **times,
    }


def _run_setting(setting: _Setting) -> list[dict]:
    exp = setting.exp
    align_key, aligned, align_s = setting.align()
    ft_key, adapter, finetune_s = setting.finetune(align_key, aligned)
    eval_key, realign_pairs, benign = setting.eval_key, setting.realign_pairs, setting.benign
    rows = []
    needed = {name for spec in exp.defenses.values() for options in defense(spec.method).extra_inputs for name in options}
    unalign_key, unaligned = setting.unalign(align_key, aligned) if "unaligned_model" in needed else (None, None)
    # The peers' extra inputs, and what identifies each for the stage keys.
    extras = {
        "base_model": (setting.base_source if exp.alignment is not None else None, stage_key("given", setting.base_source.describe())),
        "unaligned_model": (str(unaligned) if unaligned else None, unalign_key),
        "safe": (setting.safe, setting.safe and setting.safe.sha256),
    }

    stage_models = {"base": (setting.base_source, stage_key("given", setting.base_source.describe())), "aligned": (aligned, align_key)}
    for stage in exp.evaluate_stages:
        if stage == "aligned" and exp.alignment is None:
            continue
        source, model_key = stage_models[stage]

        def work(folder: Path, source=source) -> None:
            loaded = load_model(source)
            write_eval(setting.evaluate(loaded.model, loaded.tokenizer), folder)

        folder = setting.run_stage(f"eval-{stage}", stage_key(stage, model_key, eval_key), work)
        rows.append(_row(setting.values, stage, stage, None, None, _metrics(folder),
                         align_s=align_s if stage == "aligned" else None))

    for label, spec in exp.defenses.items():
        settings = exp.defense_settings(label)
        chosen = defense(spec.method)
        settings_dump = settings.model_dump(mode="json") if settings is not None else None
        used = {name: extras[name] for options in chosen.extra_inputs for name in options if name in extras}
        extra_keys = [[name, identity] for name, (_, identity) in sorted(used.items())]
        key = stage_key("defense", ft_key, spec.method, settings_dump, realign_pairs.sha256, benign and benign.sha256,
                        eval_key, exp.seed, *([extra_keys] if extra_keys else []))

        def work(folder: Path, chosen=chosen, settings=settings, settings_dump=settings_dump, used=used) -> None:
            # A fresh copy of the fine-tuned model for every defense: no defense sees another's changes.
            finetuned = ModelSource(aligned.model, adapters=(str(adapter),), dtype=aligned.dtype, device=aligned.device)
            loaded = load_model(finetuned, keep_adapter=chosen.live_adapter(settings))
            context = DefenseContext(loaded.tokenizer, realign_pairs, benign, **{name: value for name, (value, _) in used.items()})
            started = time.perf_counter()
            with MemoryMonitor() as memory:
                outcome = chosen.apply(loaded.model, settings, context)
            defense_s = round(time.perf_counter() - started, 2)
            result = setting.evaluate(loaded.model, loaded.tokenizer)
            with atomic_dir(folder) as tmp:
                write_eval(result, tmp / "eval")
                write_report(tmp / DEFENSE_FILE, DefenseRecord(method=chosen.name, stage=chosen.stage,
                                                              settings=settings_dump, defense_s=defense_s, outcome=outcome,
                                                              memory=memory.report()))

        folder = setting.run_stage(f"defense-{label}", key, work)
        record = DefenseRecord.model_validate_json((folder / DEFENSE_FILE).read_text(encoding="utf-8"))
        rows.append(_row(
            setting.values, "fine-tuned", label, spec.method, getattr(settings, "ratio", None),
            _metrics(folder / "eval"), setting=chosen.knob(settings),
            pruned_fraction=record.outcome.changed_fraction, defense_s=record.defense_s, finetune_s=finetune_s,
            defense_peak_rss_mb=round(record.memory.peak_rss_bytes / 2**20) if record.memory else None,
            defense_added_rss_mb=round((record.memory.peak_rss_bytes - record.memory.rss_start_bytes) / 2**20)
            if record.memory else None,
        ))
    return rows


def run_experiment(experiment: Experiment, out_dir: str | Path, *, progress: bool = True,
                   log: Callable[[str], None] = print) -> LabResult:
    """Run every setting of the sweep, then write results.csv, results.md and the plots into `out_dir`."""
    out = Path(out_dir)
    stages = out / STAGES_DIR
    stages.mkdir(parents=True, exist_ok=True)
    ran: list[str] = []
    rows = []
    settings = [_Setting(exp, values, stages, progress, log, ran) for values, exp in expand_sweep(experiment)]
    for index, setting in enumerate(settings, 1):
        if setting.values:
            log(f"setting {index}/{len(settings)}: " + ", ".join(f"{k}={v}" for k, v in setting.values.items()))
        rows += _run_setting(setting)
    files = write_results(rows, out, list(experiment.sweep), experiment.model_dump(mode="json"))
    return LabResult(out_dir=out, rows=rows, files=files, ran=ran)
