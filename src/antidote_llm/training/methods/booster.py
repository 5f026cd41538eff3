"""Booster (Huang et al., arXiv 2409.01586): alignment that attenuates the harmful perturbation.

Booster minimises f(w) + lambda * [h(w) - h(w - alpha * grad h(w) / ||grad h(w)||)], with f the alignment loss
and h the loss on harmful rows (harmful prompts with harmful answers): the aligned model sits where one
normalised harmful step barely lowers the harmful loss. Per step, on a harmful batch and the alignment batch:

1. g_h = grad h(w); G = its global norm over the trainable parameters + 1e-7;
2. shift the trainable weights to w - alpha * g_h / G, take g_h' = grad h there, put the weights back;
3. g_a = grad f(w); the optimizer steps on g_a + lambda * (g_h - g_h'), as in the authors' first-order code
   (the step direction is held constant). The logged loss is f(w).

Differences from the authors' code (git-disl/Booster trainer.py BoosterAlignmentTrainer): the weights are
restored by copying back the values saved before the shift, not by adding the step back (bit-exact in any
precision); the harmful batch size is a setting rather than hard-coded 10; its optional Vaccine double pass
(--perturb_aware) is left out, as the paper's main results do not use it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from antidote_llm.registry import TrainingDefense, register
from antidote_llm.training.methods.base import method_trainer_class

PRESETS = {
    # git-disl/Booster script/alignment/smooth_align.sh:14-15 (lamb=${1:-5}, alpha=${2:-0.1});
    # trainer.py:149 hard-codes the harmful batch size 10.
    "paper": {"lamb": 5.0, "alpha": 0.1, "harmful_batch_size": 10},
    # The authors' lambda and alpha: on SmolLM2 with the cpu LoRA, at the start of alignment, lambda * (g_h - g_h')
    # measured 0.43x the norm of g_a (0.045x with alpha 0.01): not negligible in a short run. The harmful
    # batch matches the user's batch of 8.
    "cpu": {"lamb": 5.0, "alpha": 0.1, "harmful_batch_size": 8},
}


def _take_gradients(model, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The parameters' gradients, then cleared for the next pass."""
    gradients = [p.grad.detach().clone() for p in params]
    model.zero_grad()
    return gradients


def _booster_trainer():
    class BoosterTrainer(method_trainer_class()):
        def training_step(self, model, inputs, num_items_in_batch=None):
            settings = self.method_settings
            harmful = self.extra_batch("defense_harmful")
            params = self.trainable_parameters()
            super().training_step(model, harmful)  # the harmful loss is a plain token mean, as the authors' is
            harmful_grads = _take_gradients(model, params)
            step = settings.alpha / (torch.nn.utils.get_total_norm(harmful_grads) + 1e-7)
            saved = [p.detach().clone() for p in params]
            try:
                with torch.no_grad():
                    for param, grad in zip(params, harmful_grads, strict=True):
                        param.sub_(grad * step.to(grad.device))
                super().training_step(model, harmful)
                shifted_grads = _take_gradients(model, params)
            finally:
                with torch.no_grad():
                    for param, value in zip(params, saved, strict=True):
                        param.copy_(value)
            loss = super().training_step(model, inputs, num_items_in_batch)
            with torch.no_grad():
                for param, grad, shifted in zip(params, harmful_grads, shifted_grads, strict=True):
                    param.grad.add_(grad - shifted, alpha=settings.lamb)
            return loss

    return BoosterTrainer


@register
class Booster(TrainingDefense):
    name: ClassVar[str] = "booster"
    stage: ClassVar[str] = "align"
    description: ClassVar[str] = (
        "Booster: align while penalising how much one normalised harmful step lowers the harmful loss "
        "(3 passes per step; needs harmful rows)"
    )
    presets: ClassVar[dict] = PRESETS
    trainer_class: ClassVar = staticmethod(_booster_trainer)
    reads: ClassVar[tuple] = (("defense_harmful",),)
    single_accumulation: ClassVar[bool] = True

    lamb: float = Field(..., ge=0, description="Booster: lambda, weight of the harmful-loss drop regulariser")
    alpha: float = Field(..., gt=0, description="Booster: L2 norm of the simulated harmful step on the trainable "
                                                 "weights")
    harmful_batch_size: int = Field(..., ge=1, description="Booster: harmful rows per step")

    def extra_batch_sizes(self) -> dict[str, int]:
        return {"defense_harmful": self.harmful_batch_size}
