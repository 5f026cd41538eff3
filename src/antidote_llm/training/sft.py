"""The two training stages before Antidote: safety alignment and the user's (possibly poisoned) fine-tuning.

Both are LoRA supervised fine-tuning through the Hugging Face Trainer, so `accelerate launch` brings
multi-GPU data parallelism without changes here. The loss covers the answer tokens only, as in the
authors' code; rows are grouped by length so batches carry little padding.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from antidote_llm.data.mix import build_mix, mix_spec
from antidote_llm.data.records import Pair, Rows, as_pairs, describe_rows, pairs_sha256
from antidote_llm.data.templates import encode_pair, fit_max_length
from antidote_llm.errors import AntidoteError
from antidote_llm.runtime.loading import merge_adapter, model_positions
from antidote_llm.runtime.outputs import OutputRun, output_run, save_model, write_json, write_report
from antidote_llm.runtime.runinfo import Timings, library_versions
from antidote_llm.training.config import TrainConfig
from antidote_llm.training.methods.base import MethodRun
from antidote_llm.training.report import TrainFacts, TrainReport
from antidote_llm.training.trainer import (
    IGNORE_INDEX,
    TENSORBOARD_DIR,
    log_tensorboard_to,
    sft_trainer_class,
    supervised_collator,
    training_arguments,
)

REPORT_FILE = "report.json"


# --- data -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One tokenized training row: labels are -100 on the prompt, so only the answer is learned."""

    input_ids: list[int]
    labels: list[int]


def encode_example(tokenizer, pair: Pair, template: str, max_length: int | None) -> Example:
    encoded = encode_pair(tokenizer, template, pair.prompt, pair.response, pair.input, max_length=max_length)
    ids = encoded.input_ids
    labels = [IGNORE_INDEX] * encoded.prompt_len + ids[encoded.prompt_len:]
    return Example(input_ids=ids, labels=labels)


MAX_DROPPED_SHARE = 0.1  # more rows than this without an answer token left is an error, not a detail


def encode_rows(tokenizer, pairs: Sequence[Pair], config: TrainConfig) -> tuple[list[dict], int]:
    """Tokenized rows as Trainer items, and how many were dropped for having no answer token left.

    A row whose prompt fills max_length would add nothing but a NaN-prone empty loss, so it is dropped.
    """
    items, dropped = [], []
    for pair in pairs:
        example = encode_example(tokenizer, pair, config.template, config.max_length)
        if any(label != IGNORE_INDEX for label in example.labels):
            items.append({"input_ids": example.input_ids, "labels": example.labels})
        else:
            dropped.append(pair)
    if len(dropped) > MAX_DROPPED_SHARE * len(pairs):
        # training on what is left would quietly change the data mix (the poison fraction, the task)
        longest = max(len(encode_example(tokenizer, pair, config.template, None).input_ids) for pair in dropped)
        raise AntidoteError(
            f"{len(dropped)} of {len(pairs)} rows have no answer token within max_length={config.max_length} (their "
            f"prompts fill it); raise --max-length (the longest of them needs {longest} tokens)"
        )
    return items, len(dropped)


# --- training ---------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a stage produced. `model` is the aligned merged model (align) or the model with the live
    fine-tuning adapter (finetune), ready for the next stage without reloading."""

    out_dir: Path
    adapter_dir: Path
    model: torch.nn.Module
    report: TrainReport | None
    wrote: bool = field(default=True, kw_only=True)  # False in the other processes of `accelerate launch`: only the main process writes


@dataclass
class FinetuneResult(TrainResult):
    mix: dict
    harmful_indices: tuple[int, ...]  # source indices of the poison rows: keep re-alignment data disjoint


def _lora_model(model, config: TrainConfig):
    """A fresh LoRA on `model`, initialised from the config's seed."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import set_seed

    if isinstance(model, PeftModel):
        raise AntidoteError(
            "the model already carries a LoRA adapter; merge it first (load_model merges adapters, align returns a merged model)"
        )
    set_seed(config.seed)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise AntidoteError(f"cannot add LoRA: {str(exc).splitlines()[0]}; check target_modules") from None


def _train(
    model, tokenizer, pairs: Sequence[Pair], config: TrainConfig, timings: Timings, progress: bool,
    method: MethodRun | None = None, report_to: Sequence[str] = (), run: OutputRun | None = None,
) -> tuple[object, TrainFacts, bool]:
    """Add a LoRA to `model` and train it, with a training-stage defense when `method` is given; returns the
    PEFT model (in eval mode), the training facts and whether this is the main process (under
    `accelerate launch` only the main process writes). `report_to`: trackers of the loss curves; TensorBoard's
    events go to the run's folder, tensorboard/ (on the main process: the others write nothing)."""
    from transformers.trainer_callback import PrinterCallback

    if method is not None:
        method.check(config.gradient_accumulation)
    fit_max_length(config.max_length, model_positions(model))  # a row past the model's positions is refused
    with timings.measure("tokenize_s"):
        items, dropped = encode_rows(tokenizer, pairs, config)
        extra = {role: encode_rows(tokenizer, as_pairs(rows), config)[0] for role, rows in (method.extra if method else {}).items()}
    peft_model = _lora_model(model, config)
    on_cpu = next(model.parameters()).device.type == "cpu"
    method_arguments = {} if method is None else {
        "method_settings": method.defense, "extra_items": extra}
    trainer_class = sft_trainer_class() if method is None else method.defense.trainer()
    with tempfile.TemporaryDirectory(prefix="antidote-trainer-") as scratch:
        trainer = trainer_class(
            model=peft_model,
            args=training_arguments(config, scratch, on_cpu, progress, report_to),
            data_collator=supervised_collator(tokenizer),
            train_dataset=items,
            **method_arguments,
        )
        if not progress:  # without a progress bar the Trainer prints every log line instead
            trainer.remove_callback(PrinterCallback)
        if run is not None and trainer.is_world_process_zero():
            log_tensorboard_to(trainer, run.folder / TENSORBOARD_DIR)
        with timings.measure("train_s"):
            output = trainer.train()
    peft_model.eval()
    history = [
        {key: entry[key] for key in ("step", "epoch", "loss", "learning_rate", "grad_norm") if key in entry}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    facts = TrainFacts(
        rows=len(items),
        dropped_no_answer=dropped,
        tokens=sum(len(item["input_ids"]) for item in items),
        answer_tokens=sum(sum(label != IGNORE_INDEX for label in item["labels"]) for item in items),
        steps=trainer.state.global_step,
        train_loss=output.training_loss,
        loss_history=history,
    )
    return peft_model, facts, trainer.is_world_process_zero()


def _logs(folder: Path) -> dict:
    """The tracker files the run wrote into its folder (TensorBoard's events), for the report's outputs."""
    return {"tensorboard": TENSORBOARD_DIR} if (folder / TENSORBOARD_DIR).is_dir() else {}


def _report(stage: str, config: TrainConfig, data: dict, facts: TrainFacts, run: OutputRun, model_info: dict | None,
            outputs: dict, method: MethodRun | None = None) -> TrainReport:
    defense = None if method is None else {
        "name": method.defense.name, "settings": method.defense.settings(),
        "data": {role: describe_rows(rows) for role, rows in method.extra.items()}}
    return TrainReport(stage=stage, model=model_info, config=config, data=data, train=facts, outputs=outputs,
                       timings=dict(run.timings), memory=run.memory.report(), versions=library_versions(), defense=defense)


def _check_stage(method: MethodRun | None, stage: str) -> None:
    if method is not None and method.defense.stage != stage:
        name, own = method.defense.name, method.defense.stage
        raise AntidoteError(f"defense {name!r} acts at the {own} stage, not {stage}; "
                            f"use it with `antidote {own} --defense {name}`")


def align(
    model, tokenizer, pairs: Rows, config: TrainConfig, out_dir: str | Path, *,
    benign: Rows | None = None, method: MethodRun | None = None, model_info: dict | None = None, progress: bool = True,
    report_to: Sequence[str] = (),
) -> TrainResult:
    """Safety alignment: LoRA SFT on (harmful prompt, safe answer) rows, optionally mixed with benign rows,
    or an alignment-stage defense (Vaccine, RepNoise, Booster) when `method` is given.

    Writes `adapter/` (PEFT, safetensors), `merged/` (base with the adapter merged, plus tokenizer) and
    `report.json` into `out_dir`, atomically. `model` is changed in place (the adapter ends merged into
    it) and returned as `result.model`; pass a copy to keep the original. `report_to`: trackers that get the loss
    curves (checked names, training.config.tracker_names); TensorBoard's events land in `out_dir`/tensorboard.
    """
    _check_stage(method, "align")
    rows = as_pairs(pairs) + (as_pairs(benign) if benign is not None else ())
    data = {"safety": describe_rows(pairs), **({"benign": describe_rows(benign)} if benign is not None else {})}
    return _merged_stage("align", model, tokenizer, rows, data, config, out_dir, model_info, progress, method,
                         report_to)


def unalign(
    model,
    tokenizer,
    pairs: Rows,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    model_info: dict | None = None,
    progress: bool = True,
    report_to: Sequence[str] = (),
) -> TrainResult:
    """RESTA's unaligned model: a short LoRA SFT of the aligned model on (harmful prompt, harmful answer) rows,
    written as `align` writes (adapter/, merged/, report.json); the adapter lies on the aligned model."""
    return _merged_stage("unalign", model, tokenizer, as_pairs(pairs), {"harmful": describe_rows(pairs)}, config,
                         out_dir, model_info, progress, report_to=report_to)


def _merged_stage(stage: str, model, tokenizer, rows, data: dict, config: TrainConfig, out_dir: str | Path,
                  model_info: dict | None, progress: bool, method: MethodRun | None = None,
                  report_to: Sequence[str] = ()) -> TrainResult:
    out = Path(out_dir)
    with output_run(out, overwrite=True) as run:  # the callers checked the folder; a stage replaces it
        peft_model, facts, main_process = _train(model, tokenizer, rows, config, run.timings, progress, method,
                                                 report_to, run)
        if not main_process:  # under accelerate launch only the main process writes
            merged = merge_adapter(peft_model)
            report = _report(stage, config, data, facts, run, model_info, {}, method)
            return TrainResult(out_dir=out, adapter_dir=out / "adapter", model=merged, report=report, wrote=False)
        outputs, merged = save_model(run.folder, peft_model, tokenizer, run.timings, adapter=True, merged=True)
        outputs.update(_logs(run.folder))
        report = _report(stage, config, data, facts, run, model_info, outputs, method)
        write_report(run.folder / REPORT_FILE, report)
    return TrainResult(out_dir=out, adapter_dir=out / "adapter", model=merged, report=report)


def finetune(
    model,
    tokenizer,
    task_pairs: Rows,
    harmful_pairs: Rows | None,
    *,
    harmful_fraction: float,
    n: int,
    config: TrainConfig,
    out_dir: str | Path,
    seed: int | None = None,
    method: MethodRun | None = None,
    model_info: dict | None = None,
    progress: bool = True,
    report_to: Sequence[str] = (),
) -> FinetuneResult:
    """The user's fine-tuning: a fresh LoRA on the aligned (merged) model over a mix of n rows, a fraction
    `harmful_fraction` of them harmful.

    Writes `adapter/`, `mix.json` (every row's origin, in training order) and `report.json` into
    `out_dir`, atomically. `seed` shuffles the mix (default: config.seed). The returned model keeps the
    fine-tuning adapter live, since Antidote scores its lora_A/lora_B weights. `method`: a fine-tuning-stage
    defense the provider runs (Lisa, LDIFS). `report_to`: as for `align`.
    """
    _check_stage(method, "finetune")
    spec = mix_spec(harmful_fraction, n)
    mix_seed = config.seed if seed is None else seed
    rows, origins = build_mix(task_pairs, harmful_pairs, spec, mix_seed)
    harmful_indices = tuple(sorted(o["index"] for o in origins if o["kind"] == "harmful"))
    mix = {
        "samples_total": spec.samples_total,
        "harmful_fraction": spec.harmful_fraction,
        "harmful_rows": spec.harmful_rows,
        "task_rows": spec.task_rows,
        "seed": mix_seed,
        "harmful_source": describe_rows(harmful_pairs) if harmful_pairs is not None else None,
        "task_source": describe_rows(task_pairs),
        "harmful_indices": list(harmful_indices),
        "rows": origins,
    }
    data = {"mix": {k: v for k, v in mix.items() if k != "rows"}, "mix_sha256": pairs_sha256(rows)}
    out = Path(out_dir)
    with output_run(out, overwrite=True) as run:  # the callers checked the folder; a stage replaces it
        peft_model, facts, main_process = _train(model, tokenizer, rows, config, run.timings, progress, method,
                                                 report_to, run)
        result = FinetuneResult(out_dir=out, adapter_dir=out / "adapter", model=peft_model, report=None,
                                mix=mix, harmful_indices=harmful_indices)
        if not main_process:  # under accelerate launch only the main process writes
            result.report = _report("finetune", config, data, facts, run, model_info, {}, method)
            result.wrote = False
            return result
        outputs, _ = save_model(run.folder, peft_model, tokenizer, run.timings, adapter=True)
        outputs.update(_logs(run.folder))
        write_json(run.folder / "mix.json", mix)
        result.report = _report("finetune", config, data, facts, run, model_info, {**outputs, "mix": "mix.json"},
                                method)
        write_report(run.folder / REPORT_FILE, result.report)
    return result
