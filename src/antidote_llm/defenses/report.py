"""The typed report of a post-fine-tuning peer (SafeLoRA, SafeMERGE, RESTA, Safe Delta): what changed in every module."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from antidote_llm.runtime.runinfo import RunRecord


class Report(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModuleChange(Report):
    """One weight matrix: the fine-tuning update before and after the repair, and the method's own numbers."""

    shape: list[int]
    update_norm: float  # ||W_ft - W_aligned||_F, the fine-tuning update the user's model carries
    repaired_update_norm: float  # ||W_repaired - W_aligned||_F
    changed: int  # entries of the effective weight the repair changed
    # SafeLoRA
    cosine: float | None = None  # cos(C dW, dW); None where V = 0 (no safety subspace known: left alone)
    projected: bool | None = None
    # SafeMERGE (cosine as SafeLoRA's)
    merged: bool | None = None  # the update replaced by its merge with the safety LoRA's
    # RESTA
    safety_norm: float | None = None  # ||beta (W_aligned - W_unaligned)||_F
    # Safe Delta
    accepted: int | None = None  # fine-tuning delta entries accepted within the budget
    candidates: int | None = None  # entries with a non-zero delta


class PostReport(Report, RunRecord):
    """`model`, `outputs`, `memory`, `versions` and `started_at` (RunRecord) are filled in by the CLI pipeline."""

    method: str
    settings: dict
    modules: dict[str, ModuleChange]
    changed_modules: int
    weights: int  # entries of every reported module
    changed_fraction: float  # share of them the repair changed
    output: str  # adapter (LoRA form kept) or model (dense)
    timings: dict[str, float] = {}
    inputs: dict | None = None  # filled in by the CLI pipeline too


def module_change(aligned: torch.Tensor, finetuned: torch.Tensor, repaired: torch.Tensor, **method) -> ModuleChange:
    """The report entry of one matrix from its three versions (any dtype; compared in fp32)."""
    aligned, finetuned, repaired = (t.detach().float() for t in (aligned, finetuned, repaired))
    return ModuleChange(
        shape=list(aligned.shape),
        update_norm=float(torch.linalg.matrix_norm(finetuned - aligned)),
        repaired_update_norm=float(torch.linalg.matrix_norm(repaired - aligned)),
        changed=int((repaired != finetuned).sum()),
        **method,
    )


def post_report(method: str, settings: BaseModel, modules: dict[str, ModuleChange], output: str, timings) -> PostReport:
    weights = sum(int(torch.Size(m.shape).numel()) for m in modules.values())
    changed = sum(m.changed for m in modules.values())
    return PostReport(
        method=method, settings=settings.model_dump(mode="json"), modules=modules,
        changed_modules=sum(1 for m in modules.values() if m.changed), weights=weights,
        changed_fraction=changed / weights if weights else 0.0, output=output, timings=dict(timings),
    )
