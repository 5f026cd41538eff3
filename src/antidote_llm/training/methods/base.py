"""What a training-stage defense is: its settings, its presets, the extra rows it reads and its Trainer.

A defense that changes how the model is aligned (Vaccine, RepNoise, Booster) or how the user's fine-tuning
runs (Lisa, LDIFS) is a subclass of the project's SFT trainer with its own `training_step` or
`compute_loss`. Everything it needs lives on the trainer instance (no module state), its extra rows come
through dataloaders built once by the accelerator, so it runs unchanged under `accelerate launch`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from antidote_llm.data.records import Rows
from antidote_llm.errors import AntidoteError, validated
from antidote_llm.training.trainer import sft_trainer_class

MethodStage = Literal["align", "finetune"]
ExtraRole = Literal["harmful", "guide"]
# What each role's rows are; a method lists the roles it reads in TrainingMethod.extra_data.
EXTRA_ROLES: dict[str, str] = {
    "harmful": "harmful prompts with harmful answers (RepNoise, Booster)",
    "guide": "harmful prompts with safe answers, the alignment rows (Lisa)",
}


class MethodSettings(BaseModel):
    """Base of every method's settings: validated, frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class TrainingMethod:
    """A registered training-stage defense.

    `trainer()` returns the Trainer subclass (built lazily so importing the registry does not import
    transformers); it is constructed with the SFT trainer's arguments plus `method_settings` and
    `extra_items` (role -> tokenized rows). `presets` holds at least `paper` (the authors' script) and `cpu`.
    """

    name: str
    stage: MethodStage
    description: str
    settings: type[MethodSettings]
    presets: dict[str, dict]
    trainer: Callable[[], type]
    extra_data: tuple[ExtraRole, ...] = ()
    # It calls zero_grad inside a step or counts micro-steps, so gradient accumulation must be 1 (as the authors ran it).
    single_accumulation: bool = False
    extra_batch_sizes: dict[str, int] = field(default_factory=dict)  # role -> batch size, when not the user's

    def configure(self, preset: str = "paper", **overrides) -> MethodSettings:
        """The method's settings from a named preset, with overrides (None values fall through to the preset)."""
        if preset not in self.presets:
            raise AntidoteError(f"defense {self.name!r} has no preset {preset!r}; choose one of {', '.join(self.presets)}")
        given = {key: value for key, value in overrides.items() if value is not None}
        unknown = sorted(set(given) - set(self.settings.model_fields))
        if unknown:
            raise AntidoteError(f"defense {self.name!r} has no option {', '.join(unknown)}; "
                                f"its options: {', '.join(self.settings.model_fields)}")
        return validated(self.settings, {**self.presets[preset], **given})


@dataclass(frozen=True)
class MethodRun:
    """A training-stage defense as one stage runs it: the method, its settings and its extra rows by role."""

    method: TrainingMethod
    settings: MethodSettings
    extra: dict[str, Rows] = field(default_factory=dict)

    def check(self, gradient_accumulation: int) -> None:
        """Refuse, before any training, what this method cannot run with."""
        missing = [role for role in self.method.extra_data if role not in self.extra]
        if missing:
            raise AntidoteError(f"defense {self.method.name!r} needs {' and '.join(missing)} rows "
                                f"({'; '.join(EXTRA_ROLES[r] for r in missing)}); give them with "
                                + " and ".join(f"--{r}-data" for r in missing))
        if self.method.single_accumulation and gradient_accumulation != 1:
            raise AntidoteError(f"defense {self.method.name!r} runs with gradient accumulation 1 only "
                                f"(it clears gradients inside a step); set --gradient-accumulation 1")


def method_trainer_class():
    """The base of every method's Trainer: the SFT trainer plus the method's settings and extra dataloaders."""
    from torch.utils.data import DataLoader

    class MethodTrainer(sft_trainer_class()):
        def __init__(self, *args, method_settings: MethodSettings, extra_items: dict[str, list[dict]] | None = None,
                     extra_batch_sizes: dict[str, int] | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.method_settings = method_settings
            self._extra_items = extra_items or {}
            self._extra_batch_sizes = extra_batch_sizes or {}
            self._extra_batches: dict[str, Iterator[dict]] = {}

        def extra_batch(self, role: str) -> dict:
            """The next batch of the `role` rows, on the model's device. The loader is built once through the
            accelerator (sharded across processes) and restarts, reshuffled, when exhausted."""
            if role not in self._extra_batches:
                items = self._extra_items.get(role)
                if not items:
                    raise AntidoteError(f"no {role} rows were given to {type(self).__name__}")
                loader = DataLoader(
                    items, batch_size=self._extra_batch_sizes.get(role, self.args.per_device_train_batch_size),
                    shuffle=True, collate_fn=self.data_collator,
                    generator=torch.Generator().manual_seed(self.args.seed),
                )
                self._extra_batches[role] = _endless(self.accelerator.prepare(loader))
            return self._prepare_inputs(next(self._extra_batches[role]))

        def trainable_parameters(self) -> list[torch.nn.Parameter]:
            return [p for p in self.model.parameters() if p.requires_grad]

    return MethodTrainer


def causal_lm(model):
    """The bare causal LM inside DistributedDataParallel and PEFT wrappers."""
    while hasattr(model, "module"):  # DistributedDataParallel
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_blocks(model, part: str, method: str) -> list[torch.nn.Module]:
    """The `part` (self_attn, mlp) of every decoder layer, found by path through the wrappers (not by class name,
    so Llama, Mistral, Qwen, Gemma and their attention variants all work)."""
    lm = causal_lm(model)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    blocks = [getattr(layer, part, None) for layer in getattr(decoder, "layers", None) or ()]
    if not blocks or any(block is None for block in blocks):
        raise AntidoteError(f"{method} needs each decoder layer's `{part}` (model.layers[i].{part}, as in Llama, "
                            f"Mistral, Qwen, Gemma); {type(lm).__name__} has none")
    return blocks


def main_output(output) -> torch.Tensor:
    """The hidden states a decoder block returns, alone or first in a tuple (the layout varies by version)."""
    return output[0] if isinstance(output, tuple) else output


def _endless(loader) -> Iterator[dict]:
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1
