"""The defense registry: every defense names the stage it acts on and the settings object it reads.

Stages: `align` (changes how the model is safety-aligned), `finetune` (changes the user's fine-tuning),
`post` (repairs the fine-tuned model afterwards, as Antidote does). The lab, the CLI and the tests look
defenses up here by name; nothing switches on a method name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel

from antidote_llm.data.records import PairSet
from antidote_llm.errors import AntidoteError, validated
from antidote_llm.evaluation.evaluate import EvalInputs
from antidote_llm.runtime.loading import ModelSource
from antidote_llm.training.methods import TrainingMethod

DefenseStage = Literal["align", "finetune", "post"]


@dataclass(frozen=True)
class DefenseContext:
    """What a post-fine-tuning defense may use besides the model and its settings."""

    tokenizer: object
    harmful: PairSet | None  # re-alignment rows, disjoint from the poison rows
    benign: PairSet | None
    validation: EvalInputs | None = None  # probe prompts and the user's validation rows, for automatic choices
    # The post-fine-tuning peers' extra inputs (Defense.extra_inputs names the ones a defense needs):
    base_model: ModelSource | None = None  # the unaligned model the aligned one was trained from (SafeLoRA)
    alignment_adapter: str | None = None  # the alignment LoRA, instead of base_model (SafeLoRA)
    unaligned_model: str | None = None  # the aligned model made unsafe: a LoRA on it, or a model folder (RESTA)
    safe: PairSet | None = None  # safe calibration rows: harmful prompt, safe answer (Safe Delta, antidote-refusal)
    user_rows: PairSet | None = None  # the user's own clean fine-tuning rows (antidote-refusal's contrast)

    def missing(self, defense: Defense) -> list[tuple[str, ...]]:
        """The extra inputs `defense` needs that this context lacks (each a tuple of alternatives)."""
        return [options for options in defense.extra_inputs if all(getattr(self, name) is None for name in options)]


class DefenseOutcome(BaseModel):
    """What a post-fine-tuning defense did: its own report, and the share of the weights it acted on that it changed."""

    report: dict | None = None
    changed_fraction: float | None = None
    ratio: float | None = None  # the pruning ratio used (chosen by the defense when it chooses one)


@dataclass(frozen=True)
class Defense:
    """A registered defense.

    `settings` validates the defense's options (None: it takes none). `apply(model, settings, context)`
    changes the model in place and returns a DefenseOutcome (a training-stage defense has acted before:
    its `training` method ran in the align or finetune stage, and its `apply` changes nothing). `live_adapter(settings)` says whether it
    acts on the fine-tuning adapter kept separate (True) or on the merged model (False).
    """

    name: str
    stage: DefenseStage
    description: str
    apply: Callable[[object, BaseModel | None, DefenseContext], DefenseOutcome]
    settings: type[BaseModel] | None = None
    fixed: dict = field(default_factory=dict)  # settings the defense itself sets (Antidote's score is wanda)
    needs_benign: Callable[[BaseModel | None], bool] = lambda settings: False
    needs_validation: bool = False
    live_adapter: Callable[[BaseModel | None], bool] = lambda settings: True
    # Context fields it needs beyond the model; each entry lists alternatives, any one of which will do.
    extra_inputs: tuple[tuple[str, ...], ...] = ()
    knob: Callable[[BaseModel | None], str | None] = lambda settings: None  # its main setting, for tables: "ratio=0.05"
    training: TrainingMethod | None = None  # an align or finetune defense: the Trainer that runs it in its stage

    def configure(self, options: dict, defaults: dict | None = None, preset: str = "paper") -> BaseModel | None:
        """The defense's validated settings from `options`; `defaults` fill the fields it has but were not given.
        A training-stage defense starts from its `preset` (paper or cpu) instead."""
        if self.training is not None:
            return self.training.configure(preset, **options)
        if self.settings is None:
            if options:
                raise AntidoteError(f"defense {self.name!r} takes no options; got {', '.join(sorted(options))}")
            return None
        clash = sorted(set(options) & set(self.fixed))
        if clash:
            raise AntidoteError(f"defense {self.name!r} sets {', '.join(clash)} itself; remove it from its options")
        fields = self.settings.model_fields
        filled = {key: value for key, value in (defaults or {}).items() if key in fields and key not in options}
        return validated(self.settings, {**filled, **options, **self.fixed})


def registry(*defenses: Defense) -> dict[str, Defense]:
    return {defense.name: defense for defense in defenses}


def get_defense(table: dict[str, Defense], name: str, stage: DefenseStage | None = None) -> Defense:
    defense = table.get(name)
    if defense is None:
        raise AntidoteError(f"unknown defense {name!r}; choose one of {', '.join(table)}")
    if stage is not None and defense.stage != stage:
        raise AntidoteError(
            f"defense {name!r} acts at the {defense.stage} stage, not {stage}; "
            f"{stage} defenses: {', '.join(n for n, d in table.items() if d.stage == stage) or 'none'}"
        )
    return defense
