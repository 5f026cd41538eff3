"""How a training-stage defense runs: its Trainer base, the rows of its inputs, and the MethodRun a stage carries.

A defense that changes how the model is aligned (Vaccine, RepNoise, Booster) or how the user's fine-tuning
runs (Lisa, LDIFS) is a subclass of the project's SFT trainer with its own `training_step` or
`compute_loss`. Everything it needs lives on the trainer instance (no module state), its extra rows come
through dataloaders built once by the accelerator, so it runs unchanged under `accelerate launch`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from antidote_llm.data.records import Rows
from antidote_llm.errors import AntidoteError
from antidote_llm.registry import TrainingDefense, input_spec
from antidote_llm.training.trainer import sft_trainer_class


@dataclass(frozen=True)
class MethodRun:
    """A training-stage defense as one stage runs it: the defense (its settings) and its extra rows by input name."""

    defense: TrainingDefense
    extra: dict[str, Rows] = field(default_factory=dict)

    def check(self, gradient_accumulation: int) -> None:
        """Refuse, before any training, what this defense cannot run with."""
        name = self.defense.name
        missing = [spec for options in self.defense.inputs() for spec in map(input_spec, options)
                   if spec.name not in self.extra]
        if missing:
            raise AntidoteError(f"defense {name!r} needs " + " and ".join(f"{spec.flag} ({spec.help})" for spec in missing))
        if self.defense.single_accumulation and gradient_accumulation != 1:
            raise AntidoteError(f"defense {name!r} runs with gradient accumulation 1 only "
                                f"(it clears gradients inside a step); set --gradient-accumulation 1")


def method_trainer_class():
    """The base of every method's Trainer: the SFT trainer plus the method's settings and extra dataloaders."""
    from torch.utils.data import DataLoader

    class MethodTrainer(sft_trainer_class()):
        def __init__(self, *args, method_settings: TrainingDefense, extra_items: dict[str, list[dict]] | None = None,
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.method_settings = method_settings
            self._extra_items = extra_items or {}
            self._extra_batch_sizes = method_settings.extra_batch_sizes()
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
