"""Antidote on a model larger than memory: one decoder layer at a time, from the safetensors files.

The statistics of layer l depend only on layers < l, unpruned (the masks are applied after scoring, as the
authors' layer-by-layer sweep does), so the whole-model pass can be cut into layers: the inputs of layer 0
(embeddings, position embeddings, attention mask) are captured for every calibration batch; then each layer
is loaded from the memory-mapped checkpoint onto the device (any merged alignment adapter merged into it in
fp32, the live fine-tuning adapter's factors beside it), every batch runs through it with the statistics hooks,
its outputs become the next layer's inputs, its targets are selected and pruned, its tensors are written out
and it is freed. The masks equal `realign`'s exactly (the same sums over the same inputs, layer by layer).

Memory: one layer's weights, the embedding rows the calibration tokens use, the hidden states of every
calibration token once (tokens x hidden x bytes per element, padding included; each batch's are replaced by
the layer's output as soon as it has run), one batch's activations, the attention masks, and the boolean
masks until `mask.safetensors` is written.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm.auto import tqdm

from antidote_llm.core.realign import (
    RealignConfig,
    RealignResult,
    Signals,
    calibration_batches,
    method_report,
    prune_targets,
    select_levels,
)
from antidote_llm.core.report import DataReport, realign_report
from antidote_llm.core.statistics import collect_layer_statistics, first_layer_inputs
from antidote_llm.core.targets import Target, adapter_mode, check_finite, decoder_layers, resolve_targets
from antidote_llm.data.records import as_pairs, describe_rows
from antidote_llm.errors import AntidoteError
from antidote_llm.runtime.checkpoints import ADAPTER_PREFIX, Checkpoint, LoraAdapter
from antidote_llm.runtime.loading import (
    ModelSource,
    check_adapter_fits,
    load_tokenizer,
    locate_model,
    resolve_device,
    resolve_dtype,
)
from antidote_llm.runtime.runinfo import Timings

HEADROOM = 1.2  # activations, statistics and the allocator's slack on top of the weights


@dataclass(frozen=True)
class Execution:
    """Which path computes the statistics, and why: in memory (one pass over the whole model) or sequential."""

    path: str  # "in-memory" or "sequential"
    reason: str
    model_bytes: int | None = None
    available_bytes: int | None = None


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def choose_execution(source: ModelSource, offload: bool | None) -> Execution:
    """`offload` True or False is the user's choice; None (auto) goes sequential when the model, at its
    size from the safetensors headers, would not fit in the free memory of its device (with headroom)."""
    if offload is False:
        return Execution("in-memory", "asked for (--no-offload)")
    if offload:
        return Execution("sequential", "asked for (--offload)")
    folder, gguf = locate_model(source.model)
    if gguf or source.device_map or not Path(folder).is_dir():
        return Execution("in-memory", "auto: sequential needs a local safetensors model folder and no --device-map")
    device = resolve_device(source.device)
    try:
        size = Checkpoint(Path(folder)).nbytes(resolve_dtype(source.dtype, device))
    except (AntidoteError, SafetensorError, OSError, KeyError, ValueError):
        # no safetensors here, or damaged ones: the loader of the in-memory path names the problem
        return Execution("in-memory", "auto: the model folder holds no readable safetensors weights")
    available = _available_bytes(device)
    if size * HEADROOM > available:
        return Execution("sequential", f"auto: the model needs {size / 2**30:.1f} GiB, {device.type} has "
                         f"{available / 2**30:.1f} GiB free", size, available)
    return Execution("in-memory", "auto: the model fits in memory", size, available)


def _check_supported(config: RealignConfig) -> None:
    if config.granularity == "global":
        raise AntidoteError("--offload selects layer by layer; granularity 'global' needs every score at once, use row or matrix")
    if config.protect_ratio is not None:
        raise AntidoteError("--offload does not support --protect-data yet; run without --offload")
    if config.action != "zero":
        raise AntidoteError("--offload supports action 'zero' only; run --action revert without --offload")
    if config.score == "refusal":
        raise AntidoteError(f"--offload supports the scores wanda, magnitude and random, not {config.score!r}; "
                            "run without --offload")
    if config.compensate:
        raise AntidoteError("--offload does not support --compensate yet; run without --offload")


def _skeleton(folder: str, source: ModelSource, dtype: torch.dtype, live_adapter: str | None):
    """The model with every weight on the meta device (no memory), and the live adapter's factors on it too."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(folder, trust_remote_code=source.trust_remote_code)
    if len(set(getattr(model_config, "layer_types", None) or ())) > 1:
        # e.g. Gemma 2/3: sliding-window and full-attention layers get different masks, layer 0's do not fit all
        raise AntidoteError(f"--offload reuses layer 0's attention mask for every layer, but {model_config.model_type} "
                            "mixes attention types across layers; run without --offload")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype, trust_remote_code=source.trust_remote_code)
    model.eval()
    for adapter in source.adapters:
        check_adapter_fits(model, adapter)
    if live_adapter is None:
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig.from_pretrained(live_adapter)
    lora.inference_mode = True
    return get_peft_model(model, lora, low_cpu_mem_usage=True).eval()


def _set(module: torch.nn.Module, name: str, value: torch.Tensor, device: torch.device) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(module, name, device, value=value)


def _unload(module: torch.nn.Module) -> None:
    """Back to the meta device: the weights' memory is freed."""
    module.to("meta")


def _return_freed_memory() -> None:
    """Hand the heap pages freed with a layer back to the system. glibc keeps them for reuse, and the next
    layer's differently sized temporaries fragment them: without this the resident memory of a sweep grows
    layer by layer (about 3 MiB per SmolLM2 layer here). A no-op where the C library has no malloc_trim."""
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).malloc_trim(0)


def _merge_into(weights: dict[str, torch.Tensor], adapter: LoraAdapter, prefix: str, dtype: torch.dtype) -> None:
    """W += scaling * B @ A for the modules of one layer, in fp32 and cast once, as runtime.loading.merge_adapter does."""
    updates = adapter.updates([module for module in adapter.factors if module.startswith(prefix)])
    for module, delta in updates.items():
        if adapter.config.get("fan_in_fan_out"):
            delta = delta.t()
        weights[module + ".weight"] = (weights[module + ".weight"].float() + delta).to(dtype)


class _Layers:
    """Loads decoder layer l of the skeleton from the checkpoint and adapters, and reads its tensors back."""

    def __init__(self, stack: str, checkpoint: Checkpoint, merged: list[LoraAdapter], live: LoraAdapter | None,
                 dtype: torch.dtype, device: torch.device):
        self.stack, self.checkpoint = stack, checkpoint
        self.merged, self.live, self.dtype, self.device = merged, live, dtype, device

    def prefix(self, index: int) -> str:
        return f"{self.stack}.{index}."

    def load(self, layer: torch.nn.Module, index: int) -> None:
        prefix = self.prefix(index)
        names = [name for name, _ in layer.named_parameters()]
        base = {name: prefix + name.replace(".base_layer.", ".") for name in names if ".lora_" not in name}
        weights = {key: value.to(self.dtype) for key, value in self.checkpoint.read(list(base.values())).items()}
        for adapter in self.merged:
            _merge_into(weights, adapter, prefix, self.dtype)
        for name, key in base.items():
            _set(layer, name, weights[key], self.device)
        if self.live is not None:
            lora = {name: ADAPTER_PREFIX + prefix + name.replace(".default.", ".") for name in names if ".lora_" in name}
            tensors = self.live.read(list(lora.values()))
            for name, key in lora.items():  # in the skeleton's LoRA dtype: PEFT keeps the factors in fp32
                _set(layer, name, tensors[key], self.device)

    def base_tensors(self, layer: torch.nn.Module, index: int) -> dict[str, torch.Tensor]:
        return {self.prefix(index) + name: value.detach().to("cpu").contiguous() for name, value in layer.state_dict().items()}

    def adapter_tensors(self, layer: torch.nn.Module, index: int) -> dict[str, torch.Tensor]:
        return {
            ADAPTER_PREFIX + self.prefix(index) + name.replace(".default.", "."): value.detach().to("cpu").contiguous()
            for name, value in layer.named_parameters() if ".lora_" in name
        }


def _check_layer_only(keys: Sequence[str], stack: str, what: str) -> None:
    outside = [k for k in keys if not k.removeprefix(ADAPTER_PREFIX).startswith(stack + ".")]
    if outside:
        raise AntidoteError(f"{what} has weights outside the decoder layers ({outside[0]}); --offload handles "
                            "adapters on decoder layers only, run without --offload")


def _write_model(tmp: Path, shards: list[str], weight_map: dict[str, str], sizes: int, model_config, folder: str, tokenizer,
                 dtype: torch.dtype) -> None:
    """Rename the per-layer shards to the usual model-0000i-of-0000n names and write the index and config."""
    count = len(shards)
    renamed = {old: f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i, old in enumerate(shards)}
    for old, new in renamed.items():
        (tmp / old).rename(tmp / new)
    index = {"metadata": {"total_size": sizes}, "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    model_config.dtype = dtype
    model_config.save_pretrained(tmp)
    generation = Path(folder) / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, tmp / generation.name)
    tokenizer.save_pretrained(tmp)


def realign_sequential(
    source: ModelSource, config: RealignConfig, data, tmp: Path, *, progress: bool = True,
) -> tuple[RealignResult, dict]:
    """Antidote layer by layer from the checkpoint on disk; writes the repaired model (or adapter) and the
    mask into `tmp` and returns the result (masks, report) and what was written where."""
    _check_supported(config)
    folder, gguf = locate_model(source.model)
    if gguf or not Path(folder).is_dir():
        raise AntidoteError(f"--offload reads a local safetensors model folder; {source.model!r} is not one")
    if source.device_map:
        raise AntidoteError("--offload places one layer at a time on --device; drop --device-map")
    checkpoint = Checkpoint(Path(folder))
    device = resolve_device(source.device)
    dtype = resolve_dtype(source.dtype, device)
    on_adapter = adapter_mode(config.targets, bool(source.adapters))
    adapters = [LoraAdapter(a) for a in source.adapters]
    live = adapters[-1] if on_adapter else None
    merged = adapters[:-1] if on_adapter else adapters
    timings = Timings()

    with timings.measure("load_s"):
        tokenizer = load_tokenizer(source.model, source.trust_remote_code)
        model = _skeleton(folder, source, dtype, source.adapters[-1] if on_adapter else None)
        config = config.fitted(model)
        base = model.get_base_model() if on_adapter else model
        stack, layers = decoder_layers(base)
        for adapter in adapters:
            _check_layer_only(adapter.keys, stack, f"adapter {adapter.folder}")
        targets = resolve_targets(model, config.effective_targets(bool(source.adapters)))
        loader = _Layers(stack, checkpoint, merged, live, dtype, device)
        model_stack, _ = decoder_layers(model)
        per_layer: list[list[Target]] = [[] for _ in layers]
        for target in targets:
            index = target.module_name.removeprefix(model_stack + ".").split(".")[0]
            if not target.module_name.startswith(model_stack + ".") or not index.isdigit():
                raise AntidoteError(f"--offload prunes weights inside the decoder layers only, not {target.module_name}; "
                                    "run without --offload")
            per_layer[int(index)].append(target)

    pairs = as_pairs(data) if data is not None else ()
    batches, inputs, tokens = [], [], 0
    if config.needs_data:
        with timings.measure("scoring_s"):
            batches = calibration_batches(tokenizer, pairs, config)
            tokens = sum(b.tokens for b in batches)
            if tokens == 0:
                raise AntidoteError("no tokens count for the statistics (every response was cut off); raise --max-length "
                                    "or use --tokens all")
            inputs = _embed(base, checkpoint, batches, dtype, device)

    generator = torch.Generator().manual_seed(config.seed)
    masks: dict[str, torch.Tensor] = {}
    written: dict[str, torch.Tensor] = {}  # adapter mode: the pruned adapter, small
    shards, weight_map, total_size = [], {}, 0
    out_dir = tmp / ("adapter" if on_adapter else "model")
    out_dir.mkdir()
    for index, layer in enumerate(tqdm(layers, desc="layers", unit="layer", disable=not progress)):
        with timings.measure("load_s"):
            loader.load(layer, index)
            check_finite(per_layer[index])
        with timings.measure("scoring_s"):
            stats = {}
            if config.needs_data:
                stats = collect_layer_statistics(layer, inputs, batches, per_layer[index],
                                                 advance=index < len(layers) - 1)
        with timings.measure("selection_s"):
            levels = select_levels(per_layer[index], Signals(stats=stats), config, (config.ratio,), generator)
            chosen = {t.param_name: t.from_linear(levels[t.param_name] > 0).contiguous().cpu() for t in per_layer[index]}
            prune_targets(per_layer[index], chosen, "zero", None)
            masks.update(chosen)
        with timings.measure("save_s"):
            if on_adapter:
                written.update(loader.adapter_tensors(layer, index))
            else:
                tensors = loader.base_tensors(layer, index)
                shards.append(f"layer-{index}.safetensors")
                save_file(tensors, str(out_dir / shards[-1]), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(tensors, shards[-1]))
                total_size += sum(t.numel() * t.element_size() for t in tensors.values())
        _unload(layer)
        _return_freed_memory()
    with timings.measure("save_s"):
        if on_adapter:
            save_file(written, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
            shutil.copyfile(live.folder / "adapter_config.json", out_dir / "adapter_config.json")
            outputs = {"adapter": "adapter", "base": {"model": source.model, "merged_adapters": list(source.adapters[:-1])}}
        else:
            rest = [k for k in checkpoint.files if not k.startswith(stack + ".")]
            shards.append("rest.safetensors")
            total_size += checkpoint.copy_to(rest, dtype, out_dir / shards[-1])
            weight_map.update(dict.fromkeys(rest, shards[-1]))
            _write_model(out_dir, shards, weight_map, total_size, base.config, folder, tokenizer, dtype)
            outputs = {"model": "model"}
        save_file(masks, str(tmp / "mask.safetensors"))

    counts = {name: int(mask.sum()) for name, mask in masks.items()}
    report = realign_report(
        targets, selected=counts, pruned=counts, method=method_report(config, bool(source.adapters)),
        data=None if data is None else DataReport(**describe_rows(data), tokens=tokens), protection=None,
        contrast=None, timings=dict(timings),
    )
    return RealignResult(masks=masks, report=report), {**outputs, "mask": "mask.safetensors"}


def _embed(base, checkpoint: Checkpoint, batches, dtype: torch.dtype, device: torch.device):
    """Layer 0's inputs for every batch. Only the embedding rows of the tokens the batches hold are read
    (a vocabulary of 128k x 8192 is 2 GiB; the calibration set uses a few thousand of its rows): the
    embedding module runs, whatever it does (scaling...), on those rows with the ids renumbered."""
    embeddings = base.get_input_embeddings()
    name = next(n for n, m in base.named_modules() if m is embeddings) + ".weight"
    used = torch.unique(torch.cat([b.input_ids.reshape(-1) for b in batches]))
    original, padding_idx = embeddings.weight, getattr(embeddings, "padding_idx", None)
    embeddings.weight = torch.nn.Parameter(checkpoint.rows(name, used.tolist()).to(device, dtype), requires_grad=False)
    if padding_idx is not None:
        embeddings.padding_idx = None  # it only stops gradients; renumbered, it may lie outside the rows read
    renumbered = [dataclasses.replace(b, input_ids=torch.searchsorted(used, b.input_ids)) for b in batches]
    try:
        return first_layer_inputs(base, renumbered)
    finally:
        embeddings.weight = original  # back to the meta tensor (and to the tied LM head's)
        if padding_idx is not None:
            embeddings.padding_idx = padding_idx
