"""Fine-tuning tasks: their data in the authors' instruction format, answer parsers and accuracy.

One registry serves training (the benign rows of the user's fine-tuning data) and evaluation (finetune
accuracy, FA). Formats and scoring follow the authors' per-task scripts (git-disl/Antidote
`*/build_dataset.py` for the training rows, `*/pred_eval.py` for evaluation):

  sst2     instruction "Analyze the sentiment of the input, and respond only positive or negative",
           input = sentence, answer "positive"/"negative"; correct when the stripped answer is exactly
           the label or its capitalized form. Test: all 872 validation rows. The evaluation prompt ends
           "### Response:" with no newline (sst2/pred_eval.py), training ends it "### Response:\\n" as
           for every task (utils.py PROMPT_DICT); both are kept as the authors have them.
  agnews   instruction "Categorize the news article ... World\\nSports\\nBusiness\\nSci/Tech\\n", input =
           article; correct when the stripped answer is exactly the label, its lowercase form, or "sci"
           for Sci/Tech. Test: the first 1,000 test rows.
  gsm8k    instruction = question; the solution's "####" replaced by "The final answer is: " (so the
           number follows two spaces, literally as the authors' build_dataset.py); the answer's number
           is the first after "The final answer is:", else its last number (commas dropped); correct when
           equal to the solution's. Test: the first 1,000 test rows.
  alpaca   instruction (+ input) -> output; generation only, answers are written and not scored
           (the paper reports AlpacaEval win rates). Test: alpaca_eval rows after the first 701.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from antidote_llm.data.records import Pair, check_samples, read_hub, read_records
from antidote_llm.data.templates import render_prompt, unrender_alpaca
from antidote_llm.errors import AntidoteError

SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative"
SST2_LABELS = ("negative", "positive")  # GLUE SST-2 label 0, 1
AGNEWS_INSTRUCTION = (
    "Categorize the news article given in the input into one of the 4 categories:\n\nWorld\nSports\nBusiness\nSci/Tech\n"
)
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")  # AG News label 0..3
GSM8K_ANSWER_MARKER = "The final answer is:"
GSM8K_ANSWER_PROMPT = "The final answer is: "  # the authors' replacement for "####"
NUMBER = re.compile(r"-?\d+\.?\d*")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class HubSplit:
    """Where a split lives on the hub; `skip` rows are dropped first (the authors' alpaca_eval offset)."""

    name: str
    split: str
    config: str | None = None
    skip: int = 0


@dataclass(frozen=True)
class Task:
    """A fine-tuning task: hub defaults, row conversion, answer parser and the paper's test size."""

    name: str
    hub: Mapping[str, HubSplit]
    to_pair: Callable[[dict], Pair]
    parse: Callable[[str], object] | None  # None: generation only, no score
    test_rows: int | None  # the paper's evaluation size (first N test rows); None: all
    max_new_tokens: int  # the authors' generation limit for this task
    eval_response_newline: bool = True  # False: the authors' evaluation prompt ends "### Response:" (SST-2)
    exact_answers: Mapping[str, str] | None = None  # accepted spelling -> label, when only those score

    @property
    def scored(self) -> bool:
        return self.parse is not None

    def eval_prompt(self, pair: Pair, template: str = "alpaca", tokenizer=None, style: str = "authors") -> str:
        """The prompt text the model answers at evaluation. Style `authors`: the training prompt, except that
        with the Alpaca template a task the authors evaluate without the newline after "### Response:" gets
        none; style `training`: exactly the training prompt."""
        text = render_prompt(template, pair.prompt, pair.input, tokenizer)
        if style == "authors" and template == "alpaca" and not self.eval_response_newline:
            text = text.removesuffix("\n")
        return text

    def answer_budget(self, tokenizer) -> int | None:
        """Tokens after which an unfinished answer is worth finishing only if it may still be accepted (see
        may_still_be_correct): the longest accepted answer's tokens plus two (a space or a newline around it).
        None when an answer of any length may be correct."""
        if self.exact_answers is None:
            return None
        return max(len(tokenizer.encode(answer, add_special_tokens=False)) for answer in self.exact_answers) + 2

    def may_still_be_correct(self, unfinished_answer: str) -> bool:
        """Whether an answer that starts with `unfinished_answer` can still score: for an exact-label task, only
        when the text so far is whitespace then the start of an accepted spelling, or a whole accepted spelling
        then whitespace (the score strips the answer); every other continuation leaves it wrong."""
        if self.exact_answers is None:
            return True
        head = unfinished_answer.lstrip()
        return head.rstrip() in self.exact_answers or any(answer.startswith(head) for answer in self.exact_answers)

    def parse_answer(self, answer_text: str) -> object | None:
        """The label or number an answer gives, or None when it gives none (or the task is unscored)."""
        return self.parse(answer_text) if self.parse is not None else None

    def is_correct(self, answer_text: str, pair: Pair) -> bool | None:
        """Whether a model answer matches the pair's gold answer; None for generation-only tasks."""
        if self.parse is None:
            return None
        parsed = self.parse(answer_text)
        return parsed is not None and parsed == self.parse(pair.response)


def _exact_label(variants: Mapping[str, str]) -> Callable[[str], str | None]:
    """The authors' scoring: the whole stripped answer must be one of the accepted spellings."""

    def parse(answer_text: str) -> str | None:
        return variants.get(answer_text.strip())

    return parse


SST2_ANSWERS = {spelling: label for label in SST2_LABELS for spelling in (label, label.capitalize())}
AGNEWS_ANSWERS = {**{spelling: label for label in AGNEWS_LABELS for spelling in (label, label.lower())}, "sci": "Sci/Tech"}
parse_sst2 = _exact_label(SST2_ANSWERS)
parse_agnews = _exact_label(AGNEWS_ANSWERS)


def parse_gsm8k(answer_text: str) -> float | None:
    """The number after the first "The final answer is:" (up to the next one), else the last number."""
    text = answer_text.replace(",", "")
    numbers = NUMBER.findall(text)
    if not numbers:
        return None
    _, marker, after = text.partition(GSM8K_ANSWER_MARKER)
    if marker:
        stated = NUMBER.findall(after.split(GSM8K_ANSWER_MARKER)[0])
        if stated:
            return float(stated[0])
    return float(numbers[-1])


def gsm8k_target(solution: str) -> str:
    """A GSM8K solution in the authors' training format: "####" replaced by "The final answer is: ", so
    "#### 18" becomes "The final answer is:  18" (two spaces, as gsm8k/build_dataset.py writes it)."""
    return solution.replace("####", GSM8K_ANSWER_PROMPT)


def _field(row: dict, name: str) -> str:
    value = row[name]
    return "" if value is None else str(value)


def _label_index(row: dict, labels: tuple[str, ...]) -> int:
    try:
        index = int(row["label"])
    except (TypeError, ValueError):
        index = -1
    if not 0 <= index < len(labels):
        raise AntidoteError(f"label {row['label']!r} is not one of 0..{len(labels) - 1}; the split may be unlabeled")
    return index


def _instruction_pair(row: dict) -> Pair:
    """A row already in the authors' format: instruction, optional input, output. An instruction that is a
    whole rendered Alpaca prompt with no separate input is taken apart, so it is not wrapped twice."""
    instruction, extra = _field(row, "instruction"), _field(row, "input") if "input" in row else ""
    parts = None if extra else unrender_alpaca(instruction)
    if parts is not None:
        instruction, extra = parts
    return Pair(prompt=instruction, response=_field(row, "output"), input=extra)


def _sst2_pair(row: dict) -> Pair:
    if "sentence" not in row:
        return _instruction_pair(row)
    return Pair(prompt=SST2_INSTRUCTION, response=SST2_LABELS[_label_index(row, SST2_LABELS)], input=_field(row, "sentence"))


def _agnews_pair(row: dict) -> Pair:
    if "text" not in row:
        return _instruction_pair(row)
    return Pair(prompt=AGNEWS_INSTRUCTION, response=AGNEWS_LABELS[_label_index(row, AGNEWS_LABELS)], input=_field(row, "text"))


def _gsm8k_pair(row: dict) -> Pair:
    if "question" not in row:
        return _instruction_pair(row)
    return Pair(prompt=_field(row, "question"), response=gsm8k_target(_field(row, "answer")))


TASKS: dict[str, Task] = {
    "sst2": Task(
        name="sst2",
        hub={"train": HubSplit("stanfordnlp/sst2", "train"), "test": HubSplit("stanfordnlp/sst2", "validation")},
        to_pair=_sst2_pair, parse=parse_sst2, test_rows=None, max_new_tokens=200, eval_response_newline=False,
        exact_answers=SST2_ANSWERS,
    ),
    "agnews": Task(
        name="agnews",
        hub={"train": HubSplit("fancyzhx/ag_news", "train"), "test": HubSplit("fancyzhx/ag_news", "test")},
        to_pair=_agnews_pair, parse=parse_agnews, test_rows=1000, max_new_tokens=200, exact_answers=AGNEWS_ANSWERS,
    ),
    "gsm8k": Task(
        name="gsm8k",
        hub={"train": HubSplit("openai/gsm8k", "train", "main"), "test": HubSplit("openai/gsm8k", "test", "main")},
        to_pair=_gsm8k_pair, parse=parse_gsm8k, test_rows=1000, max_new_tokens=512,
    ),
    "alpaca": Task(
        name="alpaca",
        hub={
            "train": HubSplit("tatsu-lab/alpaca", "train"),
            "test": HubSplit("tatsu-lab/alpaca_eval", "eval", "alpaca_eval", skip=701),
        },
        to_pair=_instruction_pair, parse=None, test_rows=None, max_new_tokens=512,
    ),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise AntidoteError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None


def _hub_rows(hub: HubSplit) -> list[dict]:
    return read_hub(hub.name, hub.split, hub.config)


def load_task_pairs(
    task: str, source: str | None = None, split: str = "train", limit: int | None = None, skip: int = 0,
    samples: int | None = None, name: str = "samples",
) -> list[Pair]:
    """Rows of `task` as (instruction, input, gold answer) pairs in the authors' format.

    `source` is a local file (the formats of shared/data/tasks, or any instruction/input/output rows) or
    `hf:NAME[:SPLIT]`; None loads the task's hub dataset for `split`. The first `skip` rows are dropped,
    then the first `limit` kept (a cap); on the test split, limit None means the paper's size (Task.test_rows).
    `samples` asks for exactly that many instead: more than there are is refused (check_samples, naming `name`).
    """
    spec = get_task(task)
    if split not in SPLITS:
        raise AntidoteError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise AntidoteError(f"limit must be positive, got {limit}")
    if skip < 0:
        raise AntidoteError(f"skip must not be negative, got {skip}")
    if source is None:
        hub = spec.hub[split]
        rows, skip, origin = _hub_rows(hub), skip + hub.skip, f"hub dataset {hub.name}"
    else:
        rows, origin = read_records(source), str(source)
    if samples is not None:
        if samples < 1:
            raise AntidoteError(f"{name} must be positive, got {samples}")
        check_samples(samples, max(len(rows) - skip, 0), len(rows), origin, name)
        limit = samples
    if limit is None and split == "test":
        limit = spec.test_rows
    selected = rows[skip:skip + limit if limit is not None else None]
    if not selected:
        raise AntidoteError(f"{origin} has no {task} rows left (rows={len(rows)}, skip={skip}); check the data or --skip")
    try:
        return [spec.to_pair(row) for row in selected]
    except KeyError as exc:
        raise AntidoteError(
            f"{origin} is not {task} data: a row lacks the field {exc.args[0]!r} (fields found: "
            f"{', '.join(selected[0])})"
        ) from None
