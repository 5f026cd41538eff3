"""Training settings: one validated object per LoRA SFT run, and the named presets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from antidote_llm.errors import AntidoteError, validated

Stage = Literal["align", "finetune", "unalign"]


class TrainConfig(BaseModel):
    """Every knob of one LoRA SFT run; a report records it whole so a run can be repeated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lora_r: int = Field(ge=1, description="LoRA rank")
    lora_alpha: float = Field(gt=0, description="LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = Field(default=("q_proj", "k_proj", "v_proj"), min_length=1)
    learning_rate: float = Field(gt=0, description="peak learning rate (AdamW)")
    lr_scheduler: Literal[
        "cosine", "constant", "linear", "constant_with_warmup", "cosine_with_restarts", "polynomial"
    ] = Field(default="cosine", description="learning-rate schedule")
    epochs: float = Field(gt=0, description="passes over the rows")
    batch_size: int = Field(ge=1, description="rows per device per step")
    gradient_accumulation: int = Field(default=1, ge=1, description="steps accumulated per optimizer step")
    max_length: int = Field(ge=2, description="tokens per row (prompt + answer), longer rows are cut")
    seed: int = Field(default=0, description="seed of the LoRA initialisation and the batch order")
    template: Literal["alpaca", "chat", "plain"] = Field(default="alpaca", description="prompt format")
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps")
    logging_steps: int = Field(default=10, ge=1)


# The authors' scripts (Antidote repository, script/alignment/sft.sh and script/finetune/*.sh):
# AdamW, weight decay 0.1, warmup ratio 0.1, batch 5, 20 epochs, LoRA r=256 alpha=4 on q/k/v.
# Its tokenizer's model_max_length is 2048.
_PAPER = {
    "lora_r": 256, "lora_alpha": 4, "lora_dropout": 0.0, "batch_size": 5, "epochs": 20,
    "weight_decay": 0.1, "warmup_ratio": 0.1, "max_length": 2048, "template": "alpaca",
}
# Sized for SmolLM2-135M on two CPU cores: a few minutes per stage, prompts short enough that the
# Alpaca header plus the start of the answer fit.
_CPU = {
    "lora_r": 32, "lora_alpha": 32, "lora_dropout": 0.0, "batch_size": 8,
    "weight_decay": 0.0, "warmup_ratio": 0.1, "template": "alpaca", "logging_steps": 5,
}
PRESETS: dict[str, dict[str, dict]] = {
    "paper": {
        "align": {**_PAPER, "learning_rate": 1e-3, "lr_scheduler": "cosine"},
        "finetune": {**_PAPER, "learning_rate": 1e-4, "lr_scheduler": "constant"},
        # RESTA's unaligned model: no setting of the authors is public; these are the only public driver's
        # (kangyangWHU/LLMAlignment cfg/unalign_llama2_7b.yaml: LoRA r=8 alpha=16, lr 1e-3, 10 epochs, batch 10).
        "unalign": {**_PAPER, "lora_r": 8, "lora_alpha": 16, "batch_size": 10, "epochs": 10, "learning_rate": 1e-3,
                    "lr_scheduler": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0},
    },
    "cpu": {
        "align": {**_CPU, "learning_rate": 1e-3, "lr_scheduler": "cosine", "epochs": 3, "max_length": 72},
        "finetune": {**_CPU, "learning_rate": 2e-3, "lr_scheduler": "constant", "epochs": 1, "max_length": 96},
        "unalign": {**_CPU, "learning_rate": 2e-3, "lr_scheduler": "constant", "epochs": 2, "max_length": 96},
    },
}


def preset(name: str, stage: Stage, **overrides) -> TrainConfig:
    """The named preset for one stage (alignment and fine-tuning differ in lr and schedule), with overrides.

    Overrides set to None are ignored, so CLI flags left unset fall through to the preset.
    """
    if name not in PRESETS:
        raise AntidoteError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    if stage not in PRESETS[name]:
        raise AntidoteError(f"unknown stage {stage!r}; choose align, finetune or unalign")
    values = {**PRESETS[name][stage], **{k: v for k, v in overrides.items() if v is not None}}
    return validated(TrainConfig, values)


# Where a training run's loss curves go (TrainingArguments.report_to), and the extra that installs each tracker.
TRACKER_EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def tracker_names(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """`report_to` as given (a comma-separated string, a list, "none" or None), checked: each a Trainer integration
    whose package is installed. Empty for none. A ValueError names the unknown or missing one."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    values = [value] if isinstance(value, str) else list(value or ())
    names = tuple(dict.fromkeys(part.strip() for v in values for part in str(v).split(",") if part.strip()))
    if names == ("none",):
        return ()
    available = set(get_available_reporting_integrations())
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise ValueError(f"unknown report_to {name!r}; choose none or some of {', '.join(INTEGRATION_TO_CALLBACK)}")
        if name not in available:
            extra = TRACKER_EXTRAS.get(name)
            how = f"pip install 'antidote-llm[{extra}]'" if extra else f"install {name}'s package"
            raise ValueError(f"report_to {name} needs its package, which is not installed: {how}")
    return names


# A validated report_to field (pydantic): "none", "tensorboard", "tensorboard,wandb" or a list; () for none.
ReportTo = Annotated[tuple[str, ...], BeforeValidator(tracker_names)]


def report_to(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """`tracker_names` for plain callers: a bad name is a one-line AntidoteError."""
    try:
        return tracker_names(value)
    except ValueError as exc:
        raise AntidoteError(str(exc)) from None
