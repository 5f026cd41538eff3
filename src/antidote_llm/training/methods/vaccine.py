"""Vaccine (Huang et al., arXiv 2402.01109): perturbation-aware safety alignment.

Harmful fine-tuning breaks alignment by drifting the hidden states, so Vaccine aligns the model under the
worst norm-bounded drift of every decoder layer's self-attention output, found by one ascent step:

1. forward and backward on the alignment batch, capturing g_l = dL/d(attention output of layer l);
2. eps_l = rho * g_l / (G + 1e-7) with G the ONE global norm of all g_l (over layers, rows and tokens);
3. clear the gradients, forward and backward again with eps_l added to each attention output; the optimizer
   steps on these gradients and the logged loss is this perturbed loss.

Differences from the authors' code (git-disl/Vaccine trainer.py VaccineTrainer; the same in git-disl/Antidote):
the attention blocks are found through the model's decoder layers rather than by isinstance on
LlamaAttention/OPTAttention (so Qwen, Gemma, SmolLM2 and the SDPA variants work), the gradient is captured by a
tensor hook instead of the deprecated Module.register_backward_hook, and the perturbation is added by returning
a new output from the forward hook instead of assigning `.data`. Layers the loss sends no gradient to get no
perturbation, as in the original (its stored gradient stays 0).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import ClassVar

import torch
from pydantic import Field

from antidote_llm.errors import AntidoteError
from antidote_llm.registry import TrainingDefense, register
from antidote_llm.training.methods.base import (
    decoder_blocks,
    main_output,
    method_trainer_class,
)

PRESETS = {
    # git-disl/Antidote script/alignment/vaccine.sh:14 RHO=${1:-2} (git-disl/Vaccine train.py:253 defaults to 2 too).
    "paper": {"rho": 2.0},
    # The authors' value: the norm is global over rows, tokens and layers, and on SmolLM2 with a batch of 8
    # alignment rows it is 0.03% of the attention outputs' total norm (3% of layer 0's, where most of it goes).
    "cpu": {"rho": 2.0},
}


def attention_modules(model) -> list[torch.nn.Module]:
    return decoder_blocks(model, "self_attn", "vaccine")


def perturbations(gradients: dict[int, torch.Tensor], rho: float) -> dict[int, torch.Tensor]:
    """The ascent step on the attention outputs: each gradient scaled by rho over their one global norm."""
    scale = rho / (torch.nn.utils.get_total_norm(list(gradients.values())) + 1e-7)
    return {layer: gradient * scale for layer, gradient in gradients.items()}


def _capture_gradient(gradients: dict[int, torch.Tensor], layer: int):
    def hook(module, args, output):
        hidden = main_output(output)
        if hidden.requires_grad:  # under reentrant checkpointing, only the recomputation carries a graph
            hidden.register_hook(lambda grad: gradients.__setitem__(layer, grad.detach()))

    return hook


def _add_perturbation(perturbation: torch.Tensor):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + perturbation, *output[1:])
        return output + perturbation

    return hook


@contextmanager
def _forward_hooks(hooks: dict[torch.nn.Module, Callable]):
    handles = []
    try:
        for module, hook in hooks.items():
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _vaccine_trainer():
    class VaccineTrainer(method_trainer_class()):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.attentions = attention_modules(self.model)

        def training_step(self, model, inputs, num_items_in_batch=None):
            gradients: dict[int, torch.Tensor] = {}
            with _forward_hooks({attention: _capture_gradient(gradients, layer)
                                 for layer, attention in enumerate(self.attentions)}):
                super().training_step(model, inputs, num_items_in_batch)
            model.zero_grad()  # the optimizer must see the perturbed pass's gradients only
            if not gradients:
                raise AntidoteError("Vaccine found no gradient on any attention output; train a LoRA on modules "
                                    "inside or before the attention blocks (e.g. q_proj, k_proj, v_proj)")
            eps = perturbations(gradients, self.method_settings.rho)
            with _forward_hooks({self.attentions[layer]: _add_perturbation(e) for layer, e in eps.items()}):
                return super().training_step(model, inputs, num_items_in_batch)

    return VaccineTrainer


@register
class Vaccine(TrainingDefense):
    name: ClassVar[str] = "vaccine"
    stage: ClassVar[str] = "align"
    description: ClassVar[str] = "Vaccine: align under the worst norm-rho perturbation of every attention output (2 passes per step)"
    presets: ClassVar[dict] = PRESETS
    trainer_class: ClassVar = staticmethod(_vaccine_trainer)
    single_accumulation: ClassVar[bool] = True

    rho: float = Field(..., gt=0, description="Vaccine: L2 norm of the perturbation of all attention outputs of a "
                                                 "batch together (rows, tokens and layers)")
