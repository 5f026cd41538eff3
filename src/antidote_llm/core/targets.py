"""Which weights Antidote scores and prunes: named sets and glob patterns over module names."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from antidote_llm.errors import AntidoteError

QKV_NAMES = {"q_proj", "k_proj", "v_proj", "query", "key", "value", "qkv_proj", "c_attn", "Wqkv", "query_key_value"}
ATTENTION_PARTS = ("attn", "attention")
MLP_PARTS = ("mlp", "feed_forward", "ffn")
# The fine-tuning adapter's LoRA factors: both (the authors'), or one of them (beyond the paper).
ADAPTER_SETS = {"adapter": ("lora_A", "lora_B"), "adapter-a": ("lora_A",), "adapter-b": ("lora_B",)}
NAMED_SETS = ("auto", *ADAPTER_SETS, "qkv", "attention", "mlp", "all-linear")


def effective_targets(specs: Sequence[str], has_adapter: bool) -> tuple[str, ...]:
    """`auto` is the authors' choice: the fine-tuning adapter if there is one, else q/k/v."""
    specs = tuple(specs)
    if specs == ("auto",):
        return ("adapter",) if has_adapter else ("qkv",)
    if "auto" in specs:
        raise AntidoteError("target 'auto' cannot be combined with others; give it alone")
    return specs


def adapter_mode(specs: Sequence[str], has_adapter: bool) -> bool:
    """Whether Antidote prunes the live fine-tuning adapter (one of its factor sets, or `auto` with an adapter
    given), so the model is loaded with that adapter kept apart and the pruned adapter is what is saved.
    `has_adapter`: whether a fine-tuning adapter is given (or the model carries one live)."""
    resolved = effective_targets(specs, has_adapter)
    return len(resolved) == 1 and resolved[0] in ADAPTER_SETS


@dataclass(frozen=True)
class Target:
    """One scored weight. `layout` says how to view it as a Linear weight [out, in]."""

    module_name: str
    module: nn.Module
    layout: str  # "linear", "conv1d" ([in, out]) or "embedding" ([vocab, dim], input = one-hot token)

    @property
    def param_name(self) -> str:
        return f"{self.module_name}.weight"

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    def to_linear(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.layout == "linear" else tensor.t()

    def from_linear(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.to_linear(tensor)  # a transpose is its own inverse

    @property
    def in_features(self) -> int:
        return self.to_linear(self.weight).shape[1]


def layout_of(module: nn.Module) -> str | None:
    """The weight layout of a prunable module, or None when Antidote cannot score it."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        return None
    if isinstance(module, nn.Linear):
        # Quantized Linear subclasses store packed weights whose shape is not [out, in].
        return "linear" if tuple(weight.shape) == (module.out_features, module.in_features) else None
    if isinstance(module, Conv1D):  # GPT-2 family: y = x @ W + b with W [in, out]
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder stack: the ModuleList of the model's `_no_split_modules` blocks (what accelerate places
    whole on a device), else the ModuleList holding the most parameters."""
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and type(module[0]).__name__ in block_classes:
            return name, module
    best, best_size = None, -1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    if best is None:
        raise AntidoteError("cannot find the model's decoder layers (no nn.ModuleList); this architecture is not supported")
    return best


def _parts(name: str) -> list[str]:
    return name.split(".")


def _in_named_set(set_name: str, name: str, layout: str, in_stack: bool) -> bool:
    if "lora_" in name or layout == "embedding" or not in_stack:
        return False
    leaf = _parts(name)[-1]
    if set_name == "qkv":
        return leaf in QKV_NAMES
    if set_name == "attention":
        return any(part in p.lower() for p in _parts(name)[:-1] for part in ATTENTION_PARTS)
    if set_name == "mlp":
        return any(part in p.lower() for p in _parts(name)[:-1] for part in MLP_PARTS)
    return set_name == "all-linear"


def _adapter_targets(model: nn.Module, adapter_name: str, factors: Sequence[str]) -> list[Target]:
    found = []
    for name, module in model.named_modules():
        parts = _parts(name)
        if len(parts) >= 2 and parts[-1] == adapter_name and parts[-2] in factors:
            layout = layout_of(module)
            if layout != "linear":
                raise AntidoteError(f"adapter module {name} is not a Linear LoRA factor; only LoRA adapters are supported")
            found.append(Target(name, module, layout))
    return found


def resolve_targets(model: nn.Module, specs: Sequence[str], adapter_name: str = "default") -> list[Target]:
    """Targets named by `specs` (named sets, exact module names or glob patterns), in module order.

    Embeddings and the LM head are scored only when named explicitly (a name or a glob).
    """
    specs = [s for spec in specs for s in spec.split(",") if s.strip()]
    adapter_specs = [s for s in specs if s in ADAPTER_SETS]
    if adapter_specs:
        if len(specs) > 1:
            raise AntidoteError(f"target {adapter_specs[0]!r} cannot be combined with other targets; give it alone")
        targets = _adapter_targets(model, adapter_name, ADAPTER_SETS[adapter_specs[0]])
        if not targets:
            raise AntidoteError(f"targets {adapter_specs[0]!r} asked for but the model has no fine-tuning adapter; "
                                "pass --adapter or use --targets qkv")
        return targets
    if hasattr(model, "peft_config"):
        # On a live adapter the base weights sit under `base_layer`, apart from the update; pruning them would
        # not mean what the same targets mean on the merged model, so the merged model is required.
        raise AntidoteError(
            f"targets {', '.join(map(repr, specs))} select merged weights, but the model carries a live LoRA adapter; "
            "merge it first (load_model without keep_adapter) or use targets 'adapter'"
        )
    stack_name, _ = decoder_layers(model)
    chosen: dict[str, Target] = {}
    unmatched = []
    for spec in specs:
        matched = False
        for name, module in model.named_modules():
            layout = layout_of(module)
            if layout is None:
                continue
            in_stack = name.startswith(stack_name + ".")
            hit = (
                _in_named_set(spec, name, layout, in_stack)
                if spec in NAMED_SETS
                else (name == spec or fnmatch.fnmatchcase(name, spec)) and "lora_" not in name
            )
            if hit:
                matched = True
                chosen.setdefault(name, Target(name, module, layout))
        if not matched:
            unmatched.append(spec)
    if unmatched:
        hint = "" if any(s in NAMED_SETS for s in unmatched) else "; patterns match module names such as model.layers.*.self_attn.q_proj"
        raise AntidoteError(f"targets {', '.join(map(repr, unmatched))} match no prunable module{hint}")
    return _deduplicate_tied(list(chosen.values()))


def _deduplicate_tied(targets: list[Target]) -> list[Target]:
    """Tied weights (LM head = embeddings) are one tensor: score and prune it once."""
    seen, unique = set(), []
    for target in targets:
        weight = target.weight  # weights not yet loaded (meta) have no storage to compare
        key = id(weight) if weight.is_meta else weight.data_ptr()
        if key not in seen:
            seen.add(key)
            unique.append(target)
    return unique


def check_finite(targets: Sequence[Target]) -> None:
    for target in targets:
        if not torch.isfinite(target.weight).all():
            raise AntidoteError(f"weight {target.param_name} holds NaN or Inf; the model is broken, repair or re-export it first")
