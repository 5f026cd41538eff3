"""The experiment file: validated (unknown keys are errors), data paths relative to the file itself."""

from __future__ import annotations

import copy
import itertools
import json
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from antidote_llm.data.records import HUB_PREFIX
from antidote_llm.data.spec import DataSpec
from antidote_llm.defenses import defense
from antidote_llm.errors import AntidoteError, validation_message
from antidote_llm.evaluation.settings import EvalSettings
from antidote_llm.registry import INPUTS, Defense, input_spec
from antidote_llm.training.config import ReportTo


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    model: str
    dtype: str = "auto"
    device: str = "auto"
    template: Literal["alpaca", "chat", "plain"] = "alpaca"


class TrainingSpec(Strict):
    preset: Literal["paper", "cpu"] = "cpu"
    overrides: dict = Field(default_factory=dict, description="TrainConfig fields, e.g. learning_rate, epochs")
    # how the run is watched, never what it computes: not part of the stage's key
    report_to: ReportTo = Field(default=(), description="trackers of the loss curves: none (default), tensorboard "
                                "(events in the stage's tensorboard/), wandb, mlflow, ...")


class AlignmentSpec(Strict):
    data: DataSpec
    benign: DataSpec | None = None
    training: TrainingSpec = TrainingSpec()


class FinetuneSpec(Strict):
    task: str
    task_data: str | None = None  # None: the task's hub dataset
    harmful: DataSpec
    harmful_fraction: float = Field(ge=0, le=1)
    samples: int = Field(ge=1, description="n: rows in the poisoned mix")
    training: TrainingSpec = TrainingSpec()


class UnalignSpec(Strict):
    """RESTA's unaligned model: a short LoRA SFT of the aligned model on harmful rows, which must be disjoint
    from the poison, re-alignment and evaluation rows (the runner checks)."""

    data: DataSpec
    training: TrainingSpec = TrainingSpec()


class DefenseDataSpec(Strict):
    """The extra rows of the training-stage defenses, by role. Both must be disjoint from the poison rows, the
    re-alignment rows and the evaluation prompts (the runner checks and names any overlap)."""

    harmful: DataSpec | None = None  # harmful prompt, harmful answer: RepNoise's and Booster's harmful stream
    guide: DataSpec | None = None  # harmful prompt, safe answer: Lisa's alignment rows


class DefenseSpec(BaseModel):
    """One defense to compare: `method` names a registered defense; every other key is one of its settings
    (for Antidote and its controls, the fields of RealignConfig), validated by the defense itself."""

    model_config = ConfigDict(extra="allow", frozen=True)

    method: str

    @property
    def options(self) -> dict:
        return dict(self.model_extra or {})


class EvaluationSpec(EvalSettings):
    """The evaluation settings every command shares, plus the rows the lab evaluates on."""

    harmful_prompts: DataSpec
    task_data: str | None = None
    task_samples: int | None = Field(default=None, ge=1)
    # For defenses that choose a setting per model (antidote-auto): probe prompts and the user's validation
    # rows of the task, both disjoint from the evaluation rows above.
    probe_prompts: DataSpec | None = None
    validation_data: str | None = None
    validation_skip: int = Field(default=0, ge=0)
    validation_samples: int | None = Field(default=None, ge=1)
    validation_split: int | None = Field(
        default=None, ge=1, description="instead of validation_data: this many rows of the evaluation's task file, "
        "drawn with the experiment's seed, are the validation rows and the rest the test rows (the same distribution)")

    @model_validator(mode="after")
    def _one_validation_source(self):
        if self.validation_split is not None and self.validation_data is not None:
            raise ValueError("give evaluation.validation_data or evaluation.validation_split, not both")
        return self

    @property
    def validation_rows(self) -> str | int | None:
        """Where the validation rows come from: a file, or a split of the evaluation's task file."""
        return self.validation_data if self.validation_split is None else self.validation_split


# Names that become parts of paths (the experiment's, its defense labels, its sweep paths): no separator, no "..".
SAFE_NAME = re.compile(r"^(?!.*\.\.)[A-Za-z0-9._-]+$")


def _safe_name(value: str, what: str) -> str:
    if not SAFE_NAME.match(value):
        raise ValueError(f"{what} {value!r} may hold only letters, digits, '.', '_' and '-' (no '..'): it names "
                         "files and folders of the output")
    return value


StageFamily = Literal["align", "finetune", "eval", "defense"]  # what a stage does, for its cluster resources
_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


class SlurmResources(Strict):
    """What one stage's Slurm job asks for; unset fields take the cluster's defaults."""

    partition: str | None = None
    gpus: int | None = Field(default=None, ge=0, description="GPUs per job (one node)")
    cpus: int | None = Field(default=None, ge=1, description="CPU cores per job")
    mem: str | None = Field(default=None, pattern=r"^\d+[KMGT]?$", description="memory per job, Slurm syntax, e.g. 64G")
    time: str | int | None = Field(default=None, description="time limit: minutes, or Slurm's [D-]HH:MM:SS")
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: tuple[str, ...] = Field(default=(), description="shell lines run before the stage, e.g. module load, venv")
    additional: dict[str, str | int] = Field(default_factory=dict, description="other #SBATCH options, name -> value")

    @model_validator(mode="after")
    def _time_parses(self):
        self.minutes  # noqa: B018 - raises on a malformed time
        return self

    @property
    def minutes(self) -> int | None:
        if self.time is None or isinstance(self.time, int):
            return self.time
        match = _SLURM_TIME.match(self.time.strip())
        if match is None:
            raise ValueError(f"time {self.time!r}: give minutes or [D-]HH:MM:SS")
        days, first, second, third = (int(g) if g else None for g in match.groups())
        if second is None:  # minutes, or D-HH
            return (days or 0) * 1440 + (first * 60 if days is not None else first)
        hours, minutes, seconds = (first, second, third or 0) if third is not None or days is not None else (0, first, second)
        return (days or 0) * 1440 + hours * 60 + minutes + (seconds > 0)


class ClusterSpec(Strict):
    """How stages run when they run as jobs (`antidote lab run --executor slurm|processes`)."""

    shared_storage: bool = Field(
        default=False,
        description="the output folder is on storage every worker node sees (needed when it is a local-disk "
                    "filesystem such as ext4 or xfs; network filesystems are recognised)",
    )
    slurm: dict[Literal["default"] | StageFamily, SlurmResources] = Field(
        default_factory=dict, description="resources per stage family (align, finetune, eval, defense), over `default`",
    )

    def slurm_resources(self, family: str) -> SlurmResources:
        default = self.slurm.get("default", SlurmResources())
        own = self.slurm.get(family)
        return default if own is None else default.model_copy(update=own.model_dump(exclude_unset=True))


class Experiment(BaseModel):
    """An experiment file. Beside these keys it takes the experiment key of any registered rows input
    (antidote_llm.registry.INPUTS), so a new defense's rows need no new field here."""

    model_config = ConfigDict(extra="allow", frozen=True)
    _defenses: dict[str, Defense] = PrivateAttr(default_factory=dict)

    name: str = "experiment"
    seed: int = 0
    model: ModelSpec
    alignment: AlignmentSpec | None = None  # None: the model is aligned already
    finetune: FinetuneSpec
    realign_data: DataSpec
    benign_data: DataSpec | None = None
    unalign: UnalignSpec | None = None  # RESTA's unaligned model
    safe_data: DataSpec | None = None  # safe calibration rows (harmful prompt, safe answer): Safe Delta, antidote-refusal
    user_rows: int = Field(default=64, ge=1, description="how many of the user's clean fine-tuning rows (the first task "
                           "rows of the fine-tune) antidote-refusal weighs against")
    defense_data: DefenseDataSpec | None = None  # the training-stage defenses' extra rows
    defenses: dict[str, DefenseSpec]
    evaluation: EvaluationSpec
    evaluate_stages: tuple[Literal["base", "aligned"], ...] = ("base", "aligned")
    sweep: dict[str, list] = Field(default_factory=dict, description="dotted path -> values")
    # grid: every combination runs; each: one path varies at a time, the others keep the file's values (the
    # paper's learning-rate and epoch tables)
    sweep_mode: Literal["grid", "each"] = "grid"
    cluster: ClusterSpec | None = None  # None: the defaults; how stages run, never what they compute

    def defense(self, label: str) -> Defense:
        """The defense `label` as an object (its settings validated once, when the file was read)."""
        return self._defenses[label]

    def _build_defense(self, label: str) -> Defense:
        """The model's template and the experiment's seed are defaults; a training defense starts from its stage's
        preset (paper or cpu)."""
        spec = self.defenses[label]
        chosen = defense(spec.method)
        stage = self.alignment if chosen.stage == "align" else self.finetune
        preset = stage.training.preset if stage is not None else "paper"
        return chosen.configure(spec.options, {"template": self.model.template, "seed": self.seed}, preset)

    def setting(self, dotted: str):
        """The value at the dotted experiment key (None when unset); keys of registered inputs that are not fields
        of this file format live among the extra keys."""
        first, *rest = dotted.split(".")
        node = (self.model_extra or {}).get(first, getattr(self, first, None))
        for key in rest:
            node = getattr(node, key, None)
        return node

    def has_input(self, name: str) -> bool:
        return all(self.setting(key) is not None for key in input_spec(name).keys)

    @model_validator(mode="after")
    def _inputs_known(self):
        """An extra key is the experiment key of a registered rows input (parsed as a data spec), or a mistake."""
        row_keys = {spec.keys[0]: spec for spec in INPUTS.values() if spec.kind == "rows" and len(spec.keys) == 1}
        for key, value in (self.model_extra or {}).items():
            if key not in row_keys:
                raise ValueError(f"{key}: Extra inputs are not permitted")
            self.model_extra[key] = value if isinstance(value, DataSpec) else DataSpec.model_validate(value)
        return self

    @model_validator(mode="after")
    def _names_are_safe_paths(self):
        _safe_name(self.name, "the experiment name")
        for label in self.defenses:
            _safe_name(label, "defense label")
        for path in self.sweep:
            _safe_name(path, "sweep path")
        return self

    @model_validator(mode="after")
    def _defenses_known(self):
        built = {}
        for label, spec in self.defenses.items():
            try:
                built[label] = chosen = self._build_defense(label)
            except AntidoteError as exc:
                raise ValueError(f"defense {label!r}: {exc}") from None
            if chosen.stage == "align" and self.alignment is None:
                raise ValueError(f"defense {label!r} ({spec.method}) acts at the alignment stage; "
                                 "the experiment needs an alignment block")
            for options in chosen.inputs():
                if not any(self.has_input(name) for name in options):
                    wanted = [input_spec(name) for name in options]
                    raise ValueError(f"defense {label!r} ({spec.method}) needs "
                                     + " or ".join(f"{w.key} ({w.help})" for w in wanted))
        if "none" not in {s.method for s in self.defenses.values()}:
            raise ValueError("defenses must include one with method 'none' (the undefended baseline the deltas use)")
        self._defenses = built
        return self


def _resolve_sources(raw, base: Path):
    """Relative data paths in the file are relative to the file, never to the working directory."""
    if isinstance(raw, dict):
        return {key: _resolve_entry(key, value, base) for key, value in raw.items()}
    if isinstance(raw, list):
        return [_resolve_sources(v, base) for v in raw]
    return raw


def _resolve_entry(key: str, value, base: Path):
    if not isinstance(value, str):
        return _resolve_sources(value, base)
    if key in ("source", "task_data", "validation_data"):
        return _resolve_path(value, base)
    # A model is a hub id or built-in name unless it is a local path relative to the file.
    if key == "model" and (value.startswith(".") or (base / value).exists()):
        return _resolve_path(value, base)
    return value


def _resolve_path(value: str, base: Path) -> str:
    if value.startswith(HUB_PREFIX) or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def _validate(raw: dict, where: str) -> Experiment:
    try:
        return Experiment(**raw)
    except ValidationError as exc:
        raise AntidoteError(f"{where}: {validation_message(exc)}") from None
    except TypeError as exc:
        raise AntidoteError(f"{where}: {exc}") from None


def parse_experiment(raw: dict, base_dir: Path, where: str = "experiment") -> Experiment:
    if not isinstance(raw, dict):
        raise AntidoteError(f"{where}: the file must hold a mapping of settings")
    experiment = _validate(_resolve_sources(raw, base_dir), where)
    expand_sweep(experiment)  # a bad sweep path fails now, not after hours of training
    return experiment


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (YAML keeps the last silently)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    lines: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in lines:
            raise _DuplicateKey(f"key {key!r} is written twice (lines {lines[key]} and {line}); keep one")
        lines[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    if not path.is_file():
        raise AntidoteError(f"experiment file not found: {path}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        raise AntidoteError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_experiment(raw, path.parent.resolve(), str(path))


def _set_path(raw: dict, dotted: str, value) -> None:
    node = raw
    keys = dotted.split(".")
    for key in keys[:-1]:
        if not isinstance(node, dict) or node.get(key) is None:
            raise AntidoteError(f"sweep path {dotted!r}: no setting {key!r} there; paths look like finetune.harmful_fraction")
        node = node[key]
    if not isinstance(node, dict):
        raise AntidoteError(f"sweep path {dotted!r} does not name a setting")
    node[keys[-1]] = value


def expand_sweep(experiment: Experiment) -> list[tuple[dict, Experiment]]:
    """(swept values, experiment) for every combination of the sweep; one entry when there is none."""
    if not experiment.sweep:
        return [({}, experiment)]
    base = experiment.model_dump(mode="python", exclude={"sweep"})
    paths = list(experiment.sweep)
    for path in paths:
        if not experiment.sweep[path]:
            raise AntidoteError(f"sweep path {path!r} has no values")
    if experiment.sweep_mode == "grid":
        combinations = [dict(zip(paths, values, strict=True))
                        for values in itertools.product(*(experiment.sweep[p] for p in paths))]
    else:
        own = {path: sweep_base_value(base, path) for path in paths}
        combinations = list({json.dumps(c, sort_keys=True, default=str): c for c in (
            {**own, path: value} for path in paths for value in experiment.sweep[path])}.values())
    settings = []
    for combination in combinations:
        raw = copy.deepcopy(base)
        for path, value in combination.items():
            _set_path(raw, path, value)
        settings.append((combination, _validate(raw, f"sweep {combination}")))
    return settings


def sweep_base_value(raw: dict, dotted: str):
    """The value the experiment file itself gives the swept setting `dotted` (None: the stage's default)."""
    node = raw
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node
