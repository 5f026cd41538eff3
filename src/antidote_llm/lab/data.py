"""The rows of one point of a sweep, loaded and checked before any model is touched: the training rows, the
defense inputs of the INPUTS table, the evaluation's rows and the probe/validation rows, each kept disjoint
from the rows it must never share with (the poison, the re-alignment rows, the evaluation prompts)."""

from __future__ import annotations

import random

from antidote_llm import training
from antidote_llm.data.records import PairSet, check_samples, pairs_sha256
from antidote_llm.errors import AntidoteError
from antidote_llm.evaluation import tasks
from antidote_llm.evaluation.evaluate import EvalInputs
from antidote_llm.evaluation.settings import EvalSettings
from antidote_llm.lab.config import Experiment
from antidote_llm.lab.graph import stage_key
from antidote_llm.registry import INPUTS, DefenseInput

TASK_SAMPLES = "evaluation.task_samples"


class SettingData:
    """Every row set of one sweep point. `inputs`: the rows inputs the experiment gives, by input name."""

    def __init__(self, exp: Experiment):
        if exp.alignment is not None:
            self.align_pairs = exp.alignment.data.load("safe", name="alignment.data.samples")
            self.align_benign = (exp.alignment.benign.load(name="alignment.benign.samples") if exp.alignment.benign
                                 else None)
        ft = exp.finetune
        self.task_train = tasks.load_task_pairs(ft.task, ft.task_data, "train")
        self.harmful = ft.harmful.load("unsafe", name="finetune.harmful.samples")
        mix = training.mix_spec(ft.harmful_fraction, ft.samples)
        training.check_mix_counts(mix, len(self.task_train), len(self.harmful))
        # The fine-tuning takes the leading harmful rows, and the leading task rows.
        self.poison = self.harmful.head(mix.harmful_rows)
        user_rows = min(exp.user_rows, mix.task_rows)
        self.user_rows = PairSet(pairs=tuple(self.task_train[:user_rows]), source=ft.task_data or f"hub:{ft.task}",
                                 indices=tuple(range(user_rows)))
        spec = exp.evaluation
        self.prompts = spec.harmful_prompts.load("unsafe", require_response=False,
                                                 name="evaluation.harmful_prompts.samples", categories=True)
        self.inputs: dict[str, PairSet] = {}
        for name in _in_load_order(exp):
            self.inputs[name] = self._input_rows(exp, INPUTS[name])
        self.unalign_pairs = None
        if exp.unalign is not None:
            self.unalign_pairs = _disjoint(exp.unalign.data.load("unsafe", exclude=self._poison_indices(exp, exp.unalign.data),
                                                                 name="unalign.data.samples"),
                                           "unalignment rows", "unalign.data", poison=self.poison,
                                           harmful=self.inputs.get("harmful"), evaluation=self.prompts)
        test_rows = tasks.load_task_pairs(ft.task, spec.task_data, "test", name=TASK_SAMPLES,
                                          samples=None if spec.validation_split else spec.task_samples)
        split_rows = None
        if spec.validation_split is not None:
            split_rows, test_rows = _split(test_rows, spec.validation_split, exp.seed)
            if spec.task_samples is not None:
                check_samples(spec.task_samples, len(test_rows), len(test_rows) + len(split_rows),
                              spec.task_data or f"hub:{ft.task}", TASK_SAMPLES)
            test_rows = test_rows[:spec.task_samples]
        self.task_test = test_rows
        self.evaluation = EvalInputs(self.prompts.pairs, ft.task, self.task_test, spec, exp.model.template)
        self.validation = _validation_inputs(exp, self.prompts.pairs, self.task_test, split_rows)
        self.validation_key = self.validation and stage_key(pairs_sha256(self.validation.prompts),
                                                            pairs_sha256(self.validation.rows))
        self.eval_key = stage_key(EvalSettings.build(spec).result_key(), self.prompts.sha256, pairs_sha256(self.task_test),
                                  exp.model.template)

    def _poison_indices(self, exp: Experiment, spec) -> tuple[int, ...]:
        """The poison's indices when `spec` reads the poison's source, else none."""
        same_source = (spec.source, spec.safety) == (exp.finetune.harmful.source, exp.finetune.harmful.safety)
        return self.poison.indices if same_source else ()

    def _input_rows(self, exp: Experiment, spec: DefenseInput) -> PairSet:
        data = exp.setting(spec.keys[0])
        exclude = self._poison_indices(exp, data) if spec.skips_poison else ()
        rows = data.load(spec.safety, exclude=exclude, require_response=spec.safety is not None,
                         name=f"{spec.keys[0]}.samples")
        others = {"poison": self.poison, "harmful": self.inputs.get("harmful"), "evaluation": self.prompts}
        return _disjoint(rows, f"rows of {spec.key}", spec.key, **{name: others[name] for name in spec.disjoint_from})


def _in_load_order(exp: Experiment) -> list[str]:
    """The rows inputs the experiment gives, the re-alignment rows first (others are kept disjoint from them)."""
    given = [name for name, spec in INPUTS.items() if spec.kind == "rows" and exp.has_input(name)]
    return sorted(given, key=lambda name: name != "harmful")


# What each row set is called in an overlap error.
_OTHERS = {"poison": "poison rows (finetune.harmful)", "harmful": "re-alignment rows (realign_data)",
           "evaluation": "evaluation prompts"}


def _disjoint(rows: PairSet, what: str, key: str, **others: PairSet | None) -> PairSet:
    """`rows`, refused when they share rows with the poison or re-alignment rows, or prompts with the evaluation."""
    mine = set(rows.pairs)
    for name, other in others.items():
        if other is None:
            continue
        shared = ({p.prompt for p in mine} & {p.prompt for p in other.pairs} if name == "evaluation"
                  else mine & set(other.pairs))
        if shared:
            raise AntidoteError(f"{len(shared)} {what} are also {_OTHERS[name]}; give {key} a disjoint source or "
                                "skip window")
    return rows


def _split(rows: list, count: int, seed: int) -> tuple[list, list]:
    """`count` rows drawn with `seed` (in file order), and the others: validation and test rows of one file."""
    if count >= len(rows):
        raise AntidoteError(f"evaluation.validation_split {count} leaves no test rows of the {len(rows)} in the "
                            "task file; give a smaller split")
    drawn = set(random.Random(seed).sample(range(len(rows)), count))
    return ([row for i, row in enumerate(rows) if i in drawn], [row for i, row in enumerate(rows) if i not in drawn])


def _validation_inputs(exp: Experiment, test_prompts, test_rows, split_rows: list | None) -> EvalInputs | None:
    """Probe prompts and validation rows for defenses that choose per model; never the evaluation's rows."""
    spec = exp.evaluation
    wanted = any(("validation",) in exp.defense(label).inputs() for label in exp.defenses)
    if not wanted or not exp.has_input("validation"):
        return None
    prompts = spec.probe_prompts.load("unsafe", require_response=False, name="evaluation.probe_prompts.samples",
                                      categories=True).pairs
    rows = split_rows if split_rows is not None else tasks.load_task_pairs(
        exp.finetune.task, spec.validation_data, "train", samples=spec.validation_samples, skip=spec.validation_skip,
        name="evaluation.validation_samples")
    shared_prompts = {p.prompt for p in prompts} & {p.prompt for p in test_prompts}
    shared_rows = set(rows) & set(test_rows)
    if shared_prompts or shared_rows:
        raise AntidoteError(
            f"{len(shared_prompts)} probe prompts and {len(shared_rows)} validation rows are also evaluation rows; "
            "give evaluation.probe_prompts and evaluation.validation_data disjoint sources or skip windows"
        )
    return EvalInputs(prompts, exp.finetune.task, rows, spec, exp.model.template)
