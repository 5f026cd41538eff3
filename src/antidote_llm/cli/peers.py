"""`antidote realign --method safelora|resta|safe-delta`: the post-fine-tuning peers beside Antidote.

Each method's flags come from its settings class; a flag both a peer and Antidote have (--seed, --template,
--max-length) is one flag with one meaning.
"""

from __future__ import annotations

import argparse

from antidote_llm.cli.options import add_config_options
from antidote_llm.core.realign import RealignConfig
from antidote_llm.data.spec import DataSpec
from antidote_llm.defenses import defense
from antidote_llm.defenses.pipeline import PEER_METHODS, PeerInputs, defend_to_disk
from antidote_llm.errors import AntidoteError

ANTIDOTE = "antidote"
INPUT_FLAGS = {
    "base_model": "--base-model", "alignment_adapter": "--alignment-adapter",
    "unaligned_model": "--unaligned-model", "safe": "--safe-data",
}
SHARED_FIELDS = ("seed", "template", "max_length")  # declared by Antidote's options already
DEFAULT_SAFE_ROWS = 128  # Safe Delta's authors calibrate on 128 rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default=ANTIDOTE, choices=[ANTIDOTE, *PEER_METHODS],
                        help="the repair: antidote (default) or a post-fine-tuning peer on the same inputs")
    group = parser.add_argument_group("the peers' extra inputs")
    group.add_argument(INPUT_FLAGS["base_model"], dest="base_model",
                       help="safelora: the unaligned model the aligned --model was trained from (V = aligned - base)")
    group.add_argument(INPUT_FLAGS["alignment_adapter"], dest="alignment_adapter",
                       help="safelora, instead of --base-model: the alignment LoRA (V = its update)")
    group.add_argument(INPUT_FLAGS["unaligned_model"], dest="unaligned_model",
                       help="resta: the aligned model made unsafe (antidote unalign): its adapter/ folder or a model folder")
    group.add_argument(INPUT_FLAGS["safe"], dest="safe_data",
                       help="safe-delta: safe calibration rows (harmful prompt, safe answer)")
    group.add_argument("--safe-samples", type=int, help=f"rows of --safe-data to use (default: {DEFAULT_SAFE_ROWS})")
    for method in PEER_METHODS:
        settings = defense(method).settings
        group = parser.add_argument_group(f"--method {method}")
        add_config_options(group, settings, [name for name in settings.model_fields if name not in SHARED_FIELDS])


def _peer_fields(method: str) -> tuple[str, ...]:
    return tuple(defense(method).settings.model_fields)


def refuse_foreign_flags(args: argparse.Namespace) -> None:
    """A flag of another method than the chosen one is a mistake, not something to ignore."""
    own = set(RealignConfig.model_fields) if args.method == ANTIDOTE else set(_peer_fields(args.method))
    others = {name for method in (ANTIDOTE, *PEER_METHODS) if method != args.method
              for name in (RealignConfig.model_fields if method == ANTIDOTE else _peer_fields(method))}
    for name in sorted(others - own):
        if getattr(args, name, None) is not None:
            raise AntidoteError(f"--{name.replace('_', '-')} is not an option of --method {args.method}; remove it")
    if args.method != ANTIDOTE:
        for flag, value in (("--data", args.source), ("--protect-data", args.protect_data),
                            ("--aligned-model", args.aligned_model)):
            if value is not None:
                raise AntidoteError(f"{flag} is not an input of --method {args.method}; remove it")
    else:
        for name, flag in INPUT_FLAGS.items():
            if getattr(args, "safe_data" if name == "safe" else name) is not None:
                raise AntidoteError(f"{flag} is an input of the peers, not of antidote; remove it or choose --method")


def run(args: argparse.Namespace, model_source) -> int:
    method = args.method
    settings = defense(method).configure(
        {name: getattr(args, name) for name in _peer_fields(method) if getattr(args, name, None) is not None})
    safe = None
    if args.safe_data:
        safe = DataSpec(source=args.safe_data, samples=args.safe_samples or DEFAULT_SAFE_ROWS,
                        prompt_field=args.prompt_field, response_field=args.response_field, input_field=args.input_field)
    inputs = PeerInputs(base_model=args.base_model, alignment_adapter=args.alignment_adapter,
                        unaligned_model=args.unaligned_model, safe=safe)
    report = defend_to_disk(method, model_source, settings, args.out, inputs=inputs, flags=INPUT_FLAGS,
                            save_merged=args.save_merged, overwrite=args.overwrite)
    changed = [name for name, module in report.modules.items() if module.changed]
    print(f"antidote: {method}: changed {len(changed)} of {len(report.modules)} modules "
          f"({100 * report.changed_fraction:.3f}% of their weights); output: {report.output}")
    print("  time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in report.timings.items()))
    print(f"  wrote {args.out}")
    return 0
