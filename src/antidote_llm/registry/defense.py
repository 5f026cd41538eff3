"""What a defense is: one picklable object whose fields are its settings, registered by name.

A defense declares the stage it acts on (`align`: how the model is safety-aligned; `finetune`: how the user's
fine-tuning runs; `post`: a repair of the fine-tuned model afterwards, as Antidote), the inputs it reads
(names from the INPUTS table) and what it does. The lab ships the object itself to the process or cluster job
that runs its stage; nothing looks a defense up by name twice. See docs/adding-a-defense.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from antidote_llm.errors import AntidoteError, validated
from antidote_llm.registry.inputs import INPUTS, input_spec

DefenseStage = Literal["align", "finetune", "post"]
PRESETS = ("paper", "cpu")


class DefenseOutcome(BaseModel):
    """What a post-fine-tuning defense did: its own report, and the share of the weights it acted on that it changed."""

    report: dict | None = None
    changed_fraction: float | None = None
    ratio: float | None = None  # the pruning ratio used (chosen by the defense when it chooses one)
    verdict: str | None = None  # a defense that decides whether to ship (guard): safe, repaired or rejected


class DefenseContext:
    """What a post-fine-tuning defense may use besides the model: the tokenizer, and the inputs (INPUTS) that were
    given, read as attributes (`context.safe`); an input that was not given reads as None."""

    def __init__(self, tokenizer, **inputs: Any):
        for name in inputs:
            input_spec(name)
        self.tokenizer = tokenizer
        self._inputs = {name: value for name, value in inputs.items() if value is not None}

    def __getattr__(self, name: str):
        if name.startswith("_") or name not in INPUTS:
            raise AttributeError(name)
        return self._inputs.get(name)


class Defense(BaseModel):
    """Base of every defense. Subclasses set the class variables, declare their settings as fields, and override
    `apply` (post-fine-tuning defenses) or derive from TrainingDefense."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ClassVar[str]
    stage: ClassVar[DefenseStage] = "post"
    description: ClassVar[str]
    fixed: ClassVar[dict] = {}  # settings the defense sets itself (Antidote's score is wanda)
    reads: ClassVar[tuple[tuple[str, ...], ...]] = ()  # the inputs it reads whatever its settings (see `inputs`)

    @classmethod
    def configure(cls, options: dict, defaults: dict | None = None, preset: str = "paper") -> Defense:
        """The defense from user `options`; `defaults` fill the fields it has that were not given (the lab's
        template and seed). `preset` is read by the training-stage defenses."""
        clash = sorted(set(options) & set(cls.fixed))
        if clash:
            raise AntidoteError(f"defense {cls.name!r} sets {', '.join(clash)} itself; remove it from its options")
        filled = {key: value for key, value in (defaults or {}).items()
                  if key in cls.model_fields and key not in options}
        return validated(cls, {**filled, **options, **cls.fixed})

    def inputs(self) -> tuple[tuple[str, ...], ...]:
        """The inputs it reads with these settings; each entry lists alternatives, any one of which will do."""
        return self.reads

    def live_adapter(self) -> bool:
        """Whether it acts on the fine-tuning adapter kept separate (True) or on the merged model (False)."""
        return True

    def knob(self) -> str | None:
        """Its main setting, for tables: "ratio=0.05"."""
        return None

    def settings(self) -> dict:
        return self.model_dump(mode="json")

    def apply(self, model, context: DefenseContext) -> DefenseOutcome:
        """Change `model` in place (post-fine-tuning defenses)."""
        return DefenseOutcome()


class TrainingDefense(Defense):
    """A defense that acts while its stage trains (Vaccine, RepNoise, Booster at alignment; Lisa, LDIFS during the
    user's fine-tuning). Its settings start from a named preset: `paper` (the authors' script) or `cpu`."""

    stage: ClassVar[Literal["align", "finetune"]]
    presets: ClassVar[dict[str, dict]]
    # It calls zero_grad inside a step or counts micro-steps, so gradient accumulation must be 1 (as the authors ran it).
    single_accumulation: ClassVar[bool] = False
    trainer_class: ClassVar[Callable[[], type]]  # builds its Trainer subclass (lazily: no transformers import here)

    @classmethod
    def configure(cls, options: dict, defaults: dict | None = None, preset: str = "paper") -> TrainingDefense:
        if preset not in cls.presets:
            raise AntidoteError(f"defense {cls.name!r} has no preset {preset!r}; choose one of {', '.join(cls.presets)}")
        given = {key: value for key, value in options.items() if value is not None}
        unknown = sorted(set(given) - set(cls.model_fields))
        if unknown:
            raise AntidoteError(f"defense {cls.name!r} has no option {', '.join(unknown)}; "
                                f"its options: {', '.join(cls.model_fields)}")
        return validated(cls, {**cls.presets[preset], **given})

    @classmethod
    def trainer(cls) -> type:
        """The Trainer subclass that runs it."""
        return cls.trainer_class()

    def extra_batch_sizes(self) -> dict[str, int]:
        """Input name -> batch size of its rows, where not the user's batch size."""
        return {}

    def knob(self) -> str | None:
        return ", ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                         for key, value in self.model_dump().items())


DEFENSES: dict[str, type[Defense]] = {}


def register(cls: type[Defense]) -> type[Defense]:
    """Class decorator: add a defense to the registry under its `name`."""
    known = DEFENSES.get(cls.name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise AntidoteError(f"two defenses are named {cls.name!r}: {known.__module__} and {cls.__module__}")
    DEFENSES[cls.name] = cls
    return cls


def defense_class(name: str, stage: DefenseStage | None = None) -> type[Defense]:
    """The registered defense `name`; with `stage`, refuse one that acts at another stage."""
    found = DEFENSES.get(name)
    here = [n for n, d in DEFENSES.items() if stage is None or d.stage == stage]
    if found is None:
        raise AntidoteError(f"unknown defense {name!r}; choose one of {', '.join(here)}")
    if stage is not None and found.stage != stage:
        raise AntidoteError(f"defense {name!r} acts at the {found.stage} stage, not {stage}; "
                            f"{stage} defenses: {', '.join(here) or 'none'}")
    return found
