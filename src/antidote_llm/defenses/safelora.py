"""SafeLoRA (Hsu et al., NeurIPS 2024): project the fine-tuning LoRA of the layers that point away from the
safety subspace onto it.

V = W_aligned - W_base spans the subspace; C = V V^T / ||V||_F is the authors' (approximate) projector;
a LoRA module whose update has a low cos(C dW, dW) gets B <- C B (A unchanged), which is exactly
dW <- C dW since dW = s B A is linear in B, so the repair stays a LoRA adapter.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

import antidote_llm.defenses.adapters as adapters
from antidote_llm.defenses.report import module_change, post_report
from antidote_llm.errors import AntidoteError
from antidote_llm.registry import Defense, DefenseContext, DefenseOutcome, register
from antidote_llm.runtime.loading import load_base_model
from antidote_llm.runtime.runinfo import Timings


@register
class SafeLoRA(Defense):
    """SafeLoRA's settings; defaults are the authors' (IBM/SafeLoRA config.py)."""

    name: ClassVar[str] = "safelora"
    description: ClassVar[str] = (
        "SafeLoRA: project the fine-tuning LoRA of low-cosine modules onto the aligned-minus-base subspace"
    )
    reads: ClassVar[tuple] = (("base_model", "alignment_adapter"),)

    select: Literal["number", "threshold"] = Field(
        default="number", description="which LoRA modules to project: the --layers lowest cosines, or cosine <= --threshold")
    layers: int = Field(default=10, ge=1, description="K: project the K LoRA modules with the lowest cosine (select number)")
    threshold: float = Field(default=0.5, ge=-1, le=1, description="tau: project the modules with cosine <= tau (select threshold)")
    projector: Literal["authors", "exact"] = Field(
        default="authors", description="authors: C = V V^T / ||V||_F as in their code (not idempotent, rescales); "
        "exact: the orthogonal projector onto V's column space")

    def knob(self) -> str | None:
        return f"K={self.layers}" if self.select == "number" else f"tau={self.threshold}"

    def apply(self, model, context: DefenseContext) -> DefenseOutcome:
        return apply_safelora(model, self, context)


# --- the math -----------------------------------------------------------------------------------------


def projection_matrix(v: torch.Tensor, projector: str = "authors") -> torch.Tensor | None:
    """C for one module (d_out x d_out); None when V = 0 (no safety subspace known there: the module is left alone)."""
    v = v.float()
    norm = torch.linalg.matrix_norm(v)
    if norm == 0:
        return None
    if projector == "authors":
        return v @ v.T / norm
    u, s, _ = torch.linalg.svd(v, full_matrices=False)
    rank = int((s > s[0] * max(v.shape) * torch.finfo(s.dtype).eps).sum())
    return u[:, :rank] @ u[:, :rank].T


def projected_cosine(c: torch.Tensor, delta: torch.Tensor) -> float | None:
    """cos(vec(C dW), vec(dW)); None for a zero update (nothing to project)."""
    projected = c @ delta
    if torch.linalg.matrix_norm(delta) == 0:
        return None
    return float(torch.nn.functional.cosine_similarity(projected.flatten(), delta.flatten(), dim=0))


def select_modules(cosines: dict[str, float], select: str, layers: int, threshold: float,
                   strict: bool = False) -> set[str]:
    """The modules to project. number: the authors' rule, tau' = the K-th smallest cosine and every module with
    cosine <= tau' (ties can add more than K); threshold: cosine <= tau, or cosine < tau when `strict`
    (SafeMERGE's rule)."""
    if not cosines:
        return set()
    if select == "number":
        threshold, strict = sorted(cosines.values())[min(layers, len(cosines)) - 1], False
    return {name for name, cos in cosines.items() if (cos < threshold if strict else cos <= threshold)}


# --- the plumbing ---------------------------------------------------------------------------------------


def _alignment_updates(modules: dict, context: DefenseContext):
    """module name -> a function giving V = W_aligned - W_base, one module at a time; every shape is checked
    here, before any change."""
    if context.alignment_adapter is not None:
        shapes, read = adapters.adapter_update_reader(context.alignment_adapter)
        where = f"alignment adapter {context.alignment_adapter}"
        found = {name: tuple(shape) for name, shape in shapes.items() if name in modules}
    else:
        base, _ = load_base_model(context.base_model)
        base_modules = dict(base.named_modules())
        where = f"base model {context.base_model.model}"
        missing = [name for name in modules if not hasattr(base_modules.get(name), "weight")]
        if missing:
            raise AntidoteError(f"{where} has no module {missing[0]}; give the base model the aligned one was trained from")
        found = {name: tuple(base_modules[name].weight.shape) for name in modules}

        def read(name: str) -> torch.Tensor:
            aligned = adapters.aligned_weight(modules[name]).detach().float()
            return aligned - base_modules[name].weight.detach().float().to(aligned.device)

    for name, shape in found.items():
        expected = tuple(adapters.aligned_weight(modules[name]).shape)
        if shape != expected:
            raise AntidoteError(f"{where} does not fit: {name} is {list(shape)} there, {list(expected)} here; "
                                "give the base model or alignment adapter of this aligned model")
    return {name: (lambda name=name: read(name)) for name in found}


def alignment_cosines(modules: dict, context: DefenseContext, projector: str, timings: Timings):
    """SafeLoRA's test of every LoRA module: (module name -> cos(C dW, dW), and a function giving a module's C
    or None). Modules with V = 0, no V, or dW = 0 have no cosine. C is d_out x d_out per module (64 MB each at
    4096): made on the fly, again for the chosen modules, never all kept at once."""
    with timings.measure("reference_s"):
        v_by_module = _alignment_updates(modules, context)

    def projector_of(name: str) -> torch.Tensor | None:
        v = v_by_module.get(name)
        device = adapters.aligned_weight(modules[name]).device
        return None if v is None else projection_matrix(v().to(device), projector)

    with timings.measure("cosines_s"):
        cosines = {}
        for name, layer in modules.items():
            c = projector_of(name)
            cos = None if c is None else projected_cosine(c, adapters.update(layer))
            if cos is not None:
                cosines[name] = cos
    return cosines, projector_of


def apply_safelora(model, config: SafeLoRA, context: DefenseContext) -> DefenseOutcome:
    adapters.require_adapter(model, "safelora")
    timings = Timings()
    modules = adapters.lora_modules(model)
    cosines, projector = alignment_cosines(modules, context, config.projector, timings)
    chosen = select_modules(cosines, config.select, config.layers, config.threshold)
    with timings.measure("projection_s"):
        report = {}
        for name, layer in modules.items():
            w = adapters.aligned_weight(layer).detach().float()
            before = w + adapters.update(layer)
            if name in chosen:
                b = layer.lora_B[adapters.FINETUNE_ADAPTER].weight
                with torch.no_grad():
                    b.copy_((projector(name) @ b.float()).to(b.dtype))
            report[name] = module_change(w, before, w + adapters.update(layer), cosine=cosines.get(name),
                                         projected=name in chosen)
    result = post_report("safelora", config, report, "adapter", timings)
    return DefenseOutcome(report=result.model_dump(mode="json"), changed_fraction=result.changed_fraction)
