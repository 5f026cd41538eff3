"""Antidote from disk to disk: validate everything, load, realign, save atomically, report."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from antidote_llm.core.realign import RealignConfig, RealignResult, apply_masks, check_action, realign
from antidote_llm.core.report import ApplyMaskReport, ExecutionReport, RealignReport
from antidote_llm.core.sequential import Execution, choose_execution, realign_sequential
from antidote_llm.core.targets import adapter_mode
from antidote_llm.data.records import PairSet
from antidote_llm.data.spec import DataSpec
from antidote_llm.errors import AntidoteError
from antidote_llm.runtime.loading import Loaded, ModelSource, load_model
from antidote_llm.runtime.modelcard import CardFacts, write_model_cards
from antidote_llm.runtime.outputs import OutputRun, output_run, save_model, write_report
from antidote_llm.runtime.runinfo import Timings, library_versions

MASK_FILE = "mask.safetensors"
REPORT_FILE = "report.json"


def local_inputs(source: ModelSource, *paths) -> list[str]:
    return [source.model, *source.adapters, *[p for p in paths if p]]


def save_repaired(loaded: Loaded, masks: dict[str, torch.Tensor], folder: Path, save_merged: bool,
                  timings: Timings) -> dict:
    """Write the repaired model (adapter or full) and the mask into `folder`; returns what was written where."""
    outputs, _ = save_model(folder, loaded.model, loaded.tokenizer, timings, adapter=loaded.adapter_kept,
                            merged=save_merged, base=loaded.source)
    with timings.measure("save_s"):
        save_file({name: mask.to(torch.bool).contiguous() for name, mask in masks.items()}, str(folder / MASK_FILE))
    return {**outputs, "mask": MASK_FILE}


def _load_aligned(path: str | None, like: ModelSource) -> torch.nn.Module | None:
    if path is None:
        return None
    return load_model(ModelSource(model=path, dtype=like.dtype, device=like.device, trust_remote_code=like.trust_remote_code)).model


def realign_to_disk(
    source: ModelSource, config: RealignConfig, out: str | Path, *,
    data: DataSpec | None = None, protect_data: DataSpec | None = None, contrast_data: PairSet | None = None,
    aligned_model: str | None = None, save_merged: bool = False, overwrite: bool = False, progress: bool = True,
    offload: bool | None = None,
) -> RealignResult:
    """The `antidote realign` command: every input is checked before the model is touched.

    `offload` True computes layer by layer from the checkpoint (core.sequential), False in memory,
    None (auto) layer by layer when the model does not fit in free memory; the report's `execution` says
    which path ran and why."""
    inputs = local_inputs(source, aligned_model, data and data.source, protect_data and protect_data.source,
                          contrast_data and contrast_data.source)
    with output_run(out, overwrite=overwrite, inputs=inputs) as run:
        on_adapter = adapter_mode(config.targets, bool(source.adapters))  # refuses a bad `auto` before loading
        config.check_inputs(has_data=data is not None, has_protect_data=protect_data is not None,
                            has_aligned=aligned_model is not None, has_contrast=contrast_data is not None)
        pairs = data.load("unsafe") if data is not None else None
        protect_pairs = protect_data.load("all", require_response=False) if protect_data is not None else None
        execution = choose_execution(source, offload)
        if execution.path == "sequential":
            if save_merged:
                raise AntidoteError("--offload writes the pruned adapter only; drop --save-merged (or --offload)")
            result, outputs = realign_sequential(source, config, pairs, run.folder, progress=progress)
            run.timings.update(result.report.timings)
            _finish_report(result, run, source, None, outputs, execution)
            return result
        with run.timings.measure("load_s"):
            loaded = load_model(source, keep_adapter=on_adapter)
            aligned = _load_aligned(aligned_model, source)
        result = realign(
            loaded.model, loaded.tokenizer, config, pairs,
            protect_data=protect_pairs, contrast_data=contrast_data, aligned=aligned, progress=progress,
        )
        run.timings.update(result.report.timings)
        outputs = save_repaired(loaded, result.masks, run.folder, save_merged, run.timings)
        _finish_report(result, run, source, aligned_model, outputs, execution)
    return result


def realign_card(report: RealignReport, source: ModelSource) -> CardFacts:
    """The model card's facts of a realign run: what was pruned, with which settings, on which rows."""
    totals, method = report.totals, report.method
    data = {role: {"source": rows.source, "rows": rows.rows, "sha256": rows.sha256}
            for role, rows in (("calibration", report.data), ("contrast (the user's rows)", report.contrast),
                               ("protection", report.protection)) if rows is not None}
    return CardFacts(
        title="Antidote-repaired model",
        summary=(f"Antidote zeroed {totals.pruned:,} of {totals.scored:,} scored weights "
                 f"({100 * totals.pruned_fraction:.3f}%): score `{method.model_extra.get('score')}`, ratio "
                 f"{method.model_extra.get('ratio')}, targets {', '.join(method.targets)}."),
        base_model=source.model, base_adapters=list(source.adapters), method=method.model_dump(), data=data,
    )


def save_cards(folder: Path, outputs: dict, facts: CardFacts) -> dict:
    """`outputs` with the model cards written into its model folders (README.md), when any."""
    cards = write_model_cards(folder, outputs, facts)
    return {**outputs, "cards": cards} if cards else outputs


def _finish_report(result: RealignResult, run: OutputRun, source: ModelSource, aligned_model: str | None,
                   outputs: dict, execution: Execution) -> None:
    outputs = save_cards(run.folder, outputs, realign_card(result.report, source))
    result.report = result.report.model_copy(update=dict(
        model=source.describe(),
        aligned_model=aligned_model,
        outputs=outputs,
        **run.report_fields(),
        execution=ExecutionReport(**dataclasses.asdict(execution)),
    ))
    write_report(run.folder / REPORT_FILE, result.report)


def apply_mask_to_disk(
    source: ModelSource,
    mask_path: str | Path,
    out: str | Path,
    *,
    action: str = "zero",
    aligned_model: str | None = None,
    save_merged: bool = False,
    overwrite: bool = False,
) -> ApplyMaskReport:
    """The `antidote apply-mask` command: re-apply a saved mask, no scores recomputed."""
    with output_run(out, overwrite=overwrite, inputs=local_inputs(source, aligned_model, str(mask_path))) as run:
        mask_path = Path(mask_path)
        if not mask_path.is_file():
            raise AntidoteError(f"mask file not found: {mask_path}; give the mask.safetensors a realign run wrote")
        try:
            masks = load_file(str(mask_path))
        except Exception as exc:  # safetensors raises its own error types
            raise AntidoteError(f"cannot read mask {mask_path}: {str(exc).splitlines()[0]}") from None
        if not masks:
            raise AntidoteError(f"mask {mask_path} is empty")
        check_action(action, aligned_model is not None)
        on_adapter = any(".lora_" in name for name in masks)  # a mask saved from an adapter prunes it live
        with run.timings.measure("load_s"):
            loaded = load_model(source, keep_adapter=on_adapter)
            aligned = _load_aligned(aligned_model, source)
        targets = apply_masks(loaded.model, masks, action, aligned)
        outputs = save_repaired(loaded, masks, run.folder, save_merged, run.timings)
        report = ApplyMaskReport(
            mask=str(mask_path), action=action, model=source.describe(), aligned_model=aligned_model,
            pruned=int(sum(int(m.sum()) for m in masks.values())), parameters=len(targets),
            versions=library_versions(), outputs=outputs, timings=dict(run.timings),
        )
        write_report(run.folder / REPORT_FILE, report)
    return report
