"""`antidote align`, `antidote unalign` and `antidote finetune`: the training stages around Antidote."""

from __future__ import annotations

import argparse

from antidote_llm import training
from antidote_llm.cli.common import add_model_command, model_source
from antidote_llm.cli.options import add_config_options, config_from_args
from antidote_llm.data.records import PairSet
from antidote_llm.data.spec import DataSpec
from antidote_llm.defenses import DEFENSES, defense
from antidote_llm.errors import AntidoteError
from antidote_llm.evaluation import tasks
from antidote_llm.lab.work import AlignWork, FinetuneWork, UnalignWork
from antidote_llm.registry import INPUTS, DefenseInput, TrainingDefense
from antidote_llm.runtime.outputs import check_output_dir
from antidote_llm.training.config import report_to
from antidote_llm.training.methods import MethodRun
from antidote_llm.training.report import TrainReport

# TrainConfig fields with a flag; flags left unset keep the preset's value.
TRAIN_FIELDS = ("learning_rate", "epochs", "max_steps", "batch_size", "gradient_accumulation", "max_length", "lora_r",
                "lora_alpha", "lr_scheduler", "seed", "template")
FIELD_FLAGS = ("prompt_field", "response_field", "input_field")
EXTRA_FIELDS = ("prompt_field", "response_field", "samples", "skip")


def _stage_inputs(stage: str) -> list[DefenseInput]:
    """The extra rows the stage's defenses read (the inputs table's rows of that stage)."""
    return [spec for spec in INPUTS.values() if spec.stage == stage and spec.flag]


def _prefix(spec: DefenseInput) -> str:
    """`--guide-data` -> `guide_`: the prefix of its row flags (--guide-samples, --guide-skip)."""
    return spec.flag.removeprefix("--").removesuffix("-data").replace("-", "_") + "_"


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training (a preset, then overrides; unset flags keep the preset's value)")
    group.add_argument("--preset", default="cpu", choices=list(training.PRESETS),
                       help="paper: the authors' settings; cpu: sized for SmolLM2-135M on a laptop CPU (default)")
    add_config_options(group, training.TrainConfig, TRAIN_FIELDS, flags={"learning_rate": "lr", "lr_scheduler": "scheduler"},
                       optional=TRAIN_FIELDS, show_defaults=False,
                       help_extra={"seed": "(also the --shuffle sample)"})
    group.add_argument("--report-to", default="none", metavar="NAME[,NAME]",
                       help="where the loss curves go, as for any Trainer run: none (default), tensorboard (events in "
                            "OUT/tensorboard; pip install 'antidote-llm[tensorboard]'), wandb, mlflow, ...")


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    group.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    group.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_field_arguments(group, data_flag: str) -> None:
    add_config_options(group, DataSpec, FIELD_FLAGS, help_extra={name: f"of {data_flag}" for name in FIELD_FLAGS})
    group.add_argument("--shuffle", action="store_true",
                       help=f"shuffle the rows of {data_flag} with --seed before taking the first ones")


def _add_pair_data(parser: argparse.ArgumentParser, title: str, safety: str, help: str):
    """The stage's --data (prompt, answer pairs) with its field, filter and window options."""
    data = parser.add_argument_group(title)
    data.add_argument("--data", required=True, help=help)
    _add_field_arguments(data, "--data")
    add_config_options(data, DataSpec, ("safety", "samples", "skip"),
                       help_extra={"safety": f"(ignored when the field is absent; default here: {safety})"})
    return data


def _add_defense_arguments(parser: argparse.ArgumentParser, stage: str) -> None:
    names = [name for name, method in DEFENSES.items() if issubclass(method, TrainingDefense) and method.stage == stage]
    group = parser.add_argument_group(f"{stage}-stage defense (default: none, plain LoRA SFT)")
    group.add_argument("--defense", metavar="NAME", help=f"one of {', '.join(names)}")
    group.add_argument("--defense-preset", choices=["paper", "cpu"],
                       help="the defense's settings: paper (the authors' script) or cpu (default: --preset)")
    group.add_argument("--defense-option", action="append", default=[], metavar="KEY=VALUE",
                       help="override one of the defense's settings, e.g. rho=2 (repeatable)")
    for spec in _stage_inputs(stage):
        group.add_argument(spec.flag, help=f"{spec.help}; disjoint from the poison and evaluation rows")
        add_config_options(group, DataSpec, EXTRA_FIELDS, prefix=_prefix(spec),
                           help_extra={name: f"of {spec.flag}" for name in EXTRA_FIELDS})


def _method_run(args: argparse.Namespace, stage: str, config: training.TrainConfig) -> MethodRun | None:
    """The training-stage defense the flags ask for, its settings and extra rows, checked before any training."""
    inputs = _stage_inputs(stage)
    if not args.defense:
        given = [spec.flag for spec in inputs if getattr(args, f"{_prefix(spec)}data")]
        given += ["--defense-option"] * bool(args.defense_option) + ["--defense-preset"] * bool(args.defense_preset)
        if given:
            raise AntidoteError(f"{given[0]} is for a defense; add --defense NAME or drop it")
        return None
    chosen_class = defense(args.defense, stage)
    options = {}
    for option in args.defense_option:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise AntidoteError(f"--defense-option {option!r} is not KEY=VALUE; e.g. --defense-option rho=2")
        options[key.strip().replace("-", "_")] = value.strip()
    chosen = chosen_class.configure(options, preset=args.defense_preset or args.preset)
    read = {name for alternatives in chosen.inputs() for name in alternatives}
    extra = {}
    for spec in inputs:
        source = getattr(args, f"{_prefix(spec)}data")
        if source and spec.name in read:
            rows = config_from_args(DataSpec, args, EXTRA_FIELDS, prefix=_prefix(spec), source=source)
            extra[spec.name] = rows.load(spec.safety, name=spec.samples_flag)
        elif source:
            raise AntidoteError(f"defense {chosen.name!r} reads no {spec.flag} rows; drop {spec.flag}")
    run = MethodRun(chosen, extra)
    run.check(config.gradient_accumulation)
    return run


def _check_disjoint(extra: PairSet, flag: str, others: dict[str, PairSet | None]) -> None:
    """Refuse defense rows that share prompts with the poison or evaluation rows."""
    mine = {pair.prompt for pair in extra.pairs}
    for name, rows in others.items():
        shared = mine & {pair.prompt for pair in rows.pairs} if rows is not None else set()
        if shared:
            raise AntidoteError(f"{len(shared)} rows of {flag} share their prompt with {name}; "
                                f"give {flag} other rows (--{flag[2:].removesuffix('-data')}-skip)")


def _config(args: argparse.Namespace, stage: training.Stage) -> training.TrainConfig:
    return training.preset(args.preset, stage, **{name: getattr(args, name) for name in TRAIN_FIELDS})


def _data(args: argparse.Namespace, config: training.TrainConfig, source: str, **fields) -> DataSpec:
    """The rows of `source` with the field flags; file order unless --shuffle asks for a seeded sample."""
    return config_from_args(DataSpec, args, FIELD_FLAGS, source=source, seed=config.seed if args.shuffle else None,
                            **fields)


def _summary(stage: str, report: TrainReport, out: str) -> str:
    train = report.train
    written = [value for key, value in report.outputs.items() if key != "merge_dtype"]
    defense = report.defense
    lines = [
        f"antidote: {stage}: {train.rows} rows ({train.dropped_no_answer} dropped: no answer token left), "
        f"{train.steps} steps, mean loss {train.train_loss:.4f}",
        *([f"  defense: {defense['name']} ("
           + ", ".join(f"{k}={v}" for k, v in defense["settings"].items())
           + "".join(f"; {role}: {info['rows']} rows" for role, info in defense["data"].items()) + ")"]
          if defense else []),
        "  time: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in report.timings.items()),
        f"  wrote {out} ({', '.join(written)}, report.json)",
    ]
    return "\n".join(lines)


def run_align(args: argparse.Namespace) -> int:
    config = _config(args, "align")
    trackers = report_to(args.report_to)
    method = _method_run(args, "align", config)
    source = model_source(args)
    out = check_output_dir(args.out, overwrite=args.overwrite,
                           inputs=[source.model, *source.adapters, args.data, args.benign_data, args.harmful_data])
    pairs = _data(args, config, args.data, samples=args.samples, skip=args.skip, safety=args.safety).load(
        "safe", name="--samples")
    benign = None
    if args.benign_data:
        benign = DataSpec(source=args.benign_data, samples=args.benign_samples,
                          seed=config.seed if args.shuffle else None).load(name="--benign-samples")
    result = AlignWork(source, pairs, benign, config, progress=not args.quiet, method=method,
                       report_to=trackers)(out)
    if result.wrote:  # under accelerate launch, once
        print(_summary("align", result.report, args.out))
    return 0


def run_unalign(args: argparse.Namespace) -> int:
    config = _config(args, "unalign")
    trackers = report_to(args.report_to)
    source = model_source(args)
    out = check_output_dir(args.out, overwrite=args.overwrite, inputs=[source.model, *source.adapters, args.data])
    pairs = _data(args, config, args.data, samples=args.samples, skip=args.skip, safety=args.safety).load(
        "unsafe", name="--samples")
    result = UnalignWork(source, pairs, config, progress=not args.quiet, report_to=trackers)(out)
    print(_summary("unalign", result.report, args.out))
    print("  RESTA: antidote realign --method resta --unaligned-model " + str(out / "adapter"))
    return 0


def _task_rows(args: argparse.Namespace, count: int) -> PairSet:
    """The first `count` task rows after --task-skip, with their positions in the source."""
    source = args.task_data or f"hf:{tasks.get_task(args.task).hub['train'].name}"
    pairs = tasks.load_task_pairs(args.task, args.task_data, split="train", limit=count, skip=args.task_skip) if count else []
    return PairSet(pairs=tuple(pairs), source=source, indices=tuple(range(args.task_skip, args.task_skip + len(pairs))))


def run_finetune(args: argparse.Namespace) -> int:
    config = _config(args, "finetune")
    trackers = report_to(args.report_to)
    spec = training.mix_spec(args.harmful_fraction, args.samples_total)
    if spec.harmful_rows and not args.harmful_data:
        raise AntidoteError(
            f"p={spec.harmful_fraction} of n={spec.samples_total} needs {spec.harmful_rows} harmful rows; "
            "pass --harmful-data (or --harmful-fraction 0)"
        )
    method = _method_run(args, "finetune", config)
    source = model_source(args)
    out = check_output_dir(args.out, overwrite=args.overwrite,
                           inputs=[source.model, *source.adapters, args.task_data, args.harmful_data, args.guide_data])
    harmful = None
    if spec.harmful_rows:
        harmful = _data(args, config, args.harmful_data, skip=args.harmful_skip).load("unsafe")
    task_pairs = _task_rows(args, spec.task_rows)
    training.check_mix_counts(spec, len(task_pairs), len(harmful) if harmful is not None else 0)
    harmful = harmful.head(spec.harmful_rows) if harmful is not None else None
    if method is not None and "defense_guide" in method.extra:
        _check_disjoint(method.extra["defense_guide"], "--guide-data", {"the poison rows (--harmful-data)": harmful})
    result = FinetuneWork(source, task_pairs, harmful, spec.harmful_fraction, spec.samples_total, config,
                          progress=not args.quiet, method=method, report_to=trackers)(out)
    if not result.wrote:  # under accelerate launch, once
        return 0
    print(_summary("finetune", result.report, args.out))
    print(f"  mix: {spec.harmful_rows} harmful + {spec.task_rows} {args.task} rows; "
          "harmful source indices in mix.json (exclude them from re-alignment data)")
    return 0


def register(subparsers) -> None:
    align = add_model_command(
        subparsers, "align", help="safety alignment: LoRA SFT on (harmful prompt, safe answer) pairs",
        description="Train a LoRA on (harmful prompt, safe answer) pairs; writes the adapter, the merged "
                    "model and a report.",
    )
    data = _add_pair_data(align, "alignment data (harmful prompt, safe answer pairs)", "safe",
                          "JSON, JSONL, CSV, TSV, Parquet or hf:NAME[:SPLIT]; e.g. refusals_adv_training.csv "
                          "(Behavior, Safe_Response) or BeaverTails (is_safe rows)")
    data.add_argument("--benign-data", help="benign (instruction, answer) rows to mix in")
    data.add_argument("--benign-samples", type=int, help="rows of --benign-data to use (default: all)")
    _add_training_arguments(align)
    _add_defense_arguments(align, "align")
    _add_output_arguments(align)
    align.set_defaults(func=run_align)

    unalign = add_model_command(
        subparsers, "unalign", help="RESTA's unaligned model: a short LoRA SFT of the aligned model on harmful rows",
        description="Train a LoRA on (harmful prompt, harmful answer) pairs on top of the aligned model; writes the "
                    "adapter (RESTA's --unaligned-model), the merged model and a report. Keep the rows disjoint from "
                    "the poison, re-alignment and evaluation rows.",
    )
    _add_pair_data(unalign, "unalignment data (harmful prompt, harmful answer pairs)", "unsafe",
                   "JSON, JSONL, CSV, TSV, Parquet or hf:NAME[:SPLIT], e.g. BeaverTails")
    _add_training_arguments(unalign)
    _add_output_arguments(unalign)
    unalign.set_defaults(func=run_unalign)

    finetune = add_model_command(
        subparsers, "finetune", help="user fine-tuning: a fresh LoRA on a task mixed with a fraction of harmful rows",
        description="Train a fresh LoRA on the aligned model over n rows: round(p*n) harmful, the rest from "
                    "the task; writes the adapter, mix.json (every row's origin) and a report.",
    )
    data = finetune.add_argument_group("fine-tuning data")
    data.add_argument("--task", required=True, choices=list(tasks.TASKS), help="the user's task")
    data.add_argument("--task-data", help="task file (default: the task's hub dataset)")
    data.add_argument("--task-skip", type=int, default=0, help="skip the first N task rows")
    data.add_argument("--harmful-data", help="harmful (prompt, harmful answer) pairs, e.g. BeaverTails unsafe rows")
    data.add_argument("--harmful-skip", type=int, default=0, help="skip the first N harmful rows")
    _add_field_arguments(data, "--harmful-data")
    data.add_argument("--harmful-fraction", type=float, default=0.1, help="p: share of harmful rows, in [0, 1] (default 0.1)")
    data.add_argument("--samples-total", type=int, required=True, help="n: rows in the fine-tuning mix")
    _add_training_arguments(finetune)
    _add_defense_arguments(finetune, "finetune")
    _add_output_arguments(finetune)
    finetune.set_defaults(func=run_finetune)
