"""Interpolation back toward the aligned model: the fine-tuning update scaled, W_aligned + gamma dW.

The control every repair's frontier needs: it removes part of the whole update, harmful or not, so a repair
that selects what to remove must beat it at equal task accuracy. On a LoRA fine-tune it is exact and stays an
adapter: dW = s B A is linear in B, so B <- gamma B.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

import antidote_llm.defenses.adapters as adapters
from antidote_llm.defenses.report import module_change, post_report
from antidote_llm.registry import Defense, DefenseContext, DefenseOutcome, register
from antidote_llm.runtime.runinfo import Timings


@register
class Interpolate(Defense):
    name: ClassVar[str] = "interpolate"
    description: ClassVar[str] = (
        "interpolation toward the aligned model (W_aligned + gamma dW): the control a selective repair must beat"
    )

    gamma: float = Field(default=0.5, ge=0, le=1, description="share of the fine-tuning update kept: 1 is the "
                                                               "fine-tuned model, 0 the aligned one")

    def knob(self) -> str | None:
        return f"gamma={self.gamma:g}"

    def apply(self, model, context: DefenseContext) -> DefenseOutcome:
        return apply_interpolate(model, self, context)


def apply_interpolate(model, config: Interpolate, context: DefenseContext) -> DefenseOutcome:
    adapters.require_adapter(model, "interpolate")
    timings = Timings()
    report = {}
    with timings.measure("scale_s"):
        for name, layer in adapters.lora_modules(model).items():
            w = adapters.aligned_weight(layer).detach().float()
            before = w + adapters.update(layer)
            b = layer.lora_B[adapters.FINETUNE_ADAPTER].weight
            with torch.no_grad():
                b.mul_(config.gamma)
            report[name] = module_change(w, before, w + adapters.update(layer))
    result = post_report("interpolate", config, report, "adapter", timings)
    return DefenseOutcome(report=result.model_dump(mode="json"), changed_fraction=result.changed_fraction)
