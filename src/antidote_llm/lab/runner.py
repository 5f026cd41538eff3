"""Run an experiment: every stage once per distinct configuration, cached under a hash of its inputs.

A stage's folder appears only when the stage has finished (it is written atomically), so a re-run
or a grown sweep reuses finished stages and an interrupted run resumes where it stopped. The sweep is
planned first as a graph of stage jobs (graph.py), then an executor (executors.py) runs them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from antidote_llm import training
from antidote_llm.data.records import PairSet, pairs_sha256
from antidote_llm.defenses import DefenseContext, DefenseOutcome, defense
from antidote_llm.errors import AntidoteError
from antidote_llm.evaluation import tasks
from antidote_llm.evaluation.evaluate import METRICS_FILE, EvalInputs, write_eval
from antidote_llm.evaluation.metrics import EvalMetrics
from antidote_llm.evaluation.settings import EvalSettings
from antidote_llm.frontier import FrontierPoint
from antidote_llm.frontier.disk import PLOT_FILE, write_frontier
from antidote_llm.lab.config import Experiment, expand_sweep, stage_key
from antidote_llm.lab.executors import make_executor
from antidote_llm.lab.graph import StageJob, run_graph, stage_states
from antidote_llm.lab.results import write_results
from antidote_llm.runtime.loading import ModelSource, load_base_model, load_model
from antidote_llm.runtime.outputs import atomic_dir, write_report
from antidote_llm.runtime.runinfo import MemoryMonitor, MemoryReport
from antidote_llm.training.methods import MethodRun, training_method
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
    failed: dict[str, str] = field(default_factory=dict)  # stage folder -> its error and log path
    skipped: dict[str, str] = field(default_factory=dict)  # stage folder -> the failed stage it needed


def _train_seconds(folder: Path) -> float:
    return TrainReport.model_validate_json((folder / TRAIN_REPORT).read_text(encoding="utf-8")).seconds


class _Setting:
    """One point of the sweep: its data, loaded and checked before any model is touched."""

    def __init__(self, experiment: Experiment, values: dict, stages: Path, progress: bool):
        self.exp = experiment
        self.values = values
        self.stages = stages
        self.progress = progress
        self.defense_folders: dict[str, Path] = {}  # defense label -> its stage folder
        spec = experiment.model
        self.base_source = ModelSource(spec.model, dtype=spec.dtype, device=spec.device)
        self._load_data()

    def _load_data(self) -> None:
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
        user_rows = min(exp.user_rows, mix.task_rows)  # the fine-tune takes the leading task rows
        self.user_rows = PairSet(pairs=tuple(self.task_train[:user_rows]), source=ft.task_data or f"hub:{ft.task}",
                                 indices=tuple(range(user_rows)))
        spec = exp.evaluation
        self.prompts = spec.harmful_prompts.load("unsafe", require_response=False)
        self.unalign_pairs = None
        if exp.unalign is not None:
            self.unalign_pairs = _disjoint_rows(exp, exp.unalign.data, "unalignment", "unalign.data", poison_indices, poison,
                                                taken=self.realign_pairs.pairs)
            shared = {p.prompt for p in self.unalign_pairs.pairs} & {p.prompt for p in self.prompts.pairs}
            if shared:
                raise AntidoteError(f"{len(shared)} unalignment prompts are evaluation prompts; give unalign.data other rows")
        self.defense_rows = self._defense_rows(poison)
        self.task_test = tasks.load_task_pairs(ft.task, spec.task_data, "test", limit=spec.task_samples)
        self.test_inputs = EvalInputs(self.prompts.pairs, ft.task, self.task_test, spec, exp.model.template)
        self.validation_inputs = _validation_inputs(exp, self.prompts.pairs, self.task_test)
        self.validation_key = self.validation_inputs and stage_key(
            pairs_sha256(self.validation_inputs.prompts), pairs_sha256(self.validation_inputs.rows))
        self.eval_key = stage_key(EvalSettings.build(spec), self.prompts.sha256, pairs_sha256(self.task_test),
                                  exp.model.template)
        self.evaluation = self.test_inputs

    def _defense_rows(self, poison) -> dict[str, PairSet]:
        """The training-stage defenses' extra rows by role, refused when they share rows with the poison or the
        re-alignment rows, or prompts with the evaluation prompts."""
        exp = self.exp
        rows = {}
        for role, safety in (("harmful", "unsafe"), ("guide", "safe")):
            spec = getattr(exp.defense_data, role, None)
            if spec is None:
                continue
            rows[role] = spec.load(safety)
            mine = set(rows[role].pairs)
            prompts = {pair.prompt for pair in mine}
            for other, shared in (("poison rows (finetune.harmful)", mine & set(poison)),
                                  ("re-alignment rows (realign_data)", mine & set(self.realign_pairs.pairs)),
                                  ("evaluation prompts", prompts & {pair.prompt for pair in self.prompts.pairs})):
                if shared:
                    raise AntidoteError(f"{len(shared)} rows of defense_data.{role} are also {other}; "
                                        f"give defense_data.{role} a disjoint source or skip window")
        return rows

    def method_run(self, label: str) -> tuple[str, object, dict] | None:
        """A training-stage defense as its stage job runs it: name, settings, extra rows (None: a post defense)."""
        chosen = defense(self.exp.defenses[label].method)
        if chosen.training is None:
            return None
        return chosen.name, self.exp.defense_settings(label), {role: self.defense_rows[role]
                                                              for role in chosen.training.extra_data}

    def folder(self, kind: str, key: str) -> Path:
        return self.stages / f"{kind}-{key}"

    # --- training stages ---------------------------------------------------------------------------

    def align(self, method: tuple | None = None) -> tuple[StageJob | None, str, ModelSource]:
        """The alignment job (None: the model is aligned already), its key, and the aligned model; `method`: an
        alignment-stage defense (name, settings, extra rows)."""
        exp = self.exp
        if exp.alignment is None:
            return None, stage_key("given", self.base_source.describe()), self.base_source
        config = training.preset(exp.alignment.training.preset, "align", seed=exp.seed, template=exp.model.template,
                                 **exp.alignment.training.overrides)
        key = stage_key("align", self.base_source.describe(), self.align_pairs.sha256,
                        self.align_benign and self.align_benign.sha256, config, *_method_key(method))
        work = _AlignWork(self.base_source, self.align_pairs, self.align_benign, config, self.progress, method)
        source = ModelSource(str(self.folder("align", key) / "merged"), dtype=exp.model.dtype, device=exp.model.device)
        return StageJob("align", "align", key, work), key, source

    def finetune(self, align_key: str, aligned: ModelSource, needs: tuple[str, ...], method: tuple | None = None
                 ) -> StageJob:
        """The user's fine-tuning job; `method`: a fine-tuning-stage defense the provider runs."""
        spec = self.exp.finetune
        config = training.preset(spec.training.preset, "finetune", seed=self.exp.seed, template=self.exp.model.template,
                                 **spec.training.overrides)
        key = stage_key("finetune", align_key, spec.task, pairs_sha256(self.task_train), self.harmful.sha256,
                        spec.harmful_fraction, spec.samples, config, *_method_key(method))
        work = _FinetuneWork(aligned, self.task_train, self.harmful, spec.harmful_fraction, spec.samples, config,
                             self.exp.seed, self.progress, method)
        return StageJob("finetune", "finetune", key, work, needs)

    def unalign(self, align_key: str, aligned: ModelSource, needs: tuple[str, ...]) -> StageJob:
        """RESTA's unaligned model: a short harmful LoRA SFT of the aligned model (its adapter)."""
        exp = self.exp
        config = training.preset(exp.unalign.training.preset, "unalign", seed=exp.seed, template=exp.model.template,
                                 **exp.unalign.training.overrides)
        key = stage_key("unalign", align_key, self.unalign_pairs.sha256, config)
        return StageJob("unalign", "finetune", key, _UnalignWork(aligned, self.unalign_pairs, config, self.progress), needs)



def _method_key(method: tuple | None) -> list:
    """What identifies a training-stage defense in its stage's key (nothing for plain SFT, so old keys stay)."""
    if method is None:
        return []
    name, settings, extra = method
    return [[name, settings.model_dump(mode="json"), {role: rows.sha256 for role, rows in sorted(extra.items())}]]


def _method_run(method: tuple | None) -> MethodRun | None:
    if method is None:
        return None
    name, settings, extra = method
    return MethodRun(method=training_method(name), settings=settings, extra=extra)


# --- stage work: picklable, so that a stage can run in another process or on another machine ----------------


def _validation_inputs(exp: Experiment, test_prompts, test_rows) -> EvalInputs | None:
    """Probe prompts and validation rows for defenses that choose per model; never the evaluation's rows."""
    spec = exp.evaluation
    wanted = any(defense(d.method).needs_validation for d in exp.defenses.values())
    if not wanted or spec.probe_prompts is None or spec.validation_data is None:
        return None
    prompts = spec.probe_prompts.load("unsafe", require_response=False).pairs
    rows = tasks.load_task_pairs(exp.finetune.task, spec.validation_data, "train", limit=spec.validation_samples,
                                 skip=spec.validation_skip)
    shared_prompts = {p.prompt for p in prompts} & {p.prompt for p in test_prompts}
    shared_rows = set(rows) & set(test_rows)
    if shared_prompts or shared_rows:
        raise AntidoteError(
            f"{len(shared_prompts)} probe prompts and {len(shared_rows)} validation rows are also evaluation rows; "
            "give evaluation.probe_prompts and evaluation.validation_data disjoint sources or skip windows"
        )
    return EvalInputs(prompts, exp.finetune.task, rows, spec, exp.model.template)


@dataclass(frozen=True)
class _AlignWork:
    base: ModelSource
    pairs: PairSet
    benign: PairSet | None
    config: object
    progress: bool
    method: tuple | None = None  # an alignment-stage defense: name (looked up where the stage runs), settings, rows

    def __call__(self, folder: Path) -> None:
        model, tokenizer = load_base_model(self.base)
        training.align(model, tokenizer, self.pairs, self.config, folder, benign=self.benign,
                       method=_method_run(self.method), model_info=self.base.describe(), progress=self.progress)


@dataclass(frozen=True)
class _FinetuneWork:
    aligned: ModelSource
    task_pairs: tuple
    harmful: PairSet
    harmful_fraction: float
    samples: int
    config: object
    seed: int
    progress: bool
    method: tuple | None = None  # a fine-tuning-stage defense: name, settings, extra rows

    def __call__(self, folder: Path) -> None:
        loaded = load_model(self.aligned)
        training.finetune(loaded.model, loaded.tokenizer, self.task_pairs, self.harmful,
                          harmful_fraction=self.harmful_fraction, n=self.samples, config=self.config, out_dir=folder,
                          seed=self.seed, method=_method_run(self.method), model_info=self.aligned.describe(),
                          progress=self.progress)


@dataclass(frozen=True)
class _UnalignWork:
    aligned: ModelSource
    pairs: PairSet
    config: object
    progress: bool

    def __call__(self, folder: Path) -> None:
        loaded = load_model(self.aligned)
        training.unalign(loaded.model, loaded.tokenizer, self.pairs, self.config, folder,
                         model_info=self.aligned.describe(), progress=self.progress)


@dataclass(frozen=True)
class _EvalWork:
    source: ModelSource
    evaluation: EvalInputs
    progress: bool

    def __call__(self, folder: Path) -> None:
        loaded = load_model(self.source)
        write_eval(self.evaluation.run(loaded.model, loaded.tokenizer, progress=self.progress), folder)


@dataclass(frozen=True)
class _DefenseWork:
    finetuned: ModelSource
    method: str  # looked up in the registry where the stage runs
    settings: BaseModel | None
    realign_pairs: PairSet
    benign: PairSet | None
    evaluation: EvalInputs
    validation: EvalInputs | None
    progress: bool
    extras: dict  # the extra inputs (DefenseContext fields: base_model, unaligned_model, safe, user_rows)

    def __call__(self, folder: Path) -> None:
        chosen = defense(self.method)
        # A fresh copy of the fine-tuned model for every defense: no defense sees another's changes.
        loaded = load_model(self.finetuned, keep_adapter=chosen.live_adapter(self.settings))
        context = DefenseContext(loaded.tokenizer, self.realign_pairs, self.benign, validation=self.validation,
                                 **self.extras)
        started = time.perf_counter()
        with MemoryMonitor() as memory:
            outcome = chosen.apply(loaded.model, self.settings, context)
        defense_s = round(time.perf_counter() - started, 2)
        result = self.evaluation.run(loaded.model, loaded.tokenizer, progress=self.progress)
        settings_dump = self.settings.model_dump(mode="json") if self.settings is not None else None
        with atomic_dir(folder) as tmp:
            write_eval(result, tmp / "eval")
            write_report(tmp / DEFENSE_FILE, DefenseRecord(method=chosen.name, stage=chosen.stage,
                                                          settings=settings_dump, defense_s=defense_s, outcome=outcome,
                                                          memory=memory.report()))
            if outcome.report and outcome.report.get("points"):  # a defense that walked a frontier draws it
                write_frontier(tmp, [FrontierPoint(**p) for p in outcome.report["points"]], outcome.ratio)


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


@dataclass
class _Row:
    """A table row, read from its stage folders once the graph has run (skipped when one of them is missing)."""

    needs: tuple[str, ...]
    read: Callable[[], dict]


def _plan_setting(setting: _Setting, jobs: dict[str, StageJob]) -> list[_Row]:
    """Add the setting's stage jobs to `jobs` (a stage two settings share is one job) and return its rows."""
    exp = setting.exp
    align_job, align_key, aligned = setting.align()
    align_needs = (align_job.name,) if align_job else ()
    finetune_job = setting.finetune(align_key, aligned, align_needs)
    for job in (align_job, finetune_job):
        if job is not None:
            jobs.setdefault(job.name, job)

    def align_s():
        return _train_seconds(setting.stages / align_job.name) if align_job else None

    rows = []
    stage_models = {"base": (setting.base_source, stage_key("given", setting.base_source.describe()), ()),
                    "aligned": (aligned, align_key, align_needs)}
    for stage in exp.evaluate_stages:
        if stage == "aligned" and exp.alignment is None:
            continue
        source, model_key, needs = stage_models[stage]
        job = StageJob(f"eval-{stage}", "eval", stage_key(stage, model_key, setting.eval_key),
                       _EvalWork(source, setting.evaluation, setting.progress), needs)
        jobs.setdefault(job.name, job)

        def eval_row(stage=stage, folder=setting.stages / job.name):
            return _row(setting.values, stage, stage, None, None, _metrics(folder),
                        align_s=align_s() if stage == "aligned" else None)

        rows.append(_Row((job.name, *needs), eval_row))

    finetuned = ModelSource(aligned.model, adapters=(str(setting.stages / finetune_job.name / "adapter"),),
                            dtype=aligned.dtype, device=aligned.device)
    realign_pairs, benign = setting.realign_pairs, setting.benign
    needed = {name for spec in exp.defenses.values() for options in defense(spec.method).extra_inputs for name in options}
    unalign_job = setting.unalign(align_key, aligned, align_needs) if "unaligned_model" in needed else None
    if unalign_job is not None:
        jobs.setdefault(unalign_job.name, unalign_job)
    # The peers' extra inputs, and what identifies each for the stage keys.
    extras = {
        "base_model": (setting.base_source if exp.alignment is not None else None,
                       stage_key("given", setting.base_source.describe())),
        "unaligned_model": (str(setting.stages / unalign_job.name / "adapter") if unalign_job else None,
                            unalign_job and unalign_job.key),
        "safe": (setting.safe, setting.safe and setting.safe.sha256),
        "user_rows": (setting.user_rows, setting.user_rows.sha256),
    }
    for label, spec in exp.defenses.items():
        settings = exp.defense_settings(label)
        settings_dump = settings.model_dump(mode="json") if settings is not None else None
        chosen = defense(spec.method)
        needs_validation = chosen.needs_validation
        own_align, own_finetune, own_finetuned = (_defended_chain(setting, label, jobs) if chosen.training
                                                   else (align_job, finetune_job, finetuned))
        used = {name: extras[name] for options in chosen.extra_inputs for name in options if name in extras}
        extra_keys = [[name, identity] for name, (_, identity) in sorted(used.items())]
        key = stage_key("defense", own_finetune.key, spec.method, settings_dump, realign_pairs.sha256,
                        benign and benign.sha256, setting.eval_key, exp.seed,
                        setting.validation_key if needs_validation else None, *([extra_keys] if extra_keys else []))
        work = _DefenseWork(own_finetuned, spec.method, settings, realign_pairs, benign, setting.evaluation,
                            setting.validation_inputs if needs_validation else None, setting.progress,
                            {name: value for name, (value, _) in used.items()})
        defense_needs = (own_finetune.name, *([unalign_job.name] if unalign_job and "unaligned_model" in used else []))
        job = StageJob(f"defense-{label}", "defense", key, work, defense_needs)
        jobs.setdefault(job.name, job)
        setting.defense_folders[label] = setting.stages / job.name

        def defense_row(folder=setting.stages / job.name, label=label, spec=spec, chosen=chosen, settings=settings,
                        finetune_folder=setting.stages / own_finetune.name, own_align=own_align):
            record = DefenseRecord.model_validate_json((folder / DEFENSE_FILE).read_text(encoding="utf-8"))
            memory = record.memory
            trained_align = chosen.stage == "align" and own_align is not None
            return _row(
                setting.values, "fine-tuned", label, spec.method, record.outcome.ratio, _metrics(folder / "eval"),
                setting=chosen.knob(settings) or (f"ratio={record.outcome.ratio:g}" if record.outcome.ratio else None),
                pruned_fraction=record.outcome.changed_fraction,
                defense_s=record.defense_s, finetune_s=_train_seconds(finetune_folder),
                align_s=_train_seconds(setting.stages / own_align.name) if trained_align else None,
                defense_peak_rss_mb=round(memory.peak_rss_bytes / 2**20) if memory else None,
                defense_added_rss_mb=round((memory.peak_rss_bytes - memory.rss_start_bytes) / 2**20) if memory else None,
            )

        rows.append(_Row((job.name, *defense_needs), defense_row))
    return rows


def _defended_chain(setting: _Setting, label: str, jobs: dict[str, StageJob]):
    """(align job, finetune job, fine-tuned model) of a training-stage defense: its own alignment followed by the
    user's plain fine-tuning (align stage), or the shared alignment followed by its fine-tuning (finetune stage)."""
    method = setting.method_run(label)
    stage = defense(method[0]).stage
    align_job, align_key, aligned = setting.align(method if stage == "align" else None)
    align_needs = (align_job.name,) if align_job else ()
    finetune_job = setting.finetune(align_key, aligned, align_needs, method if stage == "finetune" else None)
    for job in (align_job, finetune_job):
        if job is not None:
            jobs.setdefault(job.name, job)
    finetuned = ModelSource(aligned.model, adapters=(str(setting.stages / finetune_job.name / "adapter"),),
                            dtype=aligned.dtype, device=aligned.device)
    return align_job, finetune_job, finetuned


@dataclass
class _Plan:
    settings: list[_Setting]
    jobs: list[StageJob]
    rows: list[_Row]


def plan_experiment(experiment: Experiment, out_dir: str | Path, *, progress: bool = True) -> _Plan:
    """Every setting's data loaded and checked, and the stage graph of the whole sweep; nothing runs."""
    stages = Path(out_dir).resolve() / STAGES_DIR
    settings = [_Setting(exp, values, stages, progress) for values, exp in expand_sweep(experiment)]
    jobs: dict[str, StageJob] = {}
    rows = [row for setting in settings for row in _plan_setting(setting, jobs)]
    return _Plan(settings, list(jobs.values()), rows)


def run_experiment(experiment: Experiment, out_dir: str | Path, *, progress: bool = True,
                   log: Callable[[str], None] = print, executor: str = "local", max_parallel: int = 1) -> LabResult:
    """Run every stage of the sweep not finished yet, then write results.csv, results.md and the plots into `out_dir`.

    `executor`: local (this process), processes (one process per stage) or slurm (one job per stage); a failing
    stage is reported in LabResult.failed, the stages that need it are skipped, and the rest run.
    """
    if max_parallel < 1:
        raise AntidoteError(f"--max-parallel must be at least 1, got {max_parallel}")
    out = Path(out_dir).resolve()
    runner = make_executor(executor, out, experiment.cluster, max_parallel=max_parallel)
    plan = plan_experiment(experiment, out, progress=progress)
    for index, setting in enumerate(plan.settings, 1):
        if setting.values:
            log(f"setting {index}/{len(plan.settings)}: " + ", ".join(f"{k}={v}" for k, v in setting.values.items()))
    graph = run_graph(plan.jobs, out / STAGES_DIR, runner, max_parallel=max_parallel, log=log)
    lost = set(graph.failed) | set(graph.skipped)
    rows = [row.read() for row in plan.rows if lost.isdisjoint(row.needs)]
    files = write_results(rows, out, list(experiment.sweep), experiment.model_dump(mode="json", exclude={"cluster"}))
    for index, setting in enumerate(plan.settings):
        for label, folder in setting.defense_folders.items():
            if (folder / PLOT_FILE).is_file():
                files[f"frontier-{label}" + (f"-{index + 1}" if len(plan.settings) > 1 else "")] = folder / PLOT_FILE
    return LabResult(out_dir=out, rows=rows, files=files, ran=graph.ran, failed=graph.failed, skipped=graph.skipped)


def experiment_status(experiment: Experiment, out_dir: str | Path) -> list[tuple[StageJob, str, str]]:
    """(stage job, done | running | failed | pending, detail) for every stage of the experiment."""
    plan = plan_experiment(experiment, out_dir, progress=False)
    return stage_states(plan.jobs, Path(out_dir).resolve() / STAGES_DIR)
