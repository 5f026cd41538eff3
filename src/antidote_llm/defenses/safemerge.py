"""SafeMERGE (Djuhera et al., arXiv 2503.17239; github aladinD/SafeMERGE): where SafeLoRA's test says a LoRA
module's fine-tuning update points away from the safety subspace (cos(C dW, dW) < tau), replace the update by a
weighted merge of it and a safety LoRA's; elsewhere keep it.

The safety LoRA. The authors' safety LoRA is trained on safety data on top of the model the user fine-tunes
(Llama-2-chat), and their merge is W' = W_chat + 0.8 dW_ft + 0.2 dW_safe. Here the model the user fine-tunes is
the aligned model, W_aligned = W_base + dW_align, and the only safety LoRA the lab has is the alignment adapter
(the LoRA trained on refusal rows from the base), so the repair is

    W' = W_aligned + w_ft dW_ft + w_safe dW_align      on the chosen modules (w = 0.8, 0.2)
    W' = W_aligned + dW_ft                             elsewhere.

The paper's "base" is the model the user fine-tuned, so W_aligned stays whole. The alignment adapter's update
then counts 1 + w_safe times from the base (a fifth more alignment, along V itself): like the authors' safety
LoRA, a safety step on top of an already aligned model, but the alignment's own step again rather than a fresh
one (docs/differences.md). The other reading, both updates measured from the base (0.8 (dW_align + dW_ft) + 0.2
dW_align), leaves W_aligned + 0.8 dW_ft: a shrink of the fine-tune with no safety LoRA in it at all, which the
interpolation control already covers. SafeLoRA's V = aligned - base is the alignment adapter's update, so one
adapter gives both the subspace and the safety LoRA.

The merge. The authors call PEFT's "linear" combination, which weights A and B separately by sqrt(w s): its
update has cross terms sqrt(w_ft s_ft w_safe s_safe) (B_ft A_safe + B_safe A_ft) and needs equal ranks. We merge
the updates exactly by concatenating the factors (PEFT's "cat"): A' = [A_ft; A_safe], B' = [w_ft B_ft,
w_safe (s_safe / s_ft) B_safe], so s_ft B' A' = w_ft dW_ft + w_safe dW_safe. The output stays a LoRA adapter, of
rank r_ft + r_safe in every module: a module that keeps its update gets zero columns and rows, so the rank is
one number and the adapter saves and loads as a plain PEFT LoRA (no rank_pattern, which some readers refuse).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator

import antidote_llm.defenses.adapters as adapters
from antidote_llm.defenses.report import module_change, post_report
from antidote_llm.defenses.safelora import alignment_cosines, select_modules
from antidote_llm.errors import AntidoteError
from antidote_llm.registry import Defense, DefenseContext, DefenseOutcome, input_spec, register
from antidote_llm.runtime.runinfo import Timings

Factors = tuple[torch.Tensor, torch.Tensor]  # (A: r x d_in, B: d_out x r)


@register
class SafeMERGE(Defense):
    """SafeMERGE's settings; defaults are the authors' (get_safemerge_model.py: tau 0.35, weights [0.8, 0.2])."""

    name: ClassVar[str] = "safemerge"
    description: ClassVar[str] = (
        "SafeMERGE: merge the fine-tuning LoRA of low-cosine modules with the alignment (safety) LoRA, 0.8 / 0.2"
    )
    reads: ClassVar[tuple] = (("alignment_adapter",),)

    select: Literal["threshold", "number"] = Field(
        default="threshold", description="which modules to merge: cosine < --threshold (the authors'), or the "
        "--layers lowest cosines")
    threshold: float = Field(default=0.35, ge=-1, le=1, description="tau: merge the modules with cosine < tau")
    layers: int = Field(default=10, ge=1, description="K: merge the K modules with the lowest cosine (select number)")
    weights: tuple[float, float] = Field(
        default=(0.8, 0.2), description="the merge's weights of the fine-tuning and the safety update, two "
        "non-negative numbers (--weights 0.8 --weights 0.2)")
    projector: Literal["authors", "exact"] = Field(
        default="authors", description="SafeLoRA's C: the authors' V V^T / ||V||_F, or the exact projector")

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, weights: tuple[float, float]) -> tuple[float, float]:
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ValueError("two non-negative numbers: the fine-tuning update's weight, then the safety LoRA's")
        return weights

    def knob(self) -> str | None:
        chosen = f"tau={self.threshold}" if self.select == "threshold" else f"K={self.layers}"
        return f"{chosen}, w={self.weights[0]:g}/{self.weights[1]:g}"

    def apply(self, model, context: DefenseContext) -> DefenseOutcome:
        return apply_safemerge(model, self, context)


# --- the math -----------------------------------------------------------------------------------------


def merged_factors(ft: Factors, safe: Factors, weights: tuple[float, float], scalings: tuple[float, float]
                   ) -> Factors:
    """LoRA factors (A', B') of rank r_ft + r_safe with s_ft B' A' = w_ft s_ft B_ft A_ft + w_safe s_safe B_safe A_safe
    exactly (`scalings` = (s_ft, s_safe); the result keeps s_ft): A' = [A_ft; A_safe], B' = [w_ft B_ft,
    w_safe (s_safe / s_ft) B_safe]. Weights (1, 0) with zero safety factors keep the update as it was."""
    (a_ft, b_ft), (a_safe, b_safe) = ft, safe
    (w_ft, w_safe), (s_ft, s_safe) = weights, scalings
    a = torch.cat([a_ft.float(), a_safe.float()], dim=0)
    b = torch.cat([b_ft.float() * w_ft, b_safe.float() * (w_safe * s_safe / s_ft)], dim=1)
    return a, b


def kept_factors(ft: Factors, rank: int) -> Factors:
    """The fine-tuning factors padded with `rank` zero rows of A and columns of B: the same update."""
    a_ft, b_ft = ft
    return (torch.cat([a_ft.float(), a_ft.new_zeros(rank, a_ft.shape[1], dtype=torch.float32)]),
            torch.cat([b_ft.float(), b_ft.new_zeros(b_ft.shape[0], rank, dtype=torch.float32)], dim=1))


# --- the plumbing ---------------------------------------------------------------------------------------


def apply_safemerge(model, config: SafeMERGE, context: DefenseContext) -> DefenseOutcome:
    adapters.require_adapter(model, "safemerge")
    if context.alignment_adapter is None:
        raise AntidoteError(f"safemerge merges with a safety LoRA: give the alignment adapter with "
                            f"{input_spec('alignment_adapter').flag}")
    adapters.require_plain_lora(model, "safemerge")
    timings = Timings()
    modules = adapters.lora_modules(model)
    safe_scaling, safe_rank, read_safe = adapters.adapter_factor_reader(context.alignment_adapter)
    cosines, _ = alignment_cosines(modules, context, config.projector, timings)
    if not cosines:
        raise AntidoteError(f"alignment adapter {context.alignment_adapter} shares no LoRA module with a non-zero "
                            "update of the fine-tuning adapter; give the alignment adapter of this aligned model")
    chosen = select_modules(cosines, config.select, config.layers, config.threshold, strict=True)
    with timings.measure("merge_s"):
        report = {}
        for name, layer in modules.items():
            w = adapters.aligned_weight(layer).detach().float()
            before = w + adapters.update(layer)
            if chosen:  # every module gets rank r_ft + r_safe, so the adapter keeps one rank
                ft = adapters.factors(layer)
                scaling = layer.scaling[adapters.FINETUNE_ADAPTER]
                a, b = (merged_factors(ft, read_safe(name), config.weights, (scaling, safe_scaling)) if name in chosen
                        else kept_factors(ft, safe_rank))
                adapters.set_factors(layer, a, b)
            report[name] = module_change(w, before, w + adapters.update(layer), cosine=cosines.get(name),
                                         merged=name in chosen)
        if chosen:
            adapters.set_rank(model, next(iter(modules.values())).r[adapters.FINETUNE_ADAPTER])
    result = post_report("safemerge", config, report, "adapter", timings)
    return DefenseOutcome(report=result.model_dump(mode="json"), changed_fraction=result.changed_fraction)
