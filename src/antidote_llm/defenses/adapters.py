"""Plumbing the post-fine-tuning peers share: the live fine-tuning LoRA on the aligned model, read and written.

In the authors' protocol the user's fine-tuning is a LoRA on the merged aligned model, so with that adapter
kept live each LoRA module holds both weights a repair compares: the aligned W (its base layer) and the
fine-tuning update dW (the adapter). A repair that leaves LoRA form folds its result into the base layer
and zeroes the adapter, so the model stays one object the lab evaluates and the CLI saves.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from antidote_llm.errors import AntidoteError
from antidote_llm.runtime.checkpoints import LoraAdapter

FINETUNE_ADAPTER = "default"  # the name load_model gives the live fine-tuning adapter


def require_adapter(model, method: str) -> None:
    if not hasattr(model, "peft_config") or FINETUNE_ADAPTER not in model.peft_config:
        raise AntidoteError(
            f"{method} repairs a LoRA fine-tune: give the aligned model with --model and the fine-tuning adapter with --adapter"
        )


def lora_modules(model, adapter: str = FINETUNE_ADAPTER) -> dict[str, torch.nn.Module]:
    """Module name (as in the bare model: model.layers.0.self_attn.q_proj) -> PEFT LoRA layer holding `adapter`."""
    from peft.tuners.lora import LoraLayer

    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {name: module for name, module in root.named_modules()
            if isinstance(module, LoraLayer) and adapter in module.lora_A}


def aligned_weight(layer) -> torch.Tensor:
    """The aligned weight under a LoRA layer (its base layer, never changed by the adapter)."""
    return layer.get_base_layer().weight


def update(layer, adapter: str = FINETUNE_ADAPTER) -> torch.Tensor:
    """The adapter's dense update s*B*A in fp32, in the base weight's layout."""
    return layer.get_delta_weight(adapter).float()


def factors(layer, adapter: str = FINETUNE_ADAPTER) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's factors (A: r x d_in, B: d_out x r) in fp32; its update is scaling * B @ A."""
    return layer.lora_A[adapter].weight.detach().float(), layer.lora_B[adapter].weight.detach().float()


def require_plain_lora(model, method: str, adapter: str = FINETUNE_ADAPTER) -> None:
    """Refuse a fine-tuning adapter whose factors a repair cannot rewrite as a plain LoRA of one rank."""
    config = model.peft_config[adapter]
    unusual = [key for key in ("rank_pattern", "alpha_pattern", "use_dora", "lora_bias") if getattr(config, key, None)]
    if unusual:
        raise AntidoteError(f"{method} rewrites the fine-tuning adapter's factors: give a plain LoRA adapter "
                            f"(this one uses {', '.join(unusual)})")
    for name, layer in lora_modules(model, adapter).items():
        if not isinstance(layer.lora_A[adapter], torch.nn.Linear):
            raise AntidoteError(f"{method} rewrites LoRA factors of linear layers; {name} is a {type(layer).__name__}")


def set_factors(layer, a: torch.Tensor, b: torch.Tensor, adapter: str = FINETUNE_ADAPTER) -> None:
    """Make (a, b) the adapter's factors in this module, of any rank r' (a: r' x d_in, b: d_out x r'); its
    scaling is kept, so the update becomes scaling * b @ a. Call `set_rank` once every module has rank r'."""
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    with torch.no_grad():
        for linear, value in ((lora_a, a), (lora_b, b)):
            old = linear.weight
            linear.weight = torch.nn.Parameter(value.to(dtype=old.dtype, device=old.device), requires_grad=old.requires_grad)
    lora_a.out_features = lora_b.in_features = a.shape[0]
    layer.r[adapter] = a.shape[0]
    layer.lora_alpha[adapter] = _alpha(layer.scaling[adapter], a.shape[0], layer.use_rslora.get(adapter, False))


def set_rank(model, rank: int, adapter: str = FINETUNE_ADAPTER) -> None:
    """Record rank r' in the adapter's config, with the lora_alpha that keeps its scaling (so the adapter saves
    as a plain LoRA of rank r' that loads with the same update); every module must hold rank r' (set_factors)."""
    layers = lora_modules(model, adapter)
    wrong = [name for name, layer in layers.items() if layer.r[adapter] != rank]
    if wrong:
        raise AntidoteError(f"internal: {wrong[0]} has rank {layers[wrong[0]].r[adapter]}, not {rank}")
    config = model.peft_config[adapter]
    scaling = next(iter(layers.values())).scaling[adapter] if layers else config.lora_alpha / config.r
    config.r, config.lora_alpha = rank, _alpha(scaling, rank, bool(config.use_rslora))


def _alpha(scaling: float, rank: int, rslora: bool) -> float:
    """The lora_alpha giving `scaling` at `rank` (PEFT: alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    return scaling * (math.sqrt(rank) if rslora else rank)


def fold(layer, weight: torch.Tensor) -> None:
    """Make `weight` the module's effective weight: it becomes the base weight and the fine-tuning adapter is zeroed."""
    with torch.no_grad():
        base = aligned_weight(layer)
        base.copy_(weight.to(base.dtype))
        layer.lora_B[FINETUNE_ADAPTER].weight.zero_()


def adapter_factor_reader(path: str | Path):
    """A saved PEFT LoRA adapter's factors read lazily: (its scaling, its rank, and read(module name) -> (A, B)
    in fp32, A: r x d_in, B: d_out x r), so its update is scaling * B @ A."""
    adapter = LoraAdapter(path)

    def read(module: str) -> tuple[torch.Tensor, torch.Tensor]:
        keys = adapter.factors[module]
        tensors = adapter.read([keys["A"], keys["B"]])
        return tensors[keys["A"]].float(), tensors[keys["B"]].float()

    return adapter.scaling, int(adapter.config["r"]), read


def adapter_update_reader(path: str | Path):
    """A saved PEFT LoRA adapter read lazily from safetensors: (module name -> update shape [out, in], and
    read(module name) -> the dense update s*B*A in fp32)."""
    adapter = LoraAdapter(path)
    shapes = {module: adapter.update_shape(module) for module in adapter.factors}

    def read(module: str) -> torch.Tensor:
        return adapter.updates([module])[module]

    return shapes, read
