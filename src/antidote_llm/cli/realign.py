"""`antidote realign` and `antidote apply-mask`."""

from __future__ import annotations

import argparse

from antidote_llm.cli.common import add_model_arguments, model_source
from antidote_llm.core.pipeline import DataSpec, apply_mask_to_disk, realign_to_disk
from antidote_llm.core.realign import RealignConfig
from antidote_llm.core.targets import NAMED_SETS


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("re-alignment data (harmful prompt, harmful answer pairs)")
    group.add_argument("--data", help="JSON, JSONL, CSV, TSV, Parquet file or hf:NAME[:SPLIT] (e.g. hf:PKU-Alignment/BeaverTails:30k_train)")
    group.add_argument("--prompt-field", help="field holding the prompt (detected if omitted)")
    group.add_argument("--response-field", help="field holding the harmful answer (detected if omitted)")
    group.add_argument("--input-field", help="field holding an optional input/context")
    group.add_argument("--samples", type=int, help="number of rows to use (default: all)")
    group.add_argument("--skip", type=int, default=0, help="skip the first N rows (keep re-alignment rows disjoint from poison rows)")
    group.add_argument("--seed", type=int, default=0, help="seed for row sampling and the random score")
    group.add_argument("--shuffle", action="store_true", help="shuffle rows (with --seed) before taking --samples")
    group.add_argument("--max-length", type=int, default=512)
    group.add_argument("--batch-size", type=int, default=8)
    group.add_argument("--template", default="alpaca", choices=["alpaca", "chat", "plain"], help="prompt format the model was trained with")
    group.add_argument("--tokens", default="all", choices=["all", "response"], help="which tokens count: all (reference) or the response only")


def _add_method_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method")
    group.add_argument("--ratio", type=float, required=True, help="alpha: fraction of weights to prune, in (0, 1); reference 0.05-0.1 for LoRA")
    group.add_argument("--score", default="wanda", choices=["wanda", "magnitude", "random"])
    group.add_argument("--granularity", default="row", choices=["row", "matrix", "global"])
    group.add_argument(
        "--targets", action="append", default=None,
        help=f"named set ({', '.join(NAMED_SETS)}) or glob over module names; repeat or comma-separate. "
             "Default auto: the fine-tuning adapter if given, else q/k/v",
    )
    group.add_argument("--protect-data", help="benign rows: weights in the top --protect-ratio of their Wanda score are never pruned")
    group.add_argument("--protect-ratio", type=float, help="beta for --protect-data")
    group.add_argument("--protect-samples", type=int, help="rows of --protect-data to use")
    group.add_argument("--action", default="zero", choices=["zero", "revert"], help="revert: restore the --reference model's values (full fine-tunes)")
    group.add_argument("--reference", help="the aligned model, for --action revert")


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    group.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    group.add_argument("--save-merged", action="store_true", help="adapter mode: also write the fully merged model")
    group.add_argument("--quiet", action="store_true", help="no progress bar")


def _summary(report: dict, out: str) -> str:
    totals = report["totals"]
    method = report["method"]
    lines = [
        f"antidote: pruned {totals['pruned']:,} of {totals['scored']:,} scored weights "
        f"({100 * totals['pruned_fraction']:.3f}%) in {totals['targets']} tensors",
        f"  method: score={method['score']} ratio={method['ratio']} granularity={method['granularity']} "
        f"targets={','.join(method['targets'])} tokens={method['token_scope']}",
    ]
    if report.get("data"):
        lines.append(f"  data: {report['data']['rows']} rows, {report['data']['tokens']:,} tokens from {report['data']['source']}")
    if report.get("protection"):
        lines.append(f"  protection: {report['protection']['spared']:,} selected weights spared")
    timings = report["timings"]
    lines.append("  time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in timings.items()))
    lines.append(f"  wrote {out}")
    return "\n".join(lines)


def run_realign(args: argparse.Namespace) -> int:
    config = RealignConfig(
        ratio=args.ratio, score=args.score, granularity=args.granularity, targets=args.targets or ("auto",),
        tokens=args.tokens, template=args.template, max_length=args.max_length, batch_size=args.batch_size,
        seed=args.seed, protect_ratio=args.protect_ratio, action=args.action,
    )
    data = None
    if args.data:
        data = DataSpec(
            args.data, prompt_field=args.prompt_field, response_field=args.response_field, input_field=args.input_field,
            samples=args.samples, skip=args.skip, seed=args.seed if args.shuffle else None,
        )
    protect = None
    if args.protect_data:
        protect = DataSpec(args.protect_data, samples=args.protect_samples, safety=None, require_response=False)
    result = realign_to_disk(
        model_source(args), config, args.out, data=data, protect_data=protect, reference=args.reference,
        save_merged=args.save_merged, overwrite=args.overwrite, progress=not args.quiet,
    )
    print(_summary(result.report, args.out))
    return 0


def run_apply_mask(args: argparse.Namespace) -> int:
    report = apply_mask_to_disk(
        model_source(args), args.mask, args.out, action=args.action, reference=args.reference,
        save_merged=args.save_merged, overwrite=args.overwrite,
    )
    print(f"antidote: applied {report['pruned']:,} masked weights in {report['parameters']} tensors; wrote {args.out}")
    return 0


def register(subparsers) -> None:
    realign = subparsers.add_parser(
        "realign", help="prune the weights most active on harmful data (Antidote)",
        description="Score every target weight by |W|*||x|| on harmful data and prune the top --ratio.",
    )
    add_model_arguments(realign)
    _add_data_arguments(realign)
    _add_method_arguments(realign)
    _add_output_arguments(realign)
    realign.set_defaults(func=run_realign)

    apply = subparsers.add_parser("apply-mask", help="re-apply a saved mask.safetensors to a model")
    add_model_arguments(apply)
    apply.add_argument("--mask", required=True, help="mask.safetensors written by antidote realign")
    apply.add_argument("--action", default="zero", choices=["zero", "revert"])
    apply.add_argument("--reference", help="the aligned model, for --action revert")
    apply.add_argument("--out", required=True)
    apply.add_argument("--overwrite", action="store_true")
    apply.add_argument("--save-merged", action="store_true")
    apply.set_defaults(func=run_apply_mask)
