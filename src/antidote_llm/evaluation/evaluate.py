"""Harmful score (HS) and finetune accuracy (FA) of a model, as the paper measures them, in one pass.

The same code serves the CLI (`antidote evaluate`) and in-memory use (the lab evaluating a pruned model
without saving it): greedy answers through generation.py, verdicts through a judges.py judge, task
scores through tasks.py, and one folder of results (metrics.json, answers.jsonl, summary.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from antidote_llm.data.records import Pair, PairSet, load_pairs
from antidote_llm.data.templates import encode_prompt
from antidote_llm.errors import AntidoteError
from antidote_llm.evaluation.generation import (
    HFGenerator,
    TokenGenerator,
    decode,
    encode_prompts,
)
from antidote_llm.evaluation.judges import Judge, JudgeOptions, get_judge
from antidote_llm.evaluation.metrics import EvalMetrics, Rate, rates_by_category
from antidote_llm.evaluation.settings import EvalSettings
from antidote_llm.evaluation.tasks import Task, get_task, load_task_pairs
from antidote_llm.runtime.outputs import atomic_dir, check_output_dir, write_jsonl, write_report

BEAVERTAILS_TEST = "hf:PKU-Alignment/BeaverTails:30k_test"
PAPER_HARMFUL_PROMPTS = 1000
METRICS_FILE = "metrics.json"  # the first 1,000 unsafe rows of BeaverTails 30k_test


def load_harmful_prompts(
    source: str = BEAVERTAILS_TEST, *, prompt_field: str | None = None, limit: int | None = None,
    category_field: str | None = None,
) -> PairSet:
    """Harmful evaluation prompts: BeaverTails unsafe rows, AdvBench `Behavior`, or any prompt field, with their
    categories (`category_field`, or a known category field when the file has one).

    Rows marked `is_safe` are dropped. With no `limit`, the BeaverTails test split gives the paper's
    first 1,000 unsafe prompts and any other source all its prompts.
    """
    if limit is None and source == BEAVERTAILS_TEST:
        limit = PAPER_HARMFUL_PROMPTS
    return load_pairs(source, prompt_field=prompt_field, safety="unsafe", limit=limit, require_response=False,
                      category_field=category_field, categories=True)


def weights_sha256(model: torch.nn.Module) -> str:
    """Which weights were evaluated: a hash of every state-dict tensor (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def model_identity(model: torch.nn.Module, fingerprint: bool = True) -> dict:
    config = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "name_or_path": getattr(config, "name_or_path", None) or None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "sha256": weights_sha256(model) if fingerprint else None,
    }


@dataclass
class EvalResult:
    """Metrics plus every answer: `answers` for harmful prompts, `task_answers` for the task's rows."""

    metrics: dict
    answers: list[dict] = field(default_factory=list)
    task_answers: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Generated:
    texts: list[str]
    new_tokens: int
    seconds: float

    def throughput(self) -> dict:
        return {
            "prompts": len(self.texts),
            "new_tokens": self.new_tokens,
            "seconds": round(self.seconds, 3),
            "prompts_per_s": round(len(self.texts) / self.seconds, 3) if self.seconds else None,
            "new_tokens_per_s": round(self.new_tokens / self.seconds, 3) if self.seconds else None,
        }


def _generate(
    generator: TokenGenerator, tokenizer, prompt_ids: Sequence[Sequence[int]], *,
    max_new_tokens: int, progress: bool, desc: str,
) -> Generated:
    start = time.perf_counter()
    outputs = generator(prompt_ids, max_new_tokens=max_new_tokens, progress=progress, desc=desc)
    return _generated(tokenizer, outputs, time.perf_counter() - start)


def _generated(tokenizer, outputs: Sequence[Sequence[int]], seconds: float) -> Generated:
    # The authors strip answers before judging and scoring; so do we.
    texts = [text.strip() for text in decode(tokenizer, outputs)]
    return Generated(texts=texts, new_tokens=sum(len(ids) for ids in outputs), seconds=seconds)


def _percent(count: int, total: int) -> float | None:
    return round(100.0 * count / total, 2) if total else None


def _judge_prompt(pair: Pair) -> str:
    return f"{pair.prompt}\n\n{pair.input}" if pair.input else pair.prompt


def harmful_metrics(verdicts: Sequence, judge: Judge, categories: Sequence[tuple[str, ...]] | None = None) -> dict:
    """HS and the degenerate share; HS among non-degenerate answers shows safety without broken text, and
    the compliance rate (harmful and not degenerate, over all prompts) is genuine harmful answering.
    `unparsed` counts answers whose judge output could not be read: they are counted not harmful, so a
    non-zero count means the harmful score may be too low. With the prompts' `categories`, HS per category."""
    total = len(verdicts)
    harmful = sum(v.harmful for v in verdicts)
    degenerate = sum(v.degenerate for v in verdicts)
    both = sum(v.harmful and v.degenerate for v in verdicts)
    return {
        "prompts": total,
        "harmful_count": harmful,
        "harmful_score": _percent(harmful, total),
        "unparsed": sum(v.unparsed for v in verdicts),
        "degenerate_count": degenerate,
        "degenerate_rate": _percent(degenerate, total),
        "harmful_and_degenerate_count": both,
        "harmful_score_non_degenerate": _percent(harmful - both, total - degenerate),
        "compliance_rate": _percent(harmful - both, total),
        "categories": dict(Counter(c for v in verdicts for c in v.categories).most_common()),
        "harmful_by_category": {name: rate.model_dump() for name, rate in rates_by_category(
            categories or [()] * total, [v.harmful for v in verdicts]).items()},
        "judge": judge.describe(),
    }


def _evaluate_harmful(
    generator: TokenGenerator, tokenizer, pairs: Sequence[Pair], judge: Judge, *,
    template: str, max_new_tokens: int, stop_settled: bool, progress: bool,
) -> tuple[dict, list[dict], dict]:
    prompt_ids = encode_prompts(tokenizer, [p.prompt for p in pairs], template=template, inputs=[p.input for p in pairs])
    desc = "harmful prompts"
    if stop_settled and judge.settles and max_new_tokens > SETTLE_FIRST_BUDGET:
        generated, _ = _generate_in_rounds(
            generator, tokenizer, prompt_ids, first_budget=SETTLE_FIRST_BUDGET, max_new_tokens=max_new_tokens,
            keep_going=lambda text: not judge.settled(text.strip()), progress=progress, desc=desc,
        )
    else:
        generated = _generate(generator, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, progress=progress,
                              desc=desc)
    start = time.perf_counter()
    verdicts = judge([_judge_prompt(p) for p in pairs], generated.texts, progress=progress)
    judge_s = time.perf_counter() - start
    rows = [
        {"prompt": p.prompt, "input": p.input, **({"prompt_category": list(p.category)} if p.category else {}),
         "answer": text, **verdict.to_row()}
        for p, text, verdict in zip(pairs, generated.texts, verdicts, strict=True)
    ]
    timing = {"harmful_generation_s": round(generated.seconds, 3), "judge_s": round(judge_s, 3)}
    metrics = harmful_metrics(verdicts, judge, [p.category for p in pairs])
    return {**metrics, "throughput": generated.throughput()}, rows, timing


ANSWER_BUDGET_GROWTH = 4  # each round gives the still-open answers this many times the tokens of the last
SETTLE_FIRST_BUDGET = 12  # tokens of a harmful-prompt answer before the judge is first asked (a refusal opens it)


def _generate_in_rounds(
    generator: TokenGenerator, tokenizer, prompt_ids: Sequence[Sequence[int]], *, first_budget: int,
    max_new_tokens: int, keep_going: Callable[[str], bool], progress: bool, desc: str,
) -> tuple[Generated, set[int]]:
    """Answers generated only as far as they matter, and the indices of those stopped early. Every answer first
    gets `first_budget` tokens; those unfinished for which `keep_going(text so far)` holds are generated again
    with 4x the budget, and so on up to `max_new_tokens`; the others stop. Greedy decoding makes each round's
    answer a prefix of the next, so what is decided on a prefix is what full generation would decide."""
    start, budget = time.perf_counter(), first_budget
    outputs: list[list[int]] = [[] for _ in prompt_ids]
    stopped: set[int] = set()
    open_rows = list(range(len(prompt_ids)))
    generated_tokens = 0
    while open_rows:
        budget = min(budget, max_new_tokens)
        answers = generator([prompt_ids[index] for index in open_rows], max_new_tokens=budget, progress=progress,
                            desc=desc if budget == first_budget else f"{desc}, up to {budget} tokens")
        generated_tokens += sum(len(ids) for ids in answers)
        still_open = []
        for index, ids in zip(open_rows, answers, strict=True):
            outputs[index] = ids
            if len(ids) < budget or budget == max_new_tokens:
                continue  # finished, or at the limit full generation has too
            if keep_going(decode(tokenizer, [ids])[0]):
                still_open.append(index)
            else:
                stopped.add(index)
        open_rows, budget = still_open, budget * ANSWER_BUDGET_GROWTH
    generated = _generated(tokenizer, outputs, time.perf_counter() - start)
    # every round's tokens count in the throughput, not only the kept answers'
    return dataclasses.replace(generated, new_tokens=generated_tokens), stopped


def _generate_task_answers(
    generator: TokenGenerator, tokenizer, task: Task, prompt_ids: Sequence[Sequence[int]], *,
    max_new_tokens: int, progress: bool,
) -> tuple[Generated, set[int]]:
    """The task's answers and the indices of those cut short. An exact-label task's answer is generated only
    until it can no longer be accepted: past the task's few-token budget, only answers that may still be a label
    (a label's prefix, or a label then whitespace) go on; the others are cut, wrong whatever would follow (a model
    that has not learned the task rambles; one half-learned writes a label and goes on with an explanation)."""
    desc = f"{task.name} rows"
    budget = task.answer_budget(tokenizer)
    if budget is None or budget >= max_new_tokens:
        return _generate(generator, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, progress=progress,
                         desc=desc), set()
    return _generate_in_rounds(generator, tokenizer, prompt_ids, first_budget=budget, max_new_tokens=max_new_tokens,
                               keep_going=task.may_still_be_correct, progress=progress, desc=desc)


def _evaluate_task(
    generator: TokenGenerator, tokenizer, task: Task, pairs: Sequence[Pair], *,
    template: str, max_new_tokens: int, prompt_style: str, progress: bool,
) -> tuple[dict, list[dict], dict]:
    # The authors' SST-2 script drops the newline after "### Response:" (prompt style "authors").
    prompt_ids = [encode_prompt(tokenizer, task.eval_prompt(p, template, tokenizer, prompt_style), template)
                  for p in pairs]
    generated, cut = _generate_task_answers(
        generator, tokenizer, task, prompt_ids, max_new_tokens=max_new_tokens, progress=progress,
    )
    rows = []
    for index, (pair, text) in enumerate(zip(pairs, generated.texts, strict=True)):
        parsed = task.parse_answer(text)
        rows.append({
            "instruction": pair.prompt, "input": pair.input, "answer": text, "gold": pair.response,
            "parsed": parsed, "correct": task.is_correct(text, pair), "cut": index in cut,
        })
    correct = sum(row["correct"] is True for row in rows)
    metrics = {
        "name": task.name,
        "rows": len(rows),
        "scored": task.scored,
        "correct": correct if task.scored else None,
        "unparsed": sum(row["parsed"] is None for row in rows) if task.scored else None,
        "accuracy": _percent(correct, len(rows)) if task.scored else None,
        "max_new_tokens": max_new_tokens,
        "cut_answers": len(cut),
        "prompt_style": prompt_style,
        "throughput": generated.throughput(),
    }
    return metrics, rows, {"task_generation_s": round(generated.seconds, 3)}


def evaluate(
    generator: TokenGenerator,
    tokenizer,
    *,
    harmful_prompts: Sequence[str | Pair] | None,
    task: str | None = None,
    task_pairs: Sequence[Pair] | None = None,
    settings: EvalSettings | None = None,
    template: str = "alpaca",
    judge: Judge | None = None,
    judge_options: JudgeOptions | None = None,
    progress: bool = True,
) -> EvalResult:
    """HS on `harmful_prompts` and FA on `task` with any token generator (HF in memory, vLLM, a stub).

    Everything is checked before the first answer is generated. `task_pairs` None loads the task's
    hub test split (the paper's rows). `judge` is a judge already built (else `settings.judge` is, with
    `judge_options`, by default the settings' own).
    """
    settings = settings or EvalSettings()
    if task is None and task_pairs is not None:
        raise AntidoteError("task rows given without a task name; name the task so its answers can be scored")
    if harmful_prompts is None and task is None:
        raise AntidoteError("nothing to evaluate: give harmful prompts, a task, or both")
    if harmful_prompts is not None and not harmful_prompts:
        raise AntidoteError("the harmful prompt set is empty; give at least one prompt")
    active_judge = judge if judge is not None else get_judge(settings.judge, judge_options or settings.judge_options())
    task_spec = get_task(task) if task is not None else None
    if task_spec is not None:
        task_pairs = list(task_pairs) if task_pairs is not None else load_task_pairs(task_spec.name, None, "test")
        if not task_pairs:
            raise AntidoteError(f"no {task_spec.name} rows to evaluate; give at least one row")
    metrics: dict = {
        "harmful_score": None, "degenerate_rate": None, "harmful_count": None, "prompts": 0,
        "finetune_accuracy": None,
    }
    timings: dict = {}
    result = EvalResult(metrics=metrics)
    if harmful_prompts is not None:
        pairs = [p if isinstance(p, Pair) else Pair(prompt=str(p), response="") for p in harmful_prompts]
        harmful, result.answers, timing = _evaluate_harmful(
            generator, tokenizer, pairs, active_judge, template=template, max_new_tokens=settings.max_new_tokens,
            stop_settled=settings.stop_settled, progress=progress,
        )
        metrics.update(harmful)
        timings.update(timing)
    if task_spec is not None:
        task_metrics, result.task_answers, timing = _evaluate_task(
            generator, tokenizer, task_spec, task_pairs, template=template,
            max_new_tokens=settings.task_max_new_tokens or task_spec.max_new_tokens,
            prompt_style=settings.task_prompt, progress=progress,
        )
        metrics["finetune_accuracy"] = task_metrics["accuracy"]
        metrics["task"] = task_metrics
        timings.update(timing)
    metrics["generation"] = {
        "backend": generator.backend, "decoding": "greedy", "template": template,
        "max_new_tokens": settings.max_new_tokens, "batch_size": getattr(generator, "batch_size", None),
    }
    metrics["timings"] = timings
    return result


def evaluate_model(
    model,
    tokenizer,
    *,
    harmful_prompts: Sequence[str | Pair] | None,
    task: str | None = None,
    task_pairs: Sequence[Pair] | None = None,
    settings: EvalSettings | None = None,
    template: str = "alpaca",
    built_judge: Judge | None = None,
    judge_options: JudgeOptions | None = None,
    progress: bool = True,
    fingerprint: bool = True,
    **setting_fields,
) -> EvalResult:
    """`evaluate` for a transformers / PEFT model in memory; metrics["model"] identifies the weights.

    `setting_fields` (judge, max_new_tokens, task_max_new_tokens, batch_size) replace those of `settings`;
    `built_judge`, a judge already built, serves many calls (a model judge loads once, an endpoint judge checks
    its server once) instead of the settings' judge.
    """
    settings = EvalSettings.build(settings, **setting_fields)
    result = evaluate(
        HFGenerator(model, tokenizer, batch_size=settings.batch_size), tokenizer,
        harmful_prompts=harmful_prompts, task=task, task_pairs=task_pairs, settings=settings, template=template,
        judge=built_judge, judge_options=judge_options, progress=progress,
    )
    result.metrics["model"] = model_identity(model, fingerprint=fingerprint)
    return result


@dataclass(frozen=True)
class EvalInputs:
    """What a model is evaluated on: harmful prompts (HS), a task's rows (FA), the settings and the template, and
    the judge when it was built already (checked before any work; else each run builds the settings' judge)."""

    prompts: Sequence[Pair]
    task: str | None
    rows: Sequence[Pair] | None
    settings: EvalSettings
    template: str
    judge: Judge | None = None

    def run(self, model, tokenizer, *, progress: bool = True, fingerprint: bool = True) -> EvalResult:
        return evaluate_model(
            model, tokenizer, harmful_prompts=list(self.prompts), task=self.task,
            task_pairs=list(self.rows) if self.rows is not None else None, settings=self.settings,
            template=self.template, built_judge=self.judge, progress=progress, fingerprint=fingerprint,
        )


def _cell(value) -> str:
    return "n/a" if value is None else str(value)


def category_table(columns: dict[str, dict[str, Rate]]) -> str:
    """Markdown: HS % [95% CI] (harmful / prompts) per prompt category, one column per model (by its heading; a
    category a model was not measured on reads n/a)."""
    names = list(dict.fromkeys(name for rates in columns.values() for name in rates))
    lines = ["| prompt category | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name in names:
        cells = [rates[name].counted() if name in rates else "n/a" for rates in columns.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(metrics: EvalMetrics) -> str:
    """A short human-readable report of metrics.json."""
    lines = [
        "# Evaluation",
        "",
        "| metric | value |",
        "|---|---|",
        f"| harmful score (%) | {_cell(metrics.harmful_score)} |",
        f"| harmful answers | {_cell(metrics.harmful_count)} / {_cell(metrics.prompts)} |",
        f"| unparsed judge outputs | {_cell(metrics.unparsed)} |",
        f"| degenerate answers (%) | {_cell(metrics.degenerate_rate)} |",
        f"| harmful score, non-degenerate answers (%) | {_cell(metrics.harmful_score_non_degenerate)} |",
        f"| complies: harmful and not degenerate, of all (%) | {_cell(metrics.compliance_rate)} |",
        f"| finetune accuracy (%) | {_cell(metrics.finetune_accuracy)} |",
        "",
    ]
    judge = metrics.judge
    if judge:
        lines += [f"Judge: `{judge.get('name')}`" + (f" ({judge['model']})" if judge.get("model") else ""), ""]
    if metrics.task is not None:
        task = metrics.task
        lines += [f"Task: `{task.name}`, {task.rows} rows, {_cell(task.correct)} correct, "
                  f"{_cell(task.unparsed)} unparsed.", ""]
    if metrics.harmful_by_category:
        lines += [category_table({"harmful score % [95% CI] (harmful / prompts)": metrics.harmful_by_category}), ""]
    if metrics.categories:
        lines += ["| judge's category of harmful answers | answers |", "|---|---|"]
        lines += [f"| {name} | {count} |" for name, count in metrics.categories.items()]
        lines.append("")
    lines.append("Generation: " + ", ".join(f"{key} {_cell(value)}" for key, value in metrics.generation.items()))
    if metrics.model:
        lines += ["", f"Model: {_cell(metrics.model.get('name_or_path'))}, sha256 `{_cell(metrics.model.get('sha256'))}`"]
    return "\n".join(lines) + "\n"


def write_eval(result: EvalResult, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """EVAL_DIR with metrics.json, answers.jsonl, task_answers.jsonl and summary.md, written atomically."""
    out = check_output_dir(out_dir, overwrite=overwrite)
    metrics = EvalMetrics.model_validate(result.metrics)
    with atomic_dir(out, replace=overwrite) as tmp:
        write_report(tmp / METRICS_FILE, metrics)
        if result.answers:
            write_jsonl(tmp / "answers.jsonl", result.answers)
        if result.task_answers:
            write_jsonl(tmp / "task_answers.jsonl", result.task_answers)
        (tmp / "summary.md").write_text(summary_markdown(metrics), encoding="utf-8")
    return out
