"""Plumbing the post-fine-tuning peers share: the live fine-tuning LoRA on the aligned model, read and written.

In the authors' protocol the user's fine-tuning is a LoRA on the merged aligned model, so with that adapter
kept live each LoRA module holds both weights a repair compares: the aligned W (its base layer) and the
fine-tuning update dW (the adapter). A repair that leaves LoRA form folds its result into the base layer
and zeroes the adapter, so the model stays one object the lab evaluates and the CLI saves.
"""

from __future__ import annotations

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


def fold(layer, weight: torch.Tensor) -> None:
    """Make `weight` the module's effective weight: it becomes the base weight and the fine-tuning adapter is zeroed."""
    with torch.no_grad():
        base = aligned_weight(layer)
        base.copy_(weight.to(base.dtype))
        layer.lora_B[FINETUNE_ADAPTER].weight.zero_()


def adapter_update_reader(path: str | Path):
    """A saved PEFT LoRA adapter read lazily from safetensors: (module name -> update shape [out, in], and
    read(module name) -> the dense update s*B*A in fp32)."""
    adapter = LoraAdapter(path)
    shapes = {module: adapter.update_shape(module) for module in adapter.factors}

    def read(module: str) -> torch.Tensor:
        return adapter.updates([module])[module]

    return shapes, read
