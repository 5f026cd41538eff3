"""`antidote realign` and `antidote apply-mask`."""

from __future__ import annotations

import argparse

from antidote_llm.cli import peers
from antidote_llm.cli.common import (
    CATEGORY_HELP,
    add_judge_options,
    add_model_arguments,
    add_push_arguments,
    model_source,
    push_repaired,
)
from antidote_llm.cli.options import add_config_options, config_from_args
from antidote_llm.core.pipeline import apply_mask_to_disk, realign_to_disk
from antidote_llm.core.realign import RealignConfig
from antidote_llm.core.report import RealignReport
from antidote_llm.data.records import PairSet
from antidote_llm.data.spec import DataSpec
from antidote_llm.errors import AntidoteError
from antidote_llm.evaluation.settings import JUDGE_FIELDS, EvalSettings
from antidote_llm.evaluation.tasks import TASKS
from antidote_llm.frontier import DEFAULT_RATIOS, FrontierConfig
from antidote_llm.frontier.disk import ProbeSpec, frontier_to_disk, user_rows
from antidote_llm.runtime.hub import check_push

DATA_FIELDS = ("source", "prompt_field", "response_field", "input_field", "samples", "skip")
METHOD_FIELDS = tuple(name for name in RealignConfig.model_fields if name not in ("ratio", "template", "max_length",
                                                                                  "batch_size", "tokens", "seed"))
EVAL_PREFIX = "eval_"
CALIBRATION_FIELDS = ("template", "tokens", "max_length", "batch_size", "seed")


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("re-alignment data (harmful prompt, harmful answer pairs)")
    add_config_options(group, DataSpec, DATA_FIELDS, flags={"source": "data"},
                       help_extra={"source": "(e.g. hf:PKU-Alignment/BeaverTails:30k_train; needed by score wanda)"},
                       optional=("source",))
    group.add_argument("--shuffle", action="store_true", help="shuffle rows (with --seed) before taking --samples")
    add_config_options(group, RealignConfig, CALIBRATION_FIELDS,
                       help_extra={"seed": "and of --shuffle"})


def _add_method_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method")
    group.add_argument("--ratio", type=str, metavar="RATIO[,RATIO...]|auto", help=(
        f"{RealignConfig.model_fields['ratio'].description}. Several, comma-separated and increasing: one scoring "
        "pass, one nested mask each (masks.safetensors), each point evaluated when --probe-prompts is given. auto: "
        f"the ratio of {', '.join(map(str, DEFAULT_RATIOS))} with the lowest harmful score whose fine-tune accuracy "
        "stays within --max-accuracy-drop of the un-repaired model's"))
    add_config_options(group, RealignConfig, METHOD_FIELDS)  # Antidote's own; the peers have none
    group.add_argument("--protect-data", help="benign rows for --protect-ratio")
    group.add_argument("--protect-samples", type=int, help="rows of --protect-data to use")
    group.add_argument("--aligned-model", help="the aligned model the fine-tune started from, for --action revert")
    add_contrast_arguments(group)


def add_contrast_arguments(group) -> None:
    group.add_argument("--contrast-data", metavar="SRC", help="the user's own fine-tuning rows, for --score refusal (it "
                       "keeps their loss low) and --compensate (it re-fits on them); read as --task's training rows when "
                       "--task is given")
    group.add_argument("--contrast-samples", type=int, help="rows of --contrast-data to use (default: all)")
    group.add_argument("--contrast-skip", type=int, default=0, help="skip the first N rows of --contrast-data")


def contrast_rows(args: argparse.Namespace) -> PairSet | None:
    """The user's own rows: --task's training rows when --task is given, else prompt/response rows."""
    if not args.contrast_data:
        return None
    return user_rows(args.task, args.contrast_data, args.contrast_samples, args.contrast_skip)


def _add_frontier_arguments(parser: argparse.ArgumentParser) -> None:
    group = add_probe_arguments(parser, "frontier (several ratios or --ratio auto): where each point is evaluated")
    add_config_options(group, FrontierConfig, ("max_accuracy_drop", "controls"))


def add_probe_arguments(parser: argparse.ArgumentParser, title: str):
    """Where repairs are evaluated: harmful probe prompts, the user's validation rows of a task, the benign rows of
    the benign-calibrated control, and the evaluation settings."""
    group = parser.add_argument_group(title)
    group.add_argument("--probe-prompts", metavar="SRC", help="harmful probe prompts for the harmful score (file or hf:)")
    group.add_argument("--probe-field", help="field of the probe prompt (detected if omitted)")
    group.add_argument("--category-field", metavar="NAME", help=CATEGORY_HELP.format(what="probe prompt"))
    group.add_argument("--probe-samples", type=int, help="probe prompts to use (default: all)")
    group.add_argument("--probe-skip", type=int, default=0, help="skip the first N probe prompts")
    group.add_argument("--task", help=f"the user's task, scored on --validation-data: {', '.join(TASKS)}")
    group.add_argument("--validation-data", metavar="SRC", help="the user's validation rows of --task (never the test rows)")
    group.add_argument("--validation-samples", type=int, help="validation rows to use (default: all)")
    group.add_argument("--validation-skip", type=int, default=0,
                       help="skip the first N rows of --validation-data (e.g. the rows the fine-tuning used)")
    group.add_argument("--benign-data", metavar="SRC", help="benign rows for the benign-calibrated control")
    group.add_argument("--benign-samples", type=int, help="rows of --benign-data to use (default: all)")
    add_config_options(group, EvalSettings, tuple(n for n in EvalSettings.model_fields if n not in JUDGE_FIELDS),
                       prefix=EVAL_PREFIX, flags={"max_new_tokens": "max-new-tokens",
                                                  "task_max_new_tokens": "task-max-new-tokens",
                                                  "task_prompt": "task-prompt", "stop_settled": "stop-settled"})
    add_judge_options(group, prefix=EVAL_PREFIX)
    return group


def parse_ratio(text: str) -> tuple[float, ...] | None:
    """`0.05` -> (0.05,); `0.01,0.05` -> (0.01, 0.05); `auto` -> None (the default grid, picked automatically)."""
    if text.strip().lower() == "auto":
        return None
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise AntidoteError(f"--ratio {text!r} is not a number, a comma-separated list of numbers, or auto") from None


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    group.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    group.add_argument("--save-merged", action="store_true", help="adapter mode: also write the fully merged model")
    group.add_argument("--quiet", action="store_true", help="no progress bar")
    add_push_arguments(group)
    parser.add_argument(
        "--offload", action=argparse.BooleanOptionalAction, default=None,
        help="compute layer by layer from the safetensors files, one decoder layer in memory at a time "
        "(default: when the model does not fit in free memory)",
    )


def _summary(report: RealignReport, out: str) -> str:
    totals, method = report.totals, report.method
    lines = [
        f"antidote: pruned {totals.pruned:,} of {totals.scored:,} scored weights "
        f"({100 * totals.pruned_fraction:.3f}%) in {totals.targets} tensors",
        f"  method: score={method.score} ratio={method.ratio} granularity={method.granularity} "
        f"targets={','.join(method.targets)} tokens={method.tokens}",
    ]
    if report.data:
        lines.append(f"  data: {report.data.rows} rows, {report.data.tokens:,} tokens from {report.data.source}")
    if report.protection:
        lines.append(f"  protection: {report.protection.spared:,} selected weights spared")
    if report.contrast:
        lines.append(f"  contrast: {report.contrast.rows} rows from {report.contrast.source}")
    lines.append("  time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in report.timings.items()))
    if report.execution:
        lines.append(f"  path: {report.execution.path} ({report.execution.reason})")
    lines.append(f"  wrote {out}")
    return "\n".join(lines)


def benign_spec(args: argparse.Namespace) -> DataSpec | None:
    return DataSpec(source=args.benign_data, samples=args.benign_samples) if args.benign_data else None


def probe_spec(args: argparse.Namespace) -> ProbeSpec | None:
    given = [args.probe_prompts, args.task, args.validation_data]
    if not (args.probe_prompts or args.validation_data):
        if args.category_field:
            raise AntidoteError("--category-field names a field of the probe prompts; give --probe-prompts")
        if args.task and not args.contrast_data:
            raise AntidoteError("--task names the task of --validation-data or --contrast-data; give one of them")
        return None
    if not all(given):
        raise AntidoteError("evaluating the frontier needs --probe-prompts, --task and --validation-data together")
    return ProbeSpec(
        prompts=DataSpec(source=args.probe_prompts, prompt_field=args.probe_field, samples=args.probe_samples,
                         skip=args.probe_skip, category_field=args.category_field),
        task=args.task, validation=args.validation_data, validation_samples=args.validation_samples,
        validation_skip=args.validation_skip,
        settings=config_from_args(EvalSettings, args, EvalSettings.model_fields, prefix=EVAL_PREFIX),
    )


def _frontier_summary(report, out: str) -> str:
    lines = [f"antidote: {len(report.ratios)} ratios from one scoring pass; nested masks in {out}/masks.safetensors"]
    for point in report.points:
        name = "un-repaired" if point.ratio is None else f"{point.selection} {point.ratio:g}"
        lines.append(f"  {name:<22} HS {point.harmful_score}  FA {point.finetune_accuracy}  "
                     f"pruned {100 * point.pruned_fraction:.2f}%")
    if report.picked_ratio is not None:
        lines.append(f"  auto: ratio {report.picked_ratio:g} (lowest HS within {report.max_accuracy_drop} FA points); "
                     "the repaired model is in the output folder")
    lines.append(f"  wrote {out}")
    return "\n".join(lines)


def run_realign(args: argparse.Namespace) -> int:
    peers.refuse_foreign_flags(args)
    if args.method != peers.ANTIDOTE:
        if args.push_to_hub:
            raise AntidoteError(f"--push-to-hub uploads Antidote's repaired model, not --method {args.method}'s; drop it")
        return peers.run(args, model_source(args))
    if args.ratio is None:
        raise AntidoteError("--method antidote needs --ratio (a number, a comma-separated list, or auto)")
    ratios = parse_ratio(args.ratio)
    config = config_from_args(RealignConfig, args, RealignConfig.model_fields, ratio=ratios[0] if ratios else DEFAULT_RATIOS[0])
    data = None
    if args.source:
        data = config_from_args(DataSpec, args, DATA_FIELDS, seed=config.seed if args.shuffle else None)
    protect = DataSpec(source=args.protect_data, samples=args.protect_samples) if args.protect_data else None
    probe = probe_spec(args)
    frontier_run = ratios is None or len(ratios) > 1 or probe is not None
    if args.push_to_hub:
        if frontier_run and ratios is not None:
            raise AntidoteError("--push-to-hub uploads a repaired model: give one --ratio or --ratio auto (several "
                                "ratios write masks, not a model)")
        check_push(args.push_to_hub)
    if frontier_run:
        if data is None:
            raise AntidoteError("several ratios and --ratio auto score on harmful rows; pass --data")
        frontier = config_from_args(FrontierConfig, args, ("max_accuracy_drop", "controls"), ratios=ratios)
        report = frontier_to_disk(
            model_source(args), config, frontier, args.out, data=data, probe=probe, benign=benign_spec(args),
            protect_data=protect, contrast_data=contrast_rows(args),
            pick=ratios is None, save_merged=args.save_merged, overwrite=args.overwrite, progress=not args.quiet,
        )
        print(_frontier_summary(report, args.out))
        if args.push_to_hub:
            print(push_repaired(args.out, report.outputs, args.push_to_hub, private=args.private,
                                message=f"antidote realign --ratio auto: ratio {report.picked_ratio:g}"))
        return 0
    result = realign_to_disk(
        model_source(args), config, args.out, data=data, protect_data=protect, contrast_data=contrast_rows(args),
        aligned_model=args.aligned_model, save_merged=args.save_merged, overwrite=args.overwrite,
        progress=not args.quiet, offload=args.offload,
    )
    print(_summary(result.report, args.out))
    if args.push_to_hub:
        print(push_repaired(args.out, result.report.outputs, args.push_to_hub, private=args.private,
                            message=f"antidote realign: ratio {config.ratio:g}"))
    return 0


def run_apply_mask(args: argparse.Namespace) -> int:
    report = apply_mask_to_disk(
        model_source(args), args.mask, args.out,
        action=args.action or RealignConfig.model_fields["action"].default, aligned_model=args.aligned_model,
        save_merged=args.save_merged, overwrite=args.overwrite,
    )
    print(f"antidote: applied {report.pruned:,} masked weights in {report.parameters} tensors; wrote {args.out}")
    return 0


def register(subparsers) -> None:
    realign = subparsers.add_parser(
        "realign", help="prune the weights most active on harmful data (Antidote)",
        description="Score every target weight by |W|*||x|| on harmful data and prune the top --ratio.",
    )
    add_model_arguments(realign)
    peers.add_arguments(realign)
    _add_data_arguments(realign)
    _add_method_arguments(realign)
    _add_frontier_arguments(realign)
    _add_output_arguments(realign)
    realign.set_defaults(func=run_realign)

    apply = subparsers.add_parser("apply-mask", help="re-apply a saved mask.safetensors to a model")
    add_model_arguments(apply)
    apply.add_argument("--mask", required=True, help="mask.safetensors written by antidote realign")
    add_config_options(apply, RealignConfig, ("action",))
    apply.add_argument("--aligned-model", help="the aligned model the fine-tune started from, for --action revert")
    apply.add_argument("--out", required=True)
    apply.add_argument("--overwrite", action="store_true")
    apply.add_argument("--save-merged", action="store_true")
    apply.set_defaults(func=run_apply_mask)
