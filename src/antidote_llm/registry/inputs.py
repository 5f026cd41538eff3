"""Every input a defense may read besides the model, declared once.

A row of INPUTS says what the input is, the CLI flag that supplies it, where an experiment file holds it, how
its rows are filtered (BeaverTails' is_safe) and which other row sets it must never share rows with. The CLI,
the lab and the DefenseContext a defense receives are built from this table, so a new input is one row here
(or one `register_input` call beside the defense that reads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from antidote_llm.errors import AntidoteError

InputKind = Literal["rows", "model", "adapter", "derived"]
InputStage = Literal["post", "align", "finetune"]
# Row sets an input's rows may be kept disjoint from: the poison rows of the fine-tune, the re-alignment rows
# (the `harmful` input), and the evaluation's harmful prompts (compared by prompt).
DisjointFrom = Literal["poison", "harmful", "evaluation"]


@dataclass(frozen=True)
class DefenseInput:
    """One input. `keys`: the experiment keys (dotted) that must all be set for the lab to supply it; `flag`: the
    CLI flag (None: no command takes it); `cli`: whether the generic input flags of its stage's command add the
    flag (Antidote's own inputs are declared by its own options); `samples`: the CLI's default row count."""

    name: str
    help: str
    kind: InputKind
    keys: tuple[str, ...]
    flag: str | None = None
    stage: InputStage = "post"
    cli: bool = True
    safety: Literal["unsafe", "safe"] | None = None
    disjoint_from: tuple[DisjointFrom, ...] = ()
    skips_poison: bool = False  # rows of the poison's source at the poison's positions are skipped, not refused
    samples: int | None = None

    @property
    def key(self) -> str:
        return " and ".join(self.keys)

    @property
    def samples_flag(self) -> str:
        """The CLI flag of its row count: `--safe-data` -> `--safe-samples`."""
        return (self.flag or f"--{self.name}-data").removesuffix("-data") + "-samples"


INPUTS: dict[str, DefenseInput] = {}


def register_input(spec: DefenseInput) -> DefenseInput:
    """Add an input to the table; a name declared twice with different meanings is refused."""
    known = INPUTS.get(spec.name)
    if known is not None and known != spec:
        raise AntidoteError(f"defense input {spec.name!r} is declared twice, differently")
    INPUTS[spec.name] = spec
    return spec


def input_spec(name: str) -> DefenseInput:
    spec = INPUTS.get(name)
    if spec is None:
        raise AntidoteError(f"unknown defense input {name!r}; known: {', '.join(INPUTS)}")
    return spec


for _spec in (
    DefenseInput("harmful", "harmful re-alignment rows (harmful prompt, harmful answer), disjoint from the poison rows",
                 "rows", ("realign_data",), flag="--data", cli=False, safety="unsafe", disjoint_from=("poison",), skips_poison=True),
    DefenseInput("benign", "benign rows: the benign-calibrated control's data, and the weights protection spares",
                 "rows", ("benign_data",), flag="--benign-data", cli=False),
    DefenseInput("validation", "probe prompts and the user's validation rows (validation_data or validation_split), "
                 "disjoint from the evaluation rows", "derived", ("evaluation.probe_prompts", "evaluation.validation_rows"),
                 flag="--probe-prompts", cli=False),
    DefenseInput("user_rows", "the user's own clean fine-tuning rows", "derived", ("finetune",),
                 flag="--contrast-data", cli=False),
    DefenseInput("base_model", "the unaligned model the aligned one was trained from (V = aligned - base)", "model",
                 ("alignment",), flag="--base-model"),
    DefenseInput("alignment_adapter", "the alignment LoRA: SafeLoRA's V = its update (instead of the base model); "
                 "SafeMERGE's safety LoRA and V; the lab's alignment stage writes it", "adapter",
                 ("alignment",), flag="--alignment-adapter"),
    DefenseInput("unaligned_model", "the aligned model made unsafe (antidote unalign): its adapter/ folder or a "
                 "model folder", "adapter", ("unalign",), flag="--unaligned-model"),
    DefenseInput("safe", "safe calibration rows (harmful prompt, safe answer)", "rows", ("safe_data",),
                 flag="--safe-data", safety="safe", samples=128),  # Safe Delta's authors calibrate on 128 rows
    DefenseInput("defense_harmful", "harmful prompts with harmful answers (RepNoise, Booster)", "rows",
                 ("defense_data.harmful",), flag="--harmful-data", stage="align", safety="unsafe",
                 disjoint_from=("poison", "harmful", "evaluation")),
    DefenseInput("defense_guide", "harmful prompts with safe answers, the alignment rows (Lisa)", "rows",
                 ("defense_data.guide",), flag="--guide-data", stage="finetune", safety="safe",
                 disjoint_from=("poison", "harmful", "evaluation")),
):
    register_input(_spec)
