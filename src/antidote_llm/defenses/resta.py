"""RESTA (Bhardwaj, Do & Poria, ACL 2024): restore safety by adding a safety vector to the fine-tuned model,

    theta_resta = theta_ft + beta (theta_aligned - theta_unaligned),

where theta_unaligned is the aligned model after a short harmful fine-tuning (`antidote unalign`). With
both the fine-tuning and the unalignment as LoRAs on the aligned model the sum is an adapter again, built
exactly by concatenation (PEFT's `cat`: A = [A_F; A_U], B = [s_F B_F, -beta s_U B_U]); PEFT's `linear`
would mix A and B separately (cross terms, and a square root that fails on the negative weight).
DARE (drop and rescale) on the dense fine-tuning update is an option; it leaves LoRA form, so the output
is then a full model.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from pydantic import Field

import antidote_llm.defenses.adapters as adapters
from antidote_llm.defenses.report import module_change, post_report
from antidote_llm.errors import AntidoteError
from antidote_llm.registry import Defense, DefenseContext, DefenseOutcome, register
from antidote_llm.runtime.loading import ModelSource, check_adapter_fits, load_base_model
from antidote_llm.runtime.runinfo import Timings

UNALIGNED_ADAPTER = "unaligned"
RESTA_ADAPTER = "resta"


@register
class Resta(Defense):
    name: ClassVar[str] = "resta"
    description: ClassVar[str] = (
        "RESTA: add the safety vector beta (aligned - unaligned) to the fine-tuned model"
    )
    reads: ClassVar[tuple] = (("unaligned_model",),)

    beta: float = Field(default=1.0, description="weight of the safety vector theta_aligned - theta_unaligned "
                        "(1 in the only public driver of the authors' merge)")
    dare_drop: float = Field(default=0.0, ge=0, lt=1, description="DARE on the dense fine-tuning update: drop each "
                             "entry with this probability and rescale the rest by 1/(1-p); 0: off")
    seed: int = Field(default=0, description="seed of the DARE drop")

    def knob(self) -> str | None:
        return f"beta={self.beta}" + (f", dare={self.dare_drop}" if self.dare_drop else "")

    def apply(self, model, context: DefenseContext) -> DefenseOutcome:
        return apply_resta(model, self, context)


# --- the math -----------------------------------------------------------------------------------------


def add_safety_vector(finetuned: torch.Tensor, aligned: torch.Tensor, unaligned: torch.Tensor, beta: float) -> torch.Tensor:
    return finetuned + beta * (aligned - unaligned)


def dare(delta: torch.Tensor, drop: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability `drop`, rescale the kept ones by 1/(1 - drop): the same update in expectation."""
    if drop == 0:
        return delta
    keep = torch.rand(delta.shape, generator=generator) >= drop
    return delta * keep.to(delta.device) / (1 - drop)


# --- the plumbing ---------------------------------------------------------------------------------------


def _dtype_name(model) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def _with_unaligned_adapter(model, config: Resta, path: str, timings: Timings):
    """theta_unaligned = theta_aligned + the LoRA at `path`: the safety vector is minus that LoRA's update.
    One module's dense matrices at a time (for the report, and for DARE's dense sum)."""
    check_adapter_fits(model.get_base_model(), path)
    model.load_adapter(path, adapter_name=UNALIGNED_ADAPTER)
    modules = {**adapters.lora_modules(model, UNALIGNED_ADAPTER), **adapters.lora_modules(model)}
    dense = config.dare_drop > 0
    if dense:
        only_unaligned = sorted(name for name, layer in modules.items() if adapters.FINETUNE_ADAPTER not in layer.lora_A)
        if only_unaligned:
            raise AntidoteError(f"the unaligned adapter changes {only_unaligned[0]}, which the fine-tuning adapter does "
                                "not; with --dare-drop give adapters on the same modules")
    generator = torch.Generator().manual_seed(config.seed)
    report = {}
    with timings.measure("arithmetic_s"):
        if not dense:
            model.add_weighted_adapter([adapters.FINETUNE_ADAPTER, UNALIGNED_ADAPTER], [1.0, -config.beta], RESTA_ADAPTER,
                                       combination_type="cat")
        for name, layer in modules.items():
            aligned = adapters.aligned_weight(layer).detach().float()
            zero = torch.zeros_like(aligned)
            ft = adapters.update(layer) if adapters.FINETUNE_ADAPTER in layer.lora_A else zero
            safety = -adapters.update(layer, UNALIGNED_ADAPTER) if UNALIGNED_ADAPTER in layer.lora_A else zero
            if dense:
                repaired = aligned + dare(ft, config.dare_drop, generator) + config.beta * safety
            else:
                repaired = aligned + adapters.update(layer, RESTA_ADAPTER)
            report[name] = module_change(aligned, aligned + ft, repaired,
                                         safety_norm=float(torch.linalg.matrix_norm(config.beta * safety)))
            if dense:
                adapters.fold(layer, repaired)
        if not dense:
            model.set_adapter(RESTA_ADAPTER)
            model.delete_adapter(adapters.FINETUNE_ADAPTER)
        model.delete_adapter(UNALIGNED_ADAPTER)
    return report, "model" if dense else "adapter"


def _with_unaligned_model(model, config: Resta, path: str, timings: Timings):
    """theta_unaligned is a full model: every weight moves by beta (theta_aligned - theta_unaligned)."""
    device = next(model.parameters()).device
    unaligned, _ = load_base_model(ModelSource(path, dtype=_dtype_name(model), device=str(device)))
    theirs = dict(unaligned.named_parameters())
    ours = {name.replace(".base_layer", ""): param for name, param in model.get_base_model().named_parameters()
            if "lora_" not in name}
    for name, param in ours.items():
        if name not in theirs or theirs[name].shape != param.shape:
            shape = list(theirs[name].shape) if name in theirs else None
            raise AntidoteError(f"unaligned model {path} does not fit: {name} is {list(param.shape)} here, {shape} there; "
                                "give the unaligned model made from this aligned model")
    generator = torch.Generator().manual_seed(config.seed)
    lora = {f"{name}.weight": layer for name, layer in adapters.lora_modules(model).items()}
    report = {}
    with timings.measure("arithmetic_s"), torch.no_grad():
        for name, param in ours.items():
            aligned = param.detach().float().clone()
            layer = lora.get(name)
            ft = adapters.update(layer) if layer is not None else torch.zeros_like(aligned)
            repaired = add_safety_vector(aligned + dare(ft, config.dare_drop, generator), aligned, theirs[name].float(), config.beta)
            if layer is not None:
                adapters.fold(layer, repaired)
            else:
                param.copy_(repaired.to(param.dtype))
            if param.dim() == 2:
                report[name.removesuffix(".weight")] = module_change(
                    aligned, aligned + ft, repaired,
                    safety_norm=float(torch.linalg.matrix_norm(config.beta * (aligned - theirs[name].float()))))
    return report, "model"


def apply_resta(model, config: Resta, context: DefenseContext) -> DefenseOutcome:
    adapters.require_adapter(model, "resta")
    timings = Timings()
    path = Path(context.unaligned_model)
    if not path.exists():
        raise AntidoteError(f"unaligned model not found: {path}; make one with antidote unalign")
    if (path / "adapter_config.json").is_file():
        report, output = _with_unaligned_adapter(model, config, str(path), timings)
    else:
        report, output = _with_unaligned_model(model, config, str(path), timings)
    result = post_report("resta", config, report, output, timings)
    return DefenseOutcome(report=result.model_dump(mode="json"), changed_fraction=result.changed_fraction)
