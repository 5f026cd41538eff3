"""`antidote evaluate` (harmful score + finetune accuracy of a model) and `antidote judge` (verdicts on answers)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from antidote_llm.cli.common import CATEGORY_HELP, add_judge_options, add_model_command, model_source
from antidote_llm.cli.options import add_config_options, config_from_args
from antidote_llm.data.records import load_pairs, read_records
from antidote_llm.data.templates import TEMPLATES
from antidote_llm.errors import AntidoteError
from antidote_llm.evaluation.evaluate import (
    BEAVERTAILS_TEST,
    EvalResult,
    evaluate,
    load_harmful_prompts,
    model_identity,
    write_eval,
)
from antidote_llm.evaluation.generation import (
    BACKENDS,
    HFGenerator,
    VllmGenerator,
    require_vllm,
    stop_token_ids,
)
from antidote_llm.evaluation.judges import (
    DEFAULT_JUDGE_BATCH_SIZE,
    DEFAULT_THRESHOLD,
    Judge,
    get_judge,
)
from antidote_llm.evaluation.metrics import EvalMetrics
from antidote_llm.evaluation.settings import JUDGE_FIELDS, EvalSettings
from antidote_llm.evaluation.tasks import TASKS, get_task, load_task_pairs
from antidote_llm.runtime.loading import BUILTIN_MODELS, ModelSource, load_model, load_tokenizer
from antidote_llm.runtime.outputs import output_run, write_jsonl
from antidote_llm.runtime.runinfo import Timings, library_versions


def _add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("judge")
    add_judge_options(group)
    group.add_argument("--judge-label", default=None, help="classifier: the label meaning harmful")
    group.add_argument("--judge-threshold", type=float, default=DEFAULT_THRESHOLD,
                       help="beaver-dam / classifier: probability above which an answer is harmful; endpoint with "
                            "--judge-format strongreject: the rubric score from which an answer is harmful (0.5)")
    group.add_argument("--judge-batch-size", type=int, default=DEFAULT_JUDGE_BATCH_SIZE)
    group.add_argument("--judge-device", default="auto", help="auto, cpu, cuda, cuda:N")


def _judge(settings: EvalSettings, args: argparse.Namespace) -> Judge:
    return get_judge(settings.judge, settings.judge_options(
        label=args.judge_label, threshold=args.judge_threshold, batch_size=args.judge_batch_size,
        device=args.judge_device,
    ))


def register(subparsers) -> None:
    evaluate_parser = add_model_command(
        subparsers, "evaluate", help="harmful score and finetune accuracy of a model",
        description="Greedy answers to harmful prompts, judged (harmful score, HS), and to a task's test rows "
                    "(finetune accuracy, FA), written to one output folder.",
    )
    data = evaluate_parser.add_argument_group("data")
    data.add_argument("--harmful-prompts", default=BEAVERTAILS_TEST, metavar="SRC",
                      help=f"JSON/JSONL/CSV file or hf:NAME[:SPLIT] (default {BEAVERTAILS_TEST}: first 1,000 unsafe rows)")
    data.add_argument("--prompt-field", default=None, help="field of the harmful prompt (detected when omitted)")
    data.add_argument("--category-field", default=None, metavar="NAME",
                      help=CATEGORY_HELP.format(what="harmful prompt"))
    data.add_argument("--no-harmful", action="store_true", help="skip the harmful score")
    data.add_argument("--task", default=None, help=f"fine-tuning task to score: {', '.join(TASKS)}")
    data.add_argument("--task-data", default=None, metavar="SRC",
                      help="the task's test rows (local file or hf:NAME[:SPLIT]); default: the task's hub test split")
    data.add_argument("--limit", type=int, default=None, metavar="N", help="use only the first N prompts and task rows")
    _add_judge_arguments(evaluate_parser)
    generation = evaluate_parser.add_argument_group("generation")
    generation.add_argument("--template", default="alpaca", choices=list(TEMPLATES))
    add_config_options(generation, EvalSettings, ("max_new_tokens", "task_max_new_tokens", "batch_size", "task_prompt"))
    generation.add_argument("--backend", default="hf", choices=list(BACKENDS),
                            help="hf (transformers, any device) or vllm (needs vllm and a CUDA GPU)")
    output = evaluate_parser.add_argument_group("output")
    output.add_argument("--out", required=True, metavar="EVAL_DIR", help="output folder (must not exist or be empty)")
    output.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    output.add_argument("--no-progress", action="store_true", help="no progress bars")
    evaluate_parser.set_defaults(func=run_evaluate)

    judge_parser = subparsers.add_parser(
        "judge", help="judge existing answers",
        description="Judge (prompt, answer) rows of a file: the output holds the same rows plus `harmful`, "
                    "`degenerate` and the judge's details.",
    )
    judge_parser.add_argument("--input", required=True, metavar="FILE", help="JSON/JSONL/CSV rows with a prompt and an answer")
    judge_parser.add_argument("--out", required=True, metavar="FILE", help="output JSONL file")
    judge_parser.add_argument("--prompt-field", default=None, help="field of the prompt (detected when omitted)")
    judge_parser.add_argument("--response-field", default=None, help="field of the answer (detected when omitted)")
    judge_parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    judge_parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_judge_arguments(judge_parser)
    judge_parser.set_defaults(func=run_judge)


@contextlib.contextmanager
def _vllm_generator(source: ModelSource, tokenizer) -> Iterator[VllmGenerator]:
    """vLLM loads from disk: a plain directory or hub id as is, anything else merged into a temporary copy."""
    require_vllm()
    plain = not source.adapters and source.model not in BUILTIN_MODELS and not source.model.endswith(".gguf")
    if plain:
        yield VllmGenerator(source.model, stops=stop_token_ids(None, tokenizer), dtype=source.dtype,
                            trust_remote_code=source.trust_remote_code)
        return
    merged = Path(tempfile.mkdtemp(prefix="antidote-vllm-"))
    try:
        loaded = load_model(source)
        loaded.model.save_pretrained(merged)
        loaded.tokenizer.save_pretrained(merged)
        stops = stop_token_ids(loaded.model, tokenizer)
        del loaded
        yield VllmGenerator(str(merged), stops=stops, dtype=source.dtype, trust_remote_code=source.trust_remote_code)
    finally:
        shutil.rmtree(merged, ignore_errors=True)


def _check_inputs(args: argparse.Namespace) -> None:
    if args.limit is not None and args.limit < 1:
        raise AntidoteError(f"--limit must be positive, got {args.limit}")
    if args.no_harmful and args.task is None:
        raise AntidoteError("nothing to evaluate: --no-harmful needs --task")
    if args.no_harmful and args.category_field:
        raise AntidoteError("--category-field names a field of the harmful prompts, which --no-harmful skips; drop one")
    if args.task is not None:
        get_task(args.task)
    if args.backend == "vllm":
        require_vllm()


def run_evaluate(args: argparse.Namespace) -> int:
    _check_inputs(args)
    source = model_source(args)
    inputs = [source.model, *source.adapters, args.harmful_prompts, args.task_data]
    with output_run(args.out, overwrite=args.overwrite, inputs=inputs) as run:
        settings = config_from_args(EvalSettings, args, EvalSettings.model_fields)
        judge = _judge(settings, args)
        with run.timings.measure("data_s"):
            harmful = None if args.no_harmful else load_harmful_prompts(
                args.harmful_prompts, prompt_field=args.prompt_field, limit=args.limit,
                category_field=args.category_field,
            )
            task_pairs = (
                load_task_pairs(args.task, args.task_data, "test", limit=args.limit) if args.task is not None else None
            )
        result, identity = _run(args, source, settings, harmful, task_pairs, judge, run.timings)
        metrics = result.metrics
        metrics["model"] = {"source": source.model, "adapters": list(source.adapters), **identity}
        metrics["harmful_prompts"] = harmful.describe() if harmful is not None else None
        metrics["task_data"] = args.task_data or (f"hub default for {args.task}" if args.task else None)
        metrics["timings"] = {**metrics["timings"], **run.timings}
        metrics["memory"] = run.memory.report().model_dump()
        metrics["versions"] = library_versions()
        write_eval(result, run.folder)  # its own atomic write lands in the run's folder, renamed with it
    _print_summary(EvalMetrics.model_validate(metrics), run.out)
    return 0


def _run(args, source: ModelSource, settings: EvalSettings, harmful, task_pairs, judge,
         timings: Timings) -> tuple[EvalResult, dict]:
    common = dict(
        harmful_prompts=list(harmful.pairs) if harmful is not None else None, task=args.task, task_pairs=task_pairs,
        settings=settings, template=args.template, judge=judge, progress=not args.no_progress,
    )
    if args.backend == "vllm":
        tokenizer = load_tokenizer(source.model, source.trust_remote_code)
        with _vllm_generator(source, tokenizer) as generator:
            return evaluate(generator, tokenizer, **common), {"sha256": None}
    with timings.measure("load_s"):
        loaded = load_model(source)
    generator = HFGenerator(loaded.model, loaded.tokenizer, batch_size=settings.batch_size)
    result = evaluate(generator, loaded.tokenizer, **common)
    return result, model_identity(loaded.model)


def _print_summary(metrics: EvalMetrics, out: Path) -> None:
    parts = []
    if metrics.harmful_score is not None:
        unparsed = f", {metrics.unparsed} judge outputs unparsed" if metrics.unparsed else ""
        parts.append(f"harmful score {metrics.harmful_score}% ({metrics.harmful_count}/{metrics.prompts}, "
                     f"degenerate {metrics.degenerate_rate}%{unparsed})")
        if metrics.harmful_by_category:
            parts.append("by category " + ", ".join(f"{name} {rate.value:g}% ({rate.count}/{rate.of})"
                                                    for name, rate in metrics.harmful_by_category.items()))
    if metrics.task is not None:
        accuracy = metrics.finetune_accuracy
        parts.append(f"{metrics.task.name} accuracy {accuracy}%" if accuracy is not None
                     else f"{metrics.task.name} answers written")
    print(f"{'; '.join(parts)}; results in {out}")


def run_judge(args: argparse.Namespace) -> int:
    source, out = Path(args.input), Path(args.out)
    if args.out.endswith(("/", os.sep)) or out.is_dir():
        raise AntidoteError(f"--out {args.out} is a folder; judge writes one JSONL file: give its name, e.g. "
                            f"{out / 'judged.jsonl'}")
    if out.resolve() == source.resolve():
        raise AntidoteError(f"--out {out} is the input file; choose another output")
    if out.exists() and not args.overwrite:
        raise AntidoteError(f"output {out} exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_file():
        raise AntidoteError(f"output {out} is not a file; choose another --out")
    pairs = load_pairs(
        source, prompt_field=args.prompt_field, response_field=args.response_field, safety=None
    )
    rows = read_records(source)
    judge = _judge(config_from_args(EvalSettings, args, JUDGE_FIELDS), args)
    verdicts = judge([p.prompt for p in pairs.pairs], [p.response for p in pairs.pairs], progress=not args.no_progress)
    judged = [{**rows[index], **verdict.to_row(), "judge": judge.name} for index, verdict in zip(pairs.indices, verdicts, strict=True)]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, judged)
    harmful = sum(v.harmful for v in verdicts)
    degenerate = sum(v.degenerate for v in verdicts)
    unparsed = sum(v.unparsed for v in verdicts)
    print(f"judged {len(verdicts)} answers with {judge.name}: {harmful} harmful "
          f"({100 * harmful / len(verdicts):.2f}%), {degenerate} degenerate"
          f"{f', {unparsed} unparsed' if unparsed else ''}; written to {out}", file=sys.stdout)
    return 0
