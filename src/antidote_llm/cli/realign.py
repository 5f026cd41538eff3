"""`antidote realign` and `antidote apply-mask`."""

from __future__ import annotations

import argparse

from antidote_llm.cli import peers
from antidote_llm.cli.common import add_model_arguments, model_source
from antidote_llm.cli.options import add_config_options, config_from_args
from antidote_llm.core.pipeline import apply_mask_to_disk, realign_to_disk
from antidote_llm.core.realign import RealignConfig
from antidote_llm.core.report import RealignReport
from antidote_llm.data.spec import DataSpec

DATA_FIELDS = ("source", "prompt_field", "response_field", "input_field", "samples", "skip")
METHOD_FIELDS = tuple(name for name in RealignConfig.model_fields if name not in ("template", "max_length", "batch_size",
                                                                                  "tokens", "seed"))
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
    add_config_options(group, RealignConfig, METHOD_FIELDS, optional=("ratio",))  # antidote's own; the peers have none
    group.add_argument("--protect-data", help="benign rows for --protect-ratio")
    group.add_argument("--protect-samples", type=int, help="rows of --protect-data to use")
    group.add_argument("--aligned-model", help="the aligned model the fine-tune started from, for --action revert")


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    group.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    group.add_argument("--save-merged", action="store_true", help="adapter mode: also write the fully merged model")
    group.add_argument("--quiet", action="store_true", help="no progress bar")


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
    lines.append("  time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in report.timings.items()))
    lines.append(f"  wrote {out}")
    return "\n".join(lines)


def run_realign(args: argparse.Namespace) -> int:
    peers.refuse_foreign_flags(args)
    if args.method != peers.ANTIDOTE:
        return peers.run(args, model_source(args))
    config = config_from_args(RealignConfig, args, RealignConfig.model_fields)
    data = None
    if args.source:
        data = config_from_args(DataSpec, args, DATA_FIELDS, seed=config.seed if args.shuffle else None)
    protect = DataSpec(source=args.protect_data, samples=args.protect_samples) if args.protect_data else None
    result = realign_to_disk(
        model_source(args), config, args.out, data=data, protect_data=protect, aligned_model=args.aligned_model,
        save_merged=args.save_merged, overwrite=args.overwrite, progress=not args.quiet,
    )
    print(_summary(result.report, args.out))
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
