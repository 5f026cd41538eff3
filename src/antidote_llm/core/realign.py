"""Antidote on an in-memory model: statistics, scores, selection, protection, pruning, report.

`realign(model, tokenizer, config, data)` changes the model in place and returns the masks and a
report; `antidote_llm.core.pipeline` adds loading and saving around it for the CLI. Its steps are public
so the layer-by-layer path (core.sequential) runs the same ones per layer: `compute_signals` (statistics
or gradients), `score_target`, `select_levels` (nested selections from the scores), `prune_targets`, and
`method_report` with `report.realign_report` for the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from antidote_llm.core import scoring
from antidote_llm.core.report import DataReport, MethodReport, ProtectionReport, RealignReport, realign_report
from antidote_llm.core.statistics import (
    collect_grams,
    collect_loss_gradients,
    collect_statistics,
    make_batches,
)
from antidote_llm.core.targets import (
    NAMED_SETS,
    Target,
    adapter_mode,
    check_finite,
    effective_targets,
    layout_of,
    resolve_targets,
)
from antidote_llm.data.records import Pair, PairSet, Rows, as_pairs, describe_rows
from antidote_llm.data.templates import DEFAULT_MAX_LENGTH, encode_pair, fit_max_length
from antidote_llm.errors import AntidoteError
from antidote_llm.runtime.loading import model_positions
from antidote_llm.runtime.runinfo import Timings


def split_targets(value) -> tuple[str, ...]:
    """Targets as given (a string, comma-separated, or a list of them) as a tuple; empty means auto."""
    if isinstance(value, str):
        value = [value]
    return tuple(s.strip() for v in value for s in str(v).split(",") if s.strip()) or ("auto",)


class RealignConfig(BaseModel):
    """Everything that determines which weights Antidote prunes. Defaults are the authors' settings.

    The CLI's `antidote realign` options and the lab's defense settings are built from these fields.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ratio: float = Field(gt=0, lt=1, description="alpha: fraction of weights pruned, in (0, 1); the authors use "
                         "0.05-0.1 on LoRA adapters, 1e-5 on full fine-tunes")
    score: Literal["wanda", "magnitude", "random", "refusal"] = Field(
        default="wanda", description="weight score: wanda |W|*||x|| on the data, magnitude |W|, random (seeded); beyond "
        "the paper: refusal W*dL/dW, how much zeroing a weight lowers the loss of the data's answers (refusals to "
        "harmful prompts), plus the loss of the user's own rows (--contrast-data) when given, to first order")
    granularity: Literal["row", "matrix", "global"] = Field(
        default="row", description="where the top ratio is taken: per output row (the authors'), per matrix, or over all")
    targets: tuple[str, ...] = Field(
        default=("auto",), description=f"named set ({', '.join(NAMED_SETS)}) or glob over module names; repeat or "
        "comma-separate; auto: the fine-tuning adapter if there is one, else q/k/v")
    tokens: Literal["all", "response"] = Field(
        default="all", description="whose activations count: all tokens (the authors') or the response only")
    template: Literal["alpaca", "chat", "plain"] = Field(default="alpaca", description="prompt format the model was trained with")
    max_length: int | None = Field(
        default=None, gt=0, description=f"tokens per calibration row, longer rows are cut (default: min({DEFAULT_MAX_LENGTH}, "
        "the model's positions); a value past the model's positions is refused")
    batch_size: int = Field(default=8, gt=0, description="calibration rows per forward pass (rows sorted by length; "
                            "padding never counts)")
    seed: int = Field(default=0, description="seed of the random score")
    protect_ratio: float | None = Field(
        default=None, gt=0, lt=1, description="beyond the paper: weights in the top beta of the Wanda score on benign "
        "data are never pruned (needs benign rows)")
    action: Literal["zero", "revert"] = Field(
        default="zero", description="zero the selected weights, or revert them to the aligned model's values (full fine-tunes)")
    compensate: bool = Field(
        default=False, description="beyond the paper (IRR's recipe): after zeroing, re-fit the kept weights of every "
        "pruned row by least squares so the module's outputs on the user's own rows (--contrast-data) change least")
    compensation_anchor: float = Field(
        default=10.0, ge=0, description="with --compensate: lambda, how strongly the re-fit also keeps the zeroing's "
        "effect on the calibration rows (--data): min ||X_user (W' - W)||^2 + lambda ||X_data (W' - W_zeroed)||^2, "
        "each over a per-token mean; 10 was chosen on probe rows; 0 re-fits on the user's rows alone (IRR's recipe, "
        "which undid the repair on held-back rows); read only with --compensate")

    _split_targets = field_validator("targets", mode="before")(split_targets)

    def fitted(self, model) -> RealignConfig:
        """This config with max_length fitted to `model` (a model or its config; see fit_max_length)."""
        return self.model_copy(update={"max_length": fit_max_length(self.max_length, model_positions(model))})

    def effective_targets(self, has_adapter: bool) -> tuple[str, ...]:
        """The targets with `auto` resolved (see targets.effective_targets)."""
        return effective_targets(self.targets, has_adapter)

    @property
    def needs_data(self) -> bool:
        return self.score in ("wanda", "refusal")

    @property
    def uses_user_rows(self) -> bool:
        """Whether the user's own rows (--contrast-data) enter: the refusal score weighs against them, the
        compensation re-fits on them."""
        return self.score == "refusal" or self.compensate

    def check_inputs(self, *, has_data: bool, has_protect_data: bool, has_aligned: bool, has_contrast: bool = False) -> None:
        """Refuse a missing or unused input before any model is loaded."""
        if self.needs_data and not has_data:
            raise AntidoteError(f"score {self.score!r} needs calibration data; pass --data or use --score magnitude")
        if has_contrast and not self.uses_user_rows:
            raise AntidoteError("--contrast-data (the user's own rows) is used by --score refusal and --compensate only; "
                                "add one of them or drop --contrast-data")
        if self.compensate and not has_contrast:
            raise AntidoteError("--compensate re-fits the kept weights on the user's own rows: give them with "
                                "--contrast-data")
        if self.compensate and self.compensation_anchor and not has_data:
            raise AntidoteError("--compensation-anchor keeps the zeroing's effect on the calibration rows: give them "
                                "with --data, or use --compensation-anchor 0")
        if self.compensate and self.action != "zero":
            raise AntidoteError("--compensate re-fits the weights left after zeroing; it does not combine with --action "
                                "revert")
        if self.protect_ratio is not None and not has_protect_data:
            raise AntidoteError("--protect-ratio needs --protect-data (benign rows)")
        if has_protect_data and self.protect_ratio is None:
            raise AntidoteError("--protect-data needs --protect-ratio, e.g. 0.05")
        check_action(self.action, has_aligned)


def check_action(action: str, has_aligned: bool) -> None:
    if action == "revert" and not has_aligned:
        raise AntidoteError("action 'revert' needs --aligned-model MODEL (the aligned model this one was fine-tuned from)")


@dataclass
class RealignResult:
    masks: dict[str, torch.Tensor]  # parameter name -> bool tensor in the parameter's layout, True = pruned
    report: RealignReport


def _pairs(data: Rows) -> tuple[tuple[Pair, ...], dict]:
    return as_pairs(data), describe_rows(data)


def calibration_batches(tokenizer, pairs: Sequence[Pair], config: RealignConfig):
    if not pairs:
        raise AntidoteError("the calibration data has no rows; give at least one (prompt, response) pair")
    encoded = [encode_pair(tokenizer, config.template, p.prompt, p.response, p.input, config.max_length) for p in pairs]
    return make_batches(encoded, config.batch_size, tokenizer, response_only=config.tokens == "response")


@dataclass
class Signals:
    """What the scores are computed from, keyed by parameter name: the data's input statistics (wanda) or the
    gradient of the per-token mean loss of the data's answers plus the contrast rows' (refusal)."""

    stats: dict[str, scoring.ChannelStats] = field(default_factory=dict)
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter layout


def _mean_sq(stats: dict[str, scoring.ChannelStats], name: str) -> torch.Tensor:
    mean_sq = stats[name].mean_sq
    if not torch.isfinite(mean_sq).all():
        raise AntidoteError(f"activation statistics of {name} hold NaN or Inf; try --dtype float32")
    return mean_sq


def score_target(target: Target, signals: Signals, config: RealignConfig, generator: torch.Generator) -> torch.Tensor:
    """The score of every weight of one target, in Linear layout [out, in]."""
    weight = target.to_linear(target.weight)
    name = target.param_name
    if config.score == "magnitude":
        return scoring.magnitude_scores(weight)
    if config.score == "random":
        return scoring.random_scores(weight, generator)
    if config.score == "refusal":
        return scoring.first_order_scores(weight, target.to_linear(signals.gradients[name]))
    return scoring.wanda_scores(weight, _mean_sq(signals.stats, name))


def select_levels(
    targets: Sequence[Target], signals: Signals, config: RealignConfig, ratios: Sequence[float],
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Nested selections at every ratio from one score per weight, as levels (Linear layout; see
    scoring.nested_levels). Per row or matrix, one score tensor lives at a time; global needs all.
    A caller selecting in parts (layer by layer) passes one `generator` so random scores match one call."""
    generator = generator or torch.Generator().manual_seed(config.seed)

    def levels_of(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        per_ratio = [scoring.select(scores, ratio, config.granularity) for ratio in ratios]
        return {name: scoring.nested_levels([masks[name] for masks in per_ratio]) for name in scores}

    if config.granularity == "global":
        return levels_of({t.param_name: score_target(t, signals, config, generator) for t in targets})
    return {name: level for t in targets for name, level in levels_of({t.param_name: score_target(t, signals, config, generator)}).items()}


def _activation_statistics(model, tokenizer, targets, pairs, config, progress, desc):
    batches = calibration_batches(tokenizer, pairs, config)
    tokens = sum(b.tokens for b in batches)
    if tokens == 0:
        raise AntidoteError("no tokens count for the statistics (every response was cut off); raise --max-length or use --tokens all")
    return collect_statistics(model, batches, targets, progress=progress, desc=desc), tokens


def _loss_gradients(model, tokenizer, targets, pairs, config, progress, desc):
    """The gradient of the mean loss of the rows' answers (prompt tokens never count) for every target."""
    batches = calibration_batches(tokenizer, pairs, config.model_copy(update={"tokens": "response"}))
    gradients, tokens = collect_loss_gradients(model, batches, targets, progress=progress, desc=desc)
    if tokens == 0:
        raise AntidoteError("no answer tokens for the loss (every answer was cut off); raise --max-length")
    return {name: grad / tokens for name, grad in gradients.items()}, tokens


def compute_signals(model, tokenizer, targets, pairs, contrast_pairs, config, progress) -> tuple[Signals, int]:
    """Everything the scores need, and how many of the data's tokens counted."""
    signals, tokens = Signals(), 0
    if config.score == "wanda":
        signals.stats, tokens = _activation_statistics(model, tokenizer, targets, pairs, config, progress, "statistics")
    if config.score == "refusal":
        signals.gradients, tokens = _loss_gradients(model, tokenizer, targets, pairs, config, progress, "loss gradients")
        if contrast_pairs:
            contrast, _ = _loss_gradients(model, tokenizer, targets, contrast_pairs, config, progress, "contrast gradients")
            signals.gradients = {name: grad + contrast[name] for name, grad in signals.gradients.items()}
    return signals, tokens


@dataclass
class Refit:
    """What the compensation of one target fits on: the mean Gram matrix of its inputs on the user's rows, and the
    anchor (lambda times that of the calibration rows) or None."""

    gram: torch.Tensor
    anchor: torch.Tensor | None


def _mean_grams(model, tokenizer, targets, pairs, config, progress, desc) -> dict[str, torch.Tensor]:
    batches = calibration_batches(tokenizer, pairs, config.model_copy(update={"tokens": "all"}))
    tokens = sum(batch.tokens for batch in batches)
    return {name: gram / tokens for name, gram in collect_grams(model, batches, targets, progress=progress, desc=desc).items()}


def compensation_refits(model, tokenizer, targets: Sequence[Target], pairs: Sequence[Pair], anchor_pairs: Sequence[Pair],
                        config: RealignConfig, progress: bool) -> dict[str, Refit]:
    """Per target, what `compensate` fits on: the user's rows (every token), and with an anchor the calibration
    rows' Gram matrices weighted by `config.compensation_anchor`."""
    if not pairs:
        raise AntidoteError("--compensate needs the user's own rows and --contrast-data has none")
    grams = _mean_grams(model, tokenizer, targets, pairs, config, progress, "compensation statistics")
    anchors = {}
    if config.compensation_anchor:
        anchors = {name: config.compensation_anchor * gram for name, gram in _mean_grams(
            model, tokenizer, targets, anchor_pairs, config, progress, "anchor statistics").items()}
    return {name: Refit(gram, anchors.get(name)) for name, gram in grams.items()}


def pruned_weight(target: Target, original: torch.Tensor, mask: torch.Tensor, refit: Refit | None) -> torch.Tensor:
    """The target's weight (its own layout) with `mask` zeroed; with a `refit`, the kept weights of each pruned
    row re-fitted by least squares (scoring.compensate)."""
    if refit is None:
        return original.masked_fill(mask.to(original.device), 0)
    return target.from_linear(scoring.compensate(target.to_linear(original), target.to_linear(mask), refit.gram,
                                                 anchor=refit.anchor))


def prune_targets(
    targets: Sequence[Target], masks: dict[str, torch.Tensor], action: str, aligned: dict[str, torch.Tensor] | None,
) -> None:
    """Zero the masked weights of `targets` in place, or revert them to the `aligned` values."""
    with torch.no_grad():
        for target in targets:
            mask = masks[target.param_name].to(target.weight.device)
            if action == "zero":
                target.weight.masked_fill_(mask, 0)
            else:
                source = aligned[target.param_name].to(target.weight.device, target.weight.dtype)
                target.weight.copy_(torch.where(mask, source, target.weight))


def aligned_weights(aligned: nn.Module, targets: Sequence[Target]) -> dict[str, torch.Tensor]:
    """The aligned model's values of every target weight; refuse a model that does not fit."""
    modules = dict(aligned.named_modules())
    found = {}
    for target in targets:
        module = modules.get(target.module_name)
        weight = getattr(module, "weight", None)
        if weight is None or tuple(weight.shape) != tuple(target.weight.shape):
            shape = None if weight is None else list(weight.shape)
            raise AntidoteError(
                f"aligned model does not fit: {target.param_name} is {list(target.weight.shape)} here, {shape} there; "
                "give the aligned model this one was fine-tuned from"
            )
        found[target.param_name] = weight.detach()
    return found


@dataclass
class NestedSelection:
    """Which weights Antidote selects at several ratios from one statistics pass and one score per weight.

    `levels[param]` (uint8, the parameter's layout): 0 = never pruned; i = pruned at `ratios[i-1]` and every
    larger ratio. Per-row top-k selections at growing ratios are nested, so one tensor holds them all.
    """

    targets: list[Target]
    ratios: tuple[float, ...]
    levels: dict[str, torch.Tensor]
    selected: dict[str, list[int]]  # per parameter, per ratio: selected before protection spared any
    data: DataReport | None
    protection: ProtectionReport | None
    method: MethodReport
    contrast: DataReport | None
    timings: dict[str, float]
    # per parameter, what the kept weights are re-fitted on, when they are
    compensation: dict[str, Refit] | None = None

    def masks(self, index: int) -> dict[str, torch.Tensor]:
        """Bool masks (True = pruned) at `ratios[index]`."""
        return {name: scoring.level_mask(level, index) for name, level in self.levels.items()}

    def prune(self, index: int) -> None:
        """Prune the targets, in place, as selected at `ratios[index]`: zeroed, and re-fitted when compensating."""
        masks, refits = self.masks(index), self.compensation or {}
        with torch.no_grad():
            for target in self.targets:
                name = target.param_name
                target.weight.copy_(pruned_weight(target, target.weight.detach(), masks[name], refits.get(name)))

    def report(self, index: int) -> RealignReport:
        return realign_report(
            self.targets, selected={name: counts[index] for name, counts in self.selected.items()},
            pruned={name: scoring.selected_counts(level, len(self.ratios))[index] for name, level in self.levels.items()},
            method=self.method.model_copy(update={"ratio": self.ratios[index]}), data=self.data,
            protection=self.protection, contrast=self.contrast, timings=self.timings,
        )


def method_report(config: RealignConfig, has_adapter: bool) -> MethodReport:
    """The config that ran, with its targets resolved from `auto`."""
    return MethodReport(**{**config.model_dump(mode="json"), "targets": list(config.effective_targets(has_adapter))})


def select_nested(
    model: nn.Module,
    tokenizer,
    config: RealignConfig,
    data: Rows | None = None,
    *,
    ratios: Sequence[float] | None = None,
    protect_data: Rows | None = None,
    contrast_data: Rows | None = None,
    progress: bool = True,
) -> NestedSelection:
    """Score once and select at every ratio (default: `config.ratio`), changing nothing in the model.
    `contrast_data`: the user's own fine-tuning rows, whose loss the refusal score keeps low."""
    ratios = check_ratios(ratios if ratios is not None else (config.ratio,))
    config = config.fitted(model)
    timings = Timings()
    has_adapter = hasattr(model, "peft_config")
    targets = resolve_targets(model, config.effective_targets(has_adapter))
    check_finite(targets)
    pairs, data_info = _pairs(data) if data is not None else ((), None)
    contrast_pairs, contrast_info = _pairs(contrast_data) if contrast_data is not None else ((), None)
    with timings.measure("scoring_s"):
        signals, tokens = compute_signals(model, tokenizer, targets, pairs, contrast_pairs, config, progress)
    with timings.measure("selection_s"):
        levels = select_levels(targets, signals, config, ratios)
    selected = {name: scoring.selected_counts(level, len(ratios)) for name, level in levels.items()}
    compensation = None
    if config.compensate:
        with timings.measure("compensation_s"):
            compensation = compensation_refits(model, tokenizer, targets, contrast_pairs, pairs, config, progress)
    protection = None
    if config.protect_ratio is not None:
        with timings.measure("protection_s"):
            protect_pairs, protect_info = _pairs(protect_data)
            protect_config = config.model_copy(update={"score": "wanda"})
            benign_stats, benign_tokens = _activation_statistics(
                model, tokenizer, targets, protect_pairs, protect_config, progress, "benign statistics"
            )
            protected = select_levels(targets, Signals(stats=benign_stats), protect_config, (config.protect_ratio,))
            for name in levels:
                levels[name][protected[name] > 0] = 0
            protection = ProtectionReport(**protect_info, tokens=benign_tokens, ratio=config.protect_ratio, spared=0)
    return NestedSelection(
        targets=targets, ratios=ratios,
        levels={t.param_name: t.from_linear(levels[t.param_name]).contiguous().cpu() for t in targets},
        selected=selected, data=None if data_info is None else DataReport(**data_info, tokens=tokens),
        protection=protection, contrast=None if contrast_info is None else DataReport(**contrast_info),
        method=method_report(config, has_adapter),
        timings=dict(timings), compensation=compensation,
    )


def check_ratios(ratios: Sequence[float]) -> tuple[float, ...]:
    """Ratios in (0, 1), strictly increasing (so the selections are nested in order)."""
    ratios = tuple(float(r) for r in ratios)
    if not ratios:
        raise AntidoteError("give at least one ratio")
    for ratio in ratios:
        scoring.check_ratio(ratio)
    if any(b <= a for a, b in zip(ratios, ratios[1:], strict=False)):
        raise AntidoteError(f"ratios must be increasing without repeats, got {', '.join(map(str, ratios))}")
    return ratios


def realign(
    model: nn.Module,
    tokenizer,
    config: RealignConfig,
    data: PairSet | Sequence[Pair] | None = None,
    *,
    protect_data: PairSet | Sequence[Pair] | None = None,
    contrast_data: PairSet | Sequence[Pair] | None = None,
    aligned: nn.Module | None = None,
    progress: bool = True,
) -> RealignResult:
    """Prune, in place, the weights of `model` most active on the harmful `data`.

    `model` is a PeftModel when the targets are the fine-tuning adapter. With `protect_data`
    (benign rows) and `config.protect_ratio` beta, weights in the top beta of the Wanda score on
    benign data are never pruned. With `config.action == "revert"` the selected weights take the
    `aligned` model's values instead of zero. `contrast_data`: the user's own fine-tuning rows (see select_nested).
    """
    config.check_inputs(has_data=data is not None, has_protect_data=protect_data is not None, has_aligned=aligned is not None,
                        has_contrast=contrast_data is not None)
    has_adapter = hasattr(model, "peft_config")
    targets = resolve_targets(model, config.effective_targets(has_adapter))
    aligned_values = None
    if config.action == "revert":
        if adapter_mode(config.targets, has_adapter):
            raise AntidoteError("action 'revert' applies to full fine-tunes; adapter targets can only be zeroed")
        aligned_values = aligned_weights(aligned, targets)
    selection = select_nested(model, tokenizer, config, data, protect_data=protect_data, contrast_data=contrast_data,
                              progress=progress)
    masks = selection.masks(0)
    if config.action == "zero":
        selection.prune(0)
    else:
        prune_targets(selection.targets, masks, config.action, aligned_values)
    return RealignResult(masks=masks, report=selection.report(0))


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor], action: str = "zero", aligned: nn.Module | None = None) -> list[Target]:
    """Re-apply saved masks (parameter name -> bool) to a model without recomputing any score."""
    modules = dict(model.named_modules())
    targets = []
    for name, mask in masks.items():
        module_name = name.removesuffix(".weight")
        module = modules.get(module_name)
        layout = layout_of(module) if module is not None else None
        if layout is None or tuple(module.weight.shape) != tuple(mask.shape) or mask.dtype != torch.bool:
            raise AntidoteError(
                f"mask entry {name} does not fit the model (no such weight, or shape/dtype differs); "
                "load the model and adapters the mask was made for"
            )
        targets.append(Target(module_name, module, layout))
    check_action(action, aligned is not None)
    aligned_values = aligned_weights(aligned, targets) if action == "revert" else None
    prune_targets(targets, masks, action, aligned_values)
    return targets


__all__ = ["NAMED_SETS", "RealignConfig", "RealignResult", "apply_masks", "realign"]
