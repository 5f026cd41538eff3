"""Plumbing the post-fine-tuning peers share: the live fine-tuning LoRA on the aligned model, read and written.

In the authors' protocol the user's fine-tuning is a LoRA on the merged aligned model, so with that adapter
kept live each LoRA module holds both weights a repair compares: the aligned W (its base layer) and the
fine-tuning update dW (the adapter). A repair that leaves LoRA form folds its result into the base layer
and zeroes the adapter, so the model stays one object the lab evaluates and the CLI saves.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from antidote_llm.errors import AntidoteError

FINETUNE_ADAPTER = "default"  # the name load_model gives the live fine-tuning adapter
PEFT_PREFIX = "base_model.model."


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
    from safetensors import safe_open

    path = Path(path)
    config_file = path / "adapter_config.json"
    weights = path / "adapter_model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise AntidoteError(f"{path} is not a PEFT adapter folder (adapter_config.json, adapter_model.safetensors)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_dora"):
        raise AntidoteError(f"adapter {path} uses rank/alpha patterns or DoRA; give a plain LoRA adapter")
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
    handle = safe_open(str(weights), framework="pt")
    pairs: dict[str, dict[str, str]] = {}
    for key in handle.keys():
        module, _, kind = key.rpartition(".lora_")
        pairs.setdefault(module.removeprefix(PEFT_PREFIX), {})[kind[0]] = key

    shapes = {module: (handle.get_slice(keys["B"]).get_shape()[0], handle.get_slice(keys["A"]).get_shape()[-1])
              for module, keys in pairs.items()}

    def read(module: str) -> torch.Tensor:
        keys = pairs[module]
        a, b = handle.get_tensor(keys["A"]).float(), handle.get_tensor(keys["B"]).float()
        return scaling * (b @ a)

    return shapes, read
