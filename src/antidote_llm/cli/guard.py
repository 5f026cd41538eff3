"""`antidote guard`: decide whether a customer's fine-tuned model is safe to ship, repair it if a repair meets the
safety target within the accuracy budget, and refuse it otherwise (exit code 3), with the evidence."""

from __future__ import annotations

import argparse

from antidote_llm.cli.common import add_model_command, add_push_arguments, model_source, push_repaired
from antidote_llm.cli.options import add_config_options, config_from_args
from antidote_llm.cli.realign import (
    DATA_FIELDS,
    add_contrast_arguments,
    add_probe_arguments,
    benign_spec,
    contrast_rows,
    probe_spec,
)
from antidote_llm.data.spec import DataSpec
from antidote_llm.errors import AntidoteError
from antidote_llm.frontier.guard import EXIT_CODES, GuardSettings, split_settings
from antidote_llm.frontier.guard_disk import guard_to_disk
from antidote_llm.runtime.hub import check_push

CALIBRATION_HELP = ("the selection's calibration rows: refusals to harmful prompts (harmful prompt, safe answer) for "
                    "--score refusal, the default; harmful answers for --score wanda")


def _summary(report, out: str) -> str:
    lines = [f"antidote guard: {report.verdict.upper()}: {report.reason}",
             f"  fine-tuned: probe HS {report.fine_tuned.harmful.text()}, validation FA "
             f"{report.fine_tuned.accuracy.text()}"]
    if report.candidate is not None:
        lines.append(f"  at ratio {report.ratio:g}: probe HS {report.candidate.harmful.text()}, validation FA "
                     f"{report.candidate.accuracy.text()}, drop {report.accuracy_drop.text()} points")
    lines += [f"  warning: {warning}" for warning in report.warnings]
    written = [path for key, path in report.outputs.items() if key in ("adapter", "model", "merged")]
    cards = ", with model cards" if report.outputs.get("cards") else ""
    lines.append(f"  wrote {out} (verdict.json, verdict.md{''.join(', ' + p for p in written)}{cards})")
    return "\n".join(lines)


def run_guard(args: argparse.Namespace) -> int:
    settings = config_from_args(GuardSettings, args, GuardSettings.model_fields)
    selection, decision = split_settings(settings)
    probe = probe_spec(args)
    if probe is None:
        raise AntidoteError("guard decides on probe prompts and the user's validation rows: give --probe-prompts, "
                            "--task and --validation-data")
    if args.source is None and selection.needs_data:
        raise AntidoteError(f"--score {selection.score} scores on calibration rows: give --data ({CALIBRATION_HELP})")
    if selection.uses_user_rows and not args.contrast_data:
        use = "--score refusal weighs the refusals against" if selection.score == "refusal" else "--compensate re-fits on"
        plain = "" if selection.score == "refusal" else " (or --no-compensate: zero without a re-fit)"
        raise AntidoteError(f"{use} the user's own rows: give --contrast-data (the user's fine-tuning rows of --task)"
                            f"{plain}")
    data = (config_from_args(DataSpec, args, DATA_FIELDS, seed=selection.seed if args.shuffle else None)
            if args.source else None)
    if args.push_to_hub:
        check_push(args.push_to_hub)
    report = guard_to_disk(model_source(args), selection, decision, args.out, data=data, probe=probe,
                           contrast_data=contrast_rows(args), benign=benign_spec(args), save_merged=args.save_merged,
                           overwrite=args.overwrite, progress=not args.quiet)
    print(_summary(report, args.out))
    if args.push_to_hub:
        if report.verdict == "repaired":
            print(push_repaired(args.out, report.outputs, args.push_to_hub, private=args.private,
                                message=f"antidote guard: repaired at ratio {report.ratio:g}"))
        else:
            print(f"  not pushed: the verdict is {report.verdict} (--push-to-hub uploads a repaired model only)")
    return EXIT_CODES[report.verdict]


def register(subparsers) -> None:
    guard = add_model_command(
        subparsers, "guard", help="decide: safe as it is, repaired within the accuracy budget, or rejected (exit 3)",
        description="Decide whether a fine-tuned model is safe to ship (the probe harmful score's 95 percent upper "
                    "bound within --max-harmful); if not, find the smallest pruning ratio that makes it safe and "
                    "check its accuracy drop against --max-accuracy-drop. Writes verdict.json and verdict.md, and the "
                    "repaired adapter only when the verdict is repaired (or with --write-best).",
    )
    data = guard.add_argument_group("calibration rows of the selection")
    add_config_options(data, DataSpec, DATA_FIELDS, flags={"source": "data"}, help_extra={"source": CALIBRATION_HELP},
                       optional=("source",))
    data.add_argument("--shuffle", action="store_true", help="shuffle rows (with --seed) before taking --samples")
    add_contrast_arguments(data)
    add_config_options(guard.add_argument_group("the decision and the selection"), GuardSettings,
                       tuple(GuardSettings.model_fields))
    add_probe_arguments(guard, "where the decision is measured (never the rows you report on)")
    output = guard.add_argument_group("output")
    output.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    output.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    output.add_argument("--save-merged", action="store_true", help="also write the fully merged repaired model")
    output.add_argument("--quiet", action="store_true", help="no progress bar")
    add_push_arguments(output)
    guard.set_defaults(func=run_guard)
