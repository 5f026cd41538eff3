"""Safe Delta (Lu et al., ICML 2025): start from the aligned weights and accept fine-tuning deltas, least
safety-sensitive first, while an OBS estimate of the safety-loss increase stays within a budget; then
compensate the remaining weights (OBS error feedback), as SparseGPT does for pruning.

The Hessian of each Linear comes from safe calibration rows (harmful prompt, safe answer) run through the
aligned model, one decoder layer at a time, so memory stays near one layer's Hessians. Only modules the
fine-tuning changed are touched (elsewhere the delta is zero and the authors' sweep leaves W unchanged).
"""

from __future__ import annotations

import contextlib
from typing import ClassVar, Literal

import torch
from pydantic import Field

import antidote_llm.defenses.adapters as adapters
from antidote_llm.data.templates import DEFAULT_MAX_LENGTH, encode_pair, fit_max_length
from antidote_llm.defenses.report import module_change, post_report
from antidote_llm.errors import AntidoteError
from antidote_llm.registry import Defense, DefenseContext, DefenseOutcome, register
from antidote_llm.runtime.loading import model_positions
from antidote_llm.runtime.runinfo import Timings

REFERENCE_ROWS = 4096  # the authors scale the budget by rows / 4096 (Llama-2-7B's width)


@register
class SafeDelta(Defense):
    """Safe Delta's settings; defaults are the authors' (ColinLu50/SafeDelta llama2/run_safedelta.py)."""

    name: ClassVar[str] = "safe-delta"
    description: ClassVar[str] = (
        "Safe Delta: accept fine-tuning deltas within an OBS safety budget, compensate the rest"
    )
    reads: ClassVar[tuple] = (("safe",),)

    scale: float = Field(default=0.1, ge=0, description="s: the safety budget's scale (the authors' default 0.1; "
                         "0.11 in their PureBad script); 0 keeps the aligned weights")
    damp: float = Field(default=0.01, gt=0, description="Hessian dampening, a fraction of its mean diagonal")
    block_size: int = Field(default=2048, ge=1, description="columns per budget block")
    sub_block: int = Field(default=4, ge=1, description="columns accepted together before compensating the rest")
    exclude: float = Field(default=0.15, ge=0, lt=1, description="share of the most safety-sensitive entries never accepted")
    template: Literal["alpaca", "chat", "plain"] = Field(default="alpaca", description="prompt format of the calibration rows")
    max_length: int | None = Field(default=None, gt=0, description=f"tokens per calibration row (default: "
                                   f"min({DEFAULT_MAX_LENGTH}, the model's positions); past them is refused)")

    def knob(self) -> str | None:
        return f"s={self.scale}"

    def apply(self, model, context: DefenseContext) -> DefenseOutcome:
        return apply_safe_delta(model, self, context)


# --- the math -----------------------------------------------------------------------------------------


def damped_hessian(h: torch.Tensor, damp: float) -> torch.Tensor:
    """H with dead inputs (zero diagonal) set to 1 and damp * mean(diag H) added to the diagonal, as the authors."""
    h = h.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], device=h.device)
    return h


def inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U): row j of U / U_jj is the OBS update of the columns
    after j when column j is fixed."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def safe_delta_matrix(
    aligned: torch.Tensor, finetuned: torch.Tensor, hessian: torch.Tensor, scale: float, *,
    damp: float = 0.01, block_size: int = 2048, sub_block: int = 4, exclude: float = 0.15,
) -> tuple[torch.Tensor, int, int]:
    """(repaired weight [out, in], deltas accepted, non-zero deltas) for one Linear, the authors' sweep.

    Per block of columns: the cost of adopting entry (i, j) is (W_ft - W)_ij^2 / d_j^2 with d = diag(U);
    entries are taken by ascending sensitivity 1/d_j^2 (stable order), the `exclude` most sensitive never,
    while the summed cost stays within mean(1/d^2) * s * (block_size / 4096) * rows / 4096 (the authors'
    s / 2 at their block size 2048). Then `sub_block` columns at a time: accepted entries take W_ft and the
    error (w - q) / d is subtracted through U from the columns not yet swept.
    """
    w_all = aligned.float().clone()
    target = finetuned.float()
    u = inverse_factor(damped_hessian(hessian, damp))
    rows, columns = w_all.shape
    budget_scale = scale * (block_size / REFERENCE_ROWS) * rows / REFERENCE_ROWS
    accepted = 0
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        w = w_all[:, i1:i2].clone()
        goal = target[:, i1:i2]
        u1 = u[i1:i2, i1:i2]
        d = torch.diag(u1)
        sensitivity = (1 / d ** 2).expand(rows, -1)
        cost = ((goal - w) ** 2 / d ** 2).flatten()
        order = torch.argsort(sensitivity.flatten(), stable=True)
        order = order[: order.numel() - int(exclude * order.numel())]
        within = torch.cumsum(cost[order], dim=0) <= sensitivity.mean() * budget_scale
        mask = torch.zeros(cost.numel(), dtype=torch.bool, device=w.device)
        mask[order] = within
        mask = mask.reshape(rows, -1)
        accepted += int((mask & (goal != w)).sum())
        swept = torch.zeros_like(w)
        errors = torch.zeros_like(w)
        for j1 in range(0, i2 - i1, sub_block):
            j2 = min(j1 + sub_block, i2 - i1)
            q = torch.where(mask[:, j1:j2], goal[:, j1:j2], w[:, j1:j2])
            error = (w[:, j1:j2] - q) / d[j1:j2]
            w[:, j2:] -= error @ u1[j1:j2, j2:]
            swept[:, j1:j2] = q
            errors[:, j1:j2] = error
        w_all[:, i1:i2] = swept
        w_all[:, i2:] -= errors @ u[i1:i2, i2:]
    return w_all, accepted, int((target != aligned.float()).sum())


# --- the plumbing ---------------------------------------------------------------------------------------


class _Caught(Exception):
    """Raised by the hook on the first decoder layer once it has seen its inputs: the rest of the pass is not needed."""


def decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """(module path, the decoder layers) of a Llama-like causal LM, PEFT-wrapped or not."""
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = {id(module): name for name, module in root.named_modules()}
    decoder = root.get_decoder() if hasattr(root, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise AntidoteError("safe-delta needs a decoder with a list of layers (model.layers, as Llama, Mistral, Qwen, Gemma)")
    return names[id(layers)], layers


def _first_layer_inputs(model, layer, rows: list[torch.Tensor]) -> list[tuple[torch.Tensor, dict]]:
    """The hidden states and keyword arguments (mask, positions, rotary embeddings) each row brings to `layer`."""
    captured = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Caught

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in rows:
            with contextlib.suppress(_Caught):
                model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return captured


def _hessian_hooks(modules: dict, hessians: dict, counts: dict):
    def hook(name):
        def accumulate(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            hessians[name] += x.T @ x
            counts[name] += 1  # one calibration row per forward, as the authors' batch size 1

        return accumulate

    return [module.register_forward_hook(hook(name)) for name, module in modules.items()]


def apply_safe_delta(model, config: SafeDelta, context: DefenseContext) -> DefenseOutcome:
    from peft.tuners.lora import LoraLayer

    adapters.require_adapter(model, "safe-delta")
    pairs = context.safe.pairs
    if not pairs:
        raise AntidoteError("safe-delta needs safe calibration rows (harmful prompt, safe answer); the set is empty")
    timings = Timings()
    prefix, layers = decoder_layers(model)
    device = next(model.parameters()).device
    max_length = fit_max_length(config.max_length, model_positions(model))
    rows = [torch.tensor([encode_pair(context.tokenizer, config.template, p.prompt, p.response, p.input,
                                      max_length).input_ids], device=device) for p in pairs]
    report = {}
    with torch.no_grad(), model.disable_adapter():  # the calibration runs through the aligned model
        with timings.measure("calibration_s"):
            inputs = _first_layer_inputs(model, layers[0], rows)
        for index, layer in enumerate(layers):
            modules = {f"{prefix}.{index}.{name}": module for name, module in layer.named_modules()
                       if isinstance(module, LoraLayer) and adapters.FINETUNE_ADAPTER in module.lora_A}
            hessians = {name: torch.zeros(m.in_features, m.in_features, device=device) for name, m in modules.items()}
            counts = dict.fromkeys(modules, 0)
            handles = _hessian_hooks(modules, hessians, counts)
            try:
                with timings.measure("calibration_s"):
                    outputs = []
                    for hidden, kwargs in inputs:
                        out = layer(hidden, **kwargs)
                        outputs.append(((out[0] if isinstance(out, tuple) else out), kwargs))
            finally:
                for handle in handles:
                    handle.remove()
            with timings.measure("sweep_s"):
                for name, module in modules.items():
                    aligned = adapters.aligned_weight(module).detach().float().clone()
                    finetuned = aligned + adapters.update(module)
                    repaired, accepted, candidates = safe_delta_matrix(
                        aligned, finetuned, 2 * hessians.pop(name) / max(counts[name], 1), config.scale, damp=config.damp,
                        block_size=config.block_size, sub_block=config.sub_block, exclude=config.exclude,
                    )
                    adapters.fold(module, repaired)
                    report[name] = module_change(aligned, finetuned, repaired, accepted=accepted, candidates=candidates)
            inputs = outputs
    result = post_report("safe-delta", config, report, "model", timings)
    return DefenseOutcome(report=result.model_dump(mode="json"), changed_fraction=result.changed_fraction)
