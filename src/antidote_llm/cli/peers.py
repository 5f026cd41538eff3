"""`antidote realign --method NAME`: the post-fine-tuning peers beside Antidote (SafeLoRA, RESTA, Safe Delta, and
any registered post defense that reads extra inputs).

Each method's flags come from its fields; each extra input's flag comes from the inputs table
(antidote_llm.registry.INPUTS), so a new peer or input needs no edit here. A flag both a peer and Antidote have
(--seed, --template, --max-length) is one flag with one meaning.
"""

from __future__ import annotations

import argparse

from antidote_llm.cli.options import add_config_options
from antidote_llm.core.realign import RealignConfig
from antidote_llm.data.spec import DataSpec
from antidote_llm.defenses import defense
from antidote_llm.defenses.pipeline import defend_to_disk, peer_methods
from antidote_llm.errors import AntidoteError
from antidote_llm.registry import INPUTS, DefenseInput

ANTIDOTE = "antidote"
SHARED_FIELDS = ("seed", "template", "max_length")  # declared by Antidote's options already


def _peer_inputs() -> list[DefenseInput]:
    """The inputs whose flags this module adds: the post-stage ones Antidote's own options do not declare."""
    return [spec for spec in INPUTS.values() if spec.stage == "post" and spec.cli and spec.flag]


def _dest(spec: DefenseInput) -> str:
    return spec.flag.removeprefix("--").replace("-", "_")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    methods = peer_methods()
    parser.add_argument("--method", default=ANTIDOTE, choices=[ANTIDOTE, *methods],
                        help="the repair: antidote (default) or a post-fine-tuning peer on the same inputs")
    group = parser.add_argument_group("the peers' extra inputs")
    for spec in _peer_inputs():
        readers = [m for m in methods if any(spec.name in options for options in defense(m).configure({}).inputs())]
        group.add_argument(spec.flag, dest=_dest(spec), help=f"{', '.join(readers) or 'no peer'}: {spec.help}")
        if spec.kind == "rows":
            default = f"{spec.samples}, or all when fewer" if spec.samples else "all"
            group.add_argument(spec.samples_flag, dest=f"{_dest(spec)}_samples", type=int,
                               help=f"rows of {spec.flag} to use (default: {default}; more than there are is refused)")
    declared = set(SHARED_FIELDS)
    for method in methods:  # a field two peers share (safelora's and safemerge's threshold) is one flag
        settings = defense(method)
        own = [name for name in settings.model_fields if name not in declared]
        _note_shared(parser, method, settings, [name for name in settings.model_fields
                                                if name in declared and name not in SHARED_FIELDS])
        declared.update(own)
        add_config_options(parser.add_argument_group(f"--method {method}"), settings, own)


def _note_shared(parser: argparse.ArgumentParser, method: str, settings, names: list[str]) -> None:
    """A flag an earlier peer declared, read by `method` too: its help also gives `method`'s default."""
    actions = {action.dest: action for action in parser._actions}
    for name in names:
        default = settings.model_fields[name].get_default(call_default_factory=True)
        actions[name].help += f"; --method {method} too (default: {default})"


def _peer_fields(method: str) -> tuple[str, ...]:
    return tuple(defense(method).model_fields)


def refuse_foreign_flags(args: argparse.Namespace) -> None:
    """A flag of another method than the chosen one is a mistake, not something to ignore."""
    methods = peer_methods()
    own = set(RealignConfig.model_fields) if args.method == ANTIDOTE else set(_peer_fields(args.method))
    others = {name for method in (ANTIDOTE, *methods) if method != args.method
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
        for spec in _peer_inputs():
            if getattr(args, _dest(spec)) is not None:
                raise AntidoteError(f"{spec.flag} is an input of the peers, not of antidote; remove it or choose --method")


def _inputs(args: argparse.Namespace) -> dict[str, str | DataSpec]:
    """The extra inputs given on the command line: paths, or rows with the shared field flags."""
    inputs = {}
    for spec in _peer_inputs():
        value = getattr(args, _dest(spec))
        if value is None:
            continue
        if spec.kind == "rows":
            value = DataSpec(source=value, samples=getattr(args, f"{_dest(spec)}_samples"),
                             prompt_field=args.prompt_field, response_field=args.response_field,
                             input_field=args.input_field)
        inputs[spec.name] = value
    return inputs


def run(args: argparse.Namespace, model_source) -> int:
    method = args.method
    chosen = defense(method).configure(
        {name: getattr(args, name) for name in _peer_fields(method) if getattr(args, name, None) is not None})
    report = defend_to_disk(chosen, model_source, args.out, inputs=_inputs(args), save_merged=args.save_merged,
                            overwrite=args.overwrite)
    changed = [name for name, module in report.modules.items() if module.changed]
    print(f"antidote: {method}: changed {len(changed)} of {len(report.modules)} modules "
          f"({100 * report.changed_fraction:.3f}% of their weights); output: {report.output}")
    print("  time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in report.timings.items()))
    print(f"  wrote {args.out}")
    return 0
