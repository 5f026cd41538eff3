"""Planning a sweep: every stage of every setting as a job of the stage graph, keyed by a hash of its inputs (a
stage two settings share is one job), and the table rows to read once the graph has run. Nothing runs here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from antidote_llm import training
from antidote_llm.data.records import pairs_sha256
from antidote_llm.lab.config import Experiment, expand_sweep
from antidote_llm.lab.data import SettingData
from antidote_llm.lab.graph import StageJob, stage_key
from antidote_llm.lab.rows import Row, defense_row, eval_row
from antidote_llm.lab.work import AlignWork, DefenseWork, EvalWork, FinetuneWork, UnalignWork
from antidote_llm.registry import Defense, TrainingDefense
from antidote_llm.runtime.loading import ModelSource
from antidote_llm.training.methods import MethodRun

STAGES_DIR = "stages"


class SettingPlan:
    """One point of the sweep: its data, and the stage jobs that compute it."""

    def __init__(self, experiment: Experiment, values: dict, stages: Path, progress: bool):
        self.exp = experiment
        self.values = values
        self.stages = stages
        self.progress = progress
        self.defense_folders: dict[str, Path] = {}  # defense label -> its stage folder
        spec = experiment.model
        self.base_source = ModelSource(spec.model, dtype=spec.dtype, device=spec.device)
        self.data = SettingData(experiment)
        self.base_key = stage_key("given", self.base_source.describe())

    def method_run(self, chosen: TrainingDefense) -> MethodRun:
        """A training-stage defense as its stage job runs it: the defense and the rows of the inputs it reads."""
        return MethodRun(chosen, {name: self.data.inputs[name] for options in chosen.inputs() for name in options
                                  if name in self.data.inputs})

    def align(self, method: MethodRun | None = None) -> tuple[StageJob | None, str, ModelSource]:
        """The alignment job (None: the model is aligned already), its key, and the aligned model."""
        exp, data = self.exp, self.data
        if exp.alignment is None:
            return None, self.base_key, self.base_source
        config = training.preset(exp.alignment.training.preset, "align", seed=exp.seed, template=exp.model.template,
                                 **exp.alignment.training.overrides)
        key = stage_key("align", self.base_source.describe(), data.align_pairs.sha256,
                        data.align_benign and data.align_benign.sha256, config, *_method_key(method))
        work = AlignWork(self.base_source, data.align_pairs, data.align_benign, config, self.progress, method,
                         exp.alignment.training.report_to)
        source = ModelSource(str(self.stages / f"align-{key}" / "merged"), dtype=exp.model.dtype, device=exp.model.device)
        return StageJob("align", "align", key, work), key, source

    def finetune(self, align_key: str, aligned: ModelSource, needs: tuple[str, ...], method: MethodRun | None = None
                 ) -> StageJob:
        """The user's fine-tuning job; `method`: a fine-tuning-stage defense the provider runs."""
        spec, data = self.exp.finetune, self.data
        config = training.preset(spec.training.preset, "finetune", seed=self.exp.seed, template=self.exp.model.template,
                                 **spec.training.overrides)
        key = stage_key("finetune", align_key, spec.task, pairs_sha256(data.task_train), data.harmful.sha256,
                        spec.harmful_fraction, spec.samples, config, *_method_key(method))
        work = FinetuneWork(aligned, data.task_train, data.harmful, spec.harmful_fraction, spec.samples, config,
                            self.progress, method, spec.training.report_to)
        return StageJob("finetune", "finetune", key, work, needs)

    def unalign(self, align_key: str, aligned: ModelSource, needs: tuple[str, ...]) -> StageJob:
        """RESTA's unaligned model: a short harmful LoRA SFT of the aligned model (its adapter)."""
        exp = self.exp
        config = training.preset(exp.unalign.training.preset, "unalign", seed=exp.seed, template=exp.model.template,
                                 **exp.unalign.training.overrides)
        key = stage_key("unalign", align_key, self.data.unalign_pairs.sha256, config)
        work = UnalignWork(aligned, self.data.unalign_pairs, config, self.progress, exp.unalign.training.report_to)
        return StageJob("unalign", "finetune", key, work, needs)

    def chain(self, jobs: dict[str, StageJob], method: MethodRun | None = None):
        """(align job, align key, aligned model, finetune job, fine-tuned model): the plain chain, or that of a
        training-stage defense (its own alignment, or its own fine-tuning of the shared alignment)."""
        stage = method.defense.stage if method else None
        align_job, align_key, aligned = self.align(method if stage == "align" else None)
        align_needs = (align_job.name,) if align_job else ()
        finetune_job = self.finetune(align_key, aligned, align_needs, method if stage == "finetune" else None)
        for job in (align_job, finetune_job):
            if job is not None:
                jobs.setdefault(job.name, job)
        finetuned = ModelSource(aligned.model, adapters=(str(self.stages / finetune_job.name / "adapter"),),
                                dtype=aligned.dtype, device=aligned.device)
        return align_job, align_key, aligned, finetune_job, finetuned


def _method_key(method: MethodRun | None) -> list:
    """What identifies a training-stage defense in its stage's key (nothing for plain SFT, so old keys stay)."""
    if method is None:
        return []
    return [[method.defense.name, method.defense.settings(),
             {name: rows.sha256 for name, rows in sorted(method.extra.items())}]]


def _available_inputs(setting: SettingPlan, align_job: StageJob | None, unalign_job: StageJob | None
                      ) -> dict[str, tuple[object, object]]:
    """Every defense input the lab can supply for this setting: name -> (value, what identifies it in stage keys)."""
    data, exp = setting.data, setting.exp
    available = {name: (rows, rows.sha256) for name, rows in data.inputs.items()}
    available["user_rows"] = (data.user_rows, data.user_rows.sha256)
    if data.validation is not None:
        available["validation"] = (data.validation, data.validation_key)
    if exp.alignment is not None:
        available["base_model"] = (setting.base_source, setting.base_key)
    if align_job is not None:  # the alignment stage's LoRA (SafeMERGE's safety LoRA)
        available["alignment_adapter"] = (str(setting.stages / align_job.name / "adapter"), align_job.key)
    if unalign_job is not None:
        available["unaligned_model"] = (str(setting.stages / unalign_job.name / "adapter"), unalign_job.key)
    return available


def _reads(chosen: Defense) -> set[str]:
    return {name for options in chosen.inputs() for name in options}


def _supplied(chosen: Defense, available: dict) -> list[str]:
    """The inputs the lab gives a defense: of each set of alternatives, the first it can supply (SafeLoRA's V
    from the base model even where the alignment adapter exists too)."""
    found = [next((name for name in options if name in available), None) for options in chosen.inputs()]
    return sorted({name for name in found if name is not None})


def plan_setting(setting: SettingPlan, jobs: dict[str, StageJob]) -> list[Row]:
    """Add the setting's stage jobs to `jobs` (a stage two settings share is one job) and return its rows."""
    exp = setting.exp
    align_job, align_key, aligned, finetune_job, finetuned = setting.chain(jobs)
    align_needs = (align_job.name,) if align_job else ()
    rows = []
    stage_models = {"base": (setting.base_source, setting.base_key, ()), "aligned": (aligned, align_key, align_needs)}
    for stage in exp.evaluate_stages:
        if stage == "aligned" and exp.alignment is None:
            continue
        source, model_key, needs = stage_models[stage]
        job = StageJob(f"eval-{stage}", "eval", stage_key(stage, model_key, setting.data.eval_key),
                       EvalWork(source, setting.data.evaluation, setting.progress), needs)
        jobs.setdefault(job.name, job)
        align_folder = setting.stages / align_job.name if align_job and stage == "aligned" else None
        rows.append(Row((job.name, *needs), eval_row(setting.values, stage, setting.stages / job.name, align_folder)))

    defenses = {label: exp.defense(label) for label in exp.defenses}
    needs_unalign = any("unaligned_model" in _reads(d) for d in defenses.values())
    unalign_job = setting.unalign(align_key, aligned, align_needs) if needs_unalign and exp.unalign else None
    if unalign_job is not None:
        jobs.setdefault(unalign_job.name, unalign_job)
    available = _available_inputs(setting, align_job, unalign_job)
    for label, chosen in defenses.items():
        own_align, own_finetune, own_finetuned = align_job, finetune_job, finetuned
        if isinstance(chosen, TrainingDefense):
            own_align, _, _, own_finetune, own_finetuned = setting.chain(jobs, setting.method_run(chosen))
            inputs = {}
        else:
            inputs = {name: available[name] for name in _supplied(chosen, available)}
        key = stage_key("defense", own_finetune.key, chosen.name, chosen.settings(), setting.data.eval_key, exp.seed,
                        [[name, identity] for name, (_, identity) in inputs.items()])
        work = DefenseWork(own_finetuned, chosen, setting.data.evaluation, setting.progress,
                           {name: value for name, (value, _) in inputs.items()})
        defense_needs = (own_finetune.name, *([unalign_job.name] if "unaligned_model" in inputs else []))
        job = StageJob(f"defense-{label}", "defense", key, work, defense_needs)
        jobs.setdefault(job.name, job)
        setting.defense_folders[label] = setting.stages / job.name
        trained_align = setting.stages / own_align.name if chosen.stage == "align" and own_align else None
        rows.append(Row((job.name, *defense_needs),
                        defense_row(setting.values, label, chosen, setting.stages / job.name,
                                    setting.stages / own_finetune.name, trained_align)))
    return rows


@dataclass
class Plan:
    settings: list[SettingPlan]
    jobs: list[StageJob]
    rows: list[Row]


def plan_experiment(experiment: Experiment, out_dir: str | Path, *, progress: bool = True) -> Plan:
    """Every setting's data loaded and checked, and the stage graph of the whole sweep; nothing runs."""
    stages = Path(out_dir).resolve() / STAGES_DIR
    settings = [SettingPlan(exp, values, stages, progress) for values, exp in expand_sweep(experiment)]
    jobs: dict[str, StageJob] = {}
    rows = [row for setting in settings for row in plan_setting(setting, jobs)]
    return Plan(settings, list(jobs.values()), rows)
