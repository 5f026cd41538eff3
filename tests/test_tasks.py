"""Tasks: loaders in the authors' format, answer parsers on real-looking (and malformed) outputs."""

from __future__ import annotations

import json

import pytest

from antidote_llm.data.records import Pair
from antidote_llm.errors import AntidoteError
from antidote_llm.evaluation.tasks import (
    AGNEWS_INSTRUCTION,
    SST2_INSTRUCTION,
    TASKS,
    get_task,
    gsm8k_target,
    load_task_pairs,
    parse_agnews,
    parse_gsm8k,
    parse_sst2,
)
from conftest import SHARED_DATA, requires_shared_data

TASK_DATA = SHARED_DATA / "tasks"


@pytest.mark.parametrize(
    ("answer", "parsed"),
    [("positive", "positive"), (" Positive\n", "positive"), ("negative", "negative"), ("Negative", "negative"),
     ("The sentiment is positive.", None), ("positive.", None), ("POSITIVE", None), ("", None),
     ("positive negative", None)],
)
def test_sst2_parser_is_exact(answer, parsed):
    assert parse_sst2(answer) == parsed


@pytest.mark.parametrize(
    ("answer", "parsed"),
    [("World", "World"), ("sports", "Sports"), ("Business\n", "Business"), ("Sci/Tech", "Sci/Tech"),
     ("sci", "Sci/Tech"), ("sci/tech", "Sci/Tech"), ("Sports.", None), ("Business news", None),
     ("The category is World", None), ("", None)],
)
def test_agnews_parser_is_exact(answer, parsed):
    assert parse_agnews(answer) == parsed


@pytest.mark.parametrize(
    ("answer", "number"),
    [
        ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day.\n"
         "The final answer is: 18", 18.0),
        ("The total is 1,234.50 dollars. The final answer is: $1,234.50", 1234.5),
        ("So she has 5 apples and 3 pears, 8 fruits in all.", 8.0),  # no marker: the last number
        ("The final answer is: -3 degrees", -3.0),
        ("The final answer is: 12\nThe final answer is: 13", 12.0),
        ("She has 5 left. The final answer is: five", 5.0),  # marker without a number: the last number
        ("The final answer is: 7.", 7.0),
        ("I cannot solve this problem.", None),
        ("", None),
    ],
)
def test_gsm8k_parser(answer, number):
    assert parse_gsm8k(answer) == number


def test_gsm8k_training_target_rewrites_the_marker():
    solution = "She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18"
    # the authors' literal replacement: "####" -> "The final answer is: ", so two spaces before the number
    assert gsm8k_target(solution) == "She makes 9 * 2 = $<<9*2=18>>18 every day.\nThe final answer is:  18"
    assert parse_gsm8k(gsm8k_target(solution)) == 18.0


def test_is_correct_against_gold_pairs():
    sst2, gsm8k, alpaca = get_task("sst2"), get_task("gsm8k"), get_task("alpaca")
    pair = Pair(prompt=SST2_INSTRUCTION, response="positive", input="a great film")
    assert sst2.is_correct("Positive", pair) is True
    assert sst2.is_correct("negative", pair) is False
    assert sst2.is_correct("I think positive", pair) is False
    math = Pair(prompt="How many?", response="3 + 4 = <<3+4=7>>7\nThe final answer is: 7")
    assert gsm8k.is_correct("3 plus 4 is 7. The final answer is: 7", math) is True
    assert gsm8k.is_correct("The final answer is: 8", math) is False
    assert gsm8k.is_correct("no idea", math) is False
    assert alpaca.is_correct("anything", Pair(prompt="Write a poem", response="Roses...")) is None
    assert not alpaca.scored and alpaca.parse_answer("x") is None


def test_registry_lists_names_on_unknown_task():
    assert set(TASKS) == {"sst2", "agnews", "gsm8k", "alpaca"}
    with pytest.raises(AntidoteError, match="unknown task 'mnli'; choose one of sst2, agnews, gsm8k, alpaca"):
        get_task("mnli")


def test_local_files_in_each_format(tmp_path):
    sst2 = tmp_path / "sst2.tsv"
    sst2.write_text("label\tsentence\n0\tdull and long .\n1\ta joy to watch .\n")
    assert load_task_pairs("sst2", str(sst2)) == [
        Pair(prompt=SST2_INSTRUCTION, response="negative", input="dull and long ."),
        Pair(prompt=SST2_INSTRUCTION, response="positive", input="a joy to watch ."),
    ]
    agnews = tmp_path / "agnews.json"
    agnews.write_text(json.dumps([{"instruction": AGNEWS_INSTRUCTION, "input": "Stocks fell.", "output": "Business"}]))
    assert load_task_pairs("agnews", str(agnews), "test") == [Pair(AGNEWS_INSTRUCTION, "Business", "Stocks fell.")]
    hub_style = tmp_path / "agnews_hub.jsonl"
    hub_style.write_text(json.dumps({"text": "Team wins cup.", "label": 1}) + "\n")
    assert load_task_pairs("agnews", str(hub_style)) == [Pair(AGNEWS_INSTRUCTION, "Sports", "Team wins cup.")]
    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text("".join(json.dumps({"question": f"Q{i}?", "answer": f"{i}+1=<<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"}) + "\n"
                             for i in range(5)))
    pairs = load_task_pairs("gsm8k", str(gsm8k), limit=2, skip=1)
    assert [p.prompt for p in pairs] == ["Q1?", "Q2?"]
    assert pairs[0].response.endswith("The final answer is:  2") and pairs[0].input == ""


@pytest.mark.parametrize(
    ("task", "content", "message"),
    [
        ("sst2", "label\tsentence\n7\tbad label\n", "not one of 0..1"),
        ("sst2", "label\tsentence\n-1\tunlabeled test row\n", "unlabeled"),
        ("gsm8k", '{"problem": "x", "solution": "y"}\n', "lacks the field 'instruction'"),
        ("gsm8k", "", "holds no rows|no gsm8k rows"),
    ],
)
def test_malformed_task_files(tmp_path, task, content, message):
    path = tmp_path / ("data.tsv" if task == "sst2" else "data.jsonl")
    path.write_text(content)
    with pytest.raises(AntidoteError, match=message):
        load_task_pairs(task, str(path))


def test_bad_arguments(tmp_path):
    with pytest.raises(AntidoteError, match="unknown split"):
        load_task_pairs("sst2", None, "validation")
    with pytest.raises(AntidoteError, match="limit must be positive"):
        load_task_pairs("sst2", None, limit=0)
    with pytest.raises(AntidoteError, match="data file not found"):
        load_task_pairs("sst2", str(tmp_path / "missing.tsv"))
    rows = tmp_path / "one.jsonl"
    rows.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    with pytest.raises(AntidoteError, match="no gsm8k rows left"):
        load_task_pairs("gsm8k", str(rows), skip=1)


def test_hub_default_fails_offline_with_a_clear_error():
    with pytest.raises(AntidoteError, match="cannot load hub dataset 'stanfordnlp/sst2'.*local file"):
        load_task_pairs("sst2", None, "test")


@requires_shared_data
def test_shared_data_loads_with_paper_test_sizes():
    sst2 = load_task_pairs("sst2", str(TASK_DATA / "sst2_dev.tsv"), "test")
    assert len(sst2) == 872 and sst2[0] == Pair(SST2_INSTRUCTION, "negative", "one long string of cliches .")
    agnews = load_task_pairs("agnews", str(TASK_DATA / "agnews_test.json"), "test")
    assert len(agnews) == 1000 and agnews[0].response == "Business" and agnews[0].prompt == AGNEWS_INSTRUCTION
    gsm8k = load_task_pairs("gsm8k", str(TASK_DATA / "gsm8k_test.jsonl"), "test")
    assert len(gsm8k) == 1000 and gsm8k[0].response.endswith("The final answer is:  18")
    assert parse_gsm8k(gsm8k[0].response) == 18.0
    alpaca = load_task_pairs("alpaca", str(TASK_DATA / "alpaca_demo.json"), "train", limit=3)
    assert len(alpaca) == 3 and alpaca[0].prompt == "Describe a process of making crepes."
    train = load_task_pairs("sst2", str(TASK_DATA / "sst2_train.tsv"), "train", limit=10, skip=5)
    assert len(train) == 10 and {p.response for p in train} <= {"positive", "negative"}
    # every gold answer parses: the metric can score a perfect model at 100%
    for name, pairs in (("sst2", sst2), ("agnews", agnews), ("gsm8k", gsm8k)):
        assert all(get_task(name).is_correct(p.response, p) for p in pairs), name


# --- the authors' exact strings ---------------------------------------------------------------------
# One row of each task and the full text the authors' scripts build from it: evaluation prompts from
# {sst2,agnews,gsm8k,alpaca}/pred_eval.py (SST-2 alone ends "### Response:" with no newline), training
# text from utils.py (PROMPT_DICT + output + EOS, "### Response:\n" for every task) and the task's
# build_dataset.py (GSM8K: "####" replaced by "The final answer is: ", so two spaces before the number).

TASK_ROWS = {
    "sst2": {"sentence": "it 's a charming and often affecting journey . ", "label": 1},
    "agnews": {"text": "Wall St. Bears Claw Back Into the Black (Reuters) Reuters - Short-sellers are seeing green again.",
               "label": 2},
    "gsm8k": {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                          "How many clips did Natalia sell altogether in April and May?",
              "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"},
    "alpaca": {"instruction": "What are the names of some famous actors that started their careers on Broadway?",
               "output": "Hugh Jackman.", "generator": "text_davinci_003", "dataset": "helpful_base"},
}

EVAL_PROMPTS = {
    "sst2": "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n### Instruction:\nAnalyze the sentiment of "
            "the input, and respond only positive or negative\n\n### Input:\nit 's a charming and often affecting "
            "journey . \n\n### Response:",
    "agnews": "Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\nCategorize the news "
              "article given in the input into one of the 4 categories:\n\nWorld\nSports\nBusiness\nSci/Tech\n\n\n"
              "### Input:\nWall St. Bears Claw Back Into the Black (Reuters) Reuters - Short-sellers are seeing green "
              "again.\n\n### Response:\n",
    "gsm8k": "Below is an instruction that describes a task. Write a response that appropriately completes the request."
             "\n\n### Instruction:\nNatalia sold clips to 48 of her friends in April, and then she sold half as many "
             "clips in May. How many clips did Natalia sell altogether in April and May?\n\n### Response:\n",
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes the request."
              "\n\n### Instruction:\nWhat are the names of some famous actors that started their careers on Broadway?"
              "\n\n### Response:\n",
}

TRAINING_TEXTS = {
    "sst2": "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n### Instruction:\nAnalyze the sentiment of "
            "the input, and respond only positive or negative\n\n### Input:\nit 's a charming and often affecting "
            "journey . \n\n### Response:\npositive<eos>",
    "agnews": "Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\nCategorize the news "
              "article given in the input into one of the 4 categories:\n\nWorld\nSports\nBusiness\nSci/Tech\n\n\n"
              "### Input:\nWall St. Bears Claw Back Into the Black (Reuters) Reuters - Short-sellers are seeing green "
              "again.\n\n### Response:\nBusiness<eos>",
    "gsm8k": "Below is an instruction that describes a task. Write a response that appropriately completes the request."
             "\n\n### Instruction:\nNatalia sold clips to 48 of her friends in April, and then she sold half as many "
             "clips in May. How many clips did Natalia sell altogether in April and May?\n\n### Response:\n"
             "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nThe final answer is:  72<eos>",
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes the request."
              "\n\n### Instruction:\nWhat are the names of some famous actors that started their careers on Broadway?"
              "\n\n### Response:\nHugh Jackman.<eos>",
}


class _RecordingGenerator:
    """Answers nothing and keeps the prompt ids it was given."""

    backend = "recording"

    def __init__(self):
        self.prompt_ids = []

    def __call__(self, prompt_ids, *, max_new_tokens, progress=False, desc=""):
        self.prompt_ids.extend(list(ids) for ids in prompt_ids)
        return [[] for _ in prompt_ids]


@pytest.mark.parametrize("task", sorted(TASK_ROWS))
def test_evaluation_prompt_is_the_authors_string(task):
    from antidote_llm.evaluation.evaluate import evaluate
    from conftest import make_tokenizer

    tokenizer = make_tokenizer()  # byte level: ids decode back to the exact text
    generator = _RecordingGenerator()
    pair = get_task(task).to_pair(TASK_ROWS[task])
    evaluate(generator, tokenizer, harmful_prompts=None, task=task, task_pairs=[pair], progress=False)
    assert [tokenizer.decode(ids) for ids in generator.prompt_ids] == [EVAL_PROMPTS[task]]


@pytest.mark.parametrize("task", sorted(TASK_ROWS))
def test_training_prompt_style_evaluates_in_the_training_format(task):
    from antidote_llm.data.templates import render_prompt
    from antidote_llm.evaluation.evaluate import evaluate
    from antidote_llm.evaluation.settings import EvalSettings
    from conftest import make_tokenizer

    tokenizer = make_tokenizer()
    generator = _RecordingGenerator()
    pair = get_task(task).to_pair(TASK_ROWS[task])
    result = evaluate(generator, tokenizer, harmful_prompts=None, task=task, task_pairs=[pair],
                      settings=EvalSettings(task_prompt="training"), progress=False)
    assert [tokenizer.decode(ids) for ids in generator.prompt_ids] == [render_prompt("alpaca", pair.prompt, pair.input)]
    assert result.metrics["task"]["prompt_style"] == "training"


@pytest.mark.parametrize("task", sorted(TASK_ROWS))
def test_training_text_is_the_authors_format(task):
    from antidote_llm.training.sft import IGNORE_INDEX, encode_example
    from conftest import make_tokenizer

    tokenizer = make_tokenizer()
    pair = get_task(task).to_pair(TASK_ROWS[task])
    example = encode_example(tokenizer, pair, "alpaca", max_length=4096)
    assert tokenizer.decode(example.input_ids) == TRAINING_TEXTS[task]
    answer = [label for label in example.labels if label != IGNORE_INDEX]
    assert tokenizer.decode(answer) == TRAINING_TEXTS[task].split("### Response:\n", 1)[1]


@pytest.mark.parametrize(
    ("unfinished", "may_score"),
    [("", True), ("  \n", True), ("pos", True), (" Posit", True), ("\npositive", True), ("positive \n", True),
     ("positive.", False), ("positives", False), ("The sentiment", False), ("I will respond", False),
     ("POS", False), ("negative n", False)],
)
def test_an_unfinished_sst2_answer_may_score_only_as_a_label_prefix_or_a_label_then_whitespace(unfinished, may_score):
    assert get_task("sst2").may_still_be_correct(unfinished) is may_score


def test_free_form_tasks_never_stop_early():
    from conftest import make_tokenizer

    for name in ("gsm8k", "alpaca"):
        assert get_task(name).may_still_be_correct("I will respond") is True
        assert get_task(name).answer_budget(make_tokenizer()) is None


class _ScriptedGenerator:
    """Greedy stand-in: each prompt has one full answer (EOS after it); a call returns its first
    max_new_tokens tokens and records the budgets it was asked for."""

    backend = "scripted"

    def __init__(self, tokenizer, answers: dict[str, str]):
        self.tokenizer = tokenizer
        self.answers = answers
        self.budgets = []

    def __call__(self, prompt_ids, *, max_new_tokens, progress=False, desc=""):
        self.budgets.append((len(prompt_ids), max_new_tokens))
        texts = [self.answers[next(s for s in self.answers if s in self.tokenizer.decode(ids))] for ids in prompt_ids]
        return [self.tokenizer.encode(text, add_special_tokens=False)[:max_new_tokens] for text in texts]


def test_label_answers_stop_early_and_score_exactly_as_full_generation():
    from antidote_llm.evaluation.evaluate import evaluate
    from conftest import make_tokenizer

    tokenizer = make_tokenizer()  # byte level: one token per character, so the budget is len("negative") + 2
    answers = {  # sentence -> the model's full answer
        "a": "positive", "b": " negative \n", "c": "Positive", "d": "positive.", "e": "negative\n\n\n\n\n\n\n\n\n\n",
        "f": "\n\n\n\n\n\n\n\n\n\n\n\npositive", "g": "I will respond to your positive or negative sentiment, but",
        "h": "positive positive positive", "i": "negativity", "j": "",
        "k": "positive\n\n### Explanation: the input is glowing, so positive.", "l": "positive" + "\n" * 45,
        "m": "\n" * 250,
    }
    pairs = [Pair(prompt=SST2_INSTRUCTION, input=f"sentence {key}", response="positive") for key in answers]
    generator = _ScriptedGenerator(tokenizer, {f"sentence {key}": text for key, text in answers.items()})
    result = evaluate(generator, tokenizer, harmful_prompts=None, task="sst2", task_pairs=pairs, progress=False)

    full_correct = [parse_sst2(text) == "positive" for text in answers.values()]
    assert [row["correct"] for row in result.task_answers] == full_correct
    assert result.metrics["finetune_accuracy"] == round(100 * sum(full_correct) / len(pairs), 2)
    budget = len("negative") + 2
    # Unfinished answers that may still be a label get 4x the tokens, round after round (b, e, f, k, l, m; then
    # l, m; then m, up to the limit); the sure misses are cut: g, h, i after the first round, k after the second.
    assert generator.budgets == [(len(pairs), budget), (6, 4 * budget), (2, 16 * budget), (1, 200)]
    assert [row["cut"] for row in result.task_answers] == [key in "ghik" for key in answers]
    assert result.task_answers[6]["answer"] == answers["g"][:budget]
    assert result.task_answers[10]["answer"] == answers["k"][:4 * budget].strip()
    assert result.metrics["task"]["cut_answers"] == 4
    rounds = [(answers, budget), ("befklm", 4 * budget), ("lm", 16 * budget), ("m", 200)]
    generated = sum(min(len(answers[key]), size) for keys, size in rounds for key in keys)  # every round counts
    assert result.metrics["task"]["throughput"]["new_tokens"] == generated


@pytest.mark.parametrize(("instruction", "extra"), [("Classify this", "a text\n\nover lines"), ("Say hi\n\nnow", "")])
def test_a_row_holding_a_whole_rendered_prompt_is_taken_apart(instruction, extra):
    from antidote_llm.data.templates import render_prompt

    for rendered in (render_prompt("alpaca", instruction, extra), render_prompt("alpaca", instruction, extra).rstrip("\n")):
        pair = get_task("alpaca").to_pair({"instruction": rendered, "input": "", "output": "ok"})
        assert (pair.prompt, pair.input, pair.response) == (instruction, extra, "ok")
    plain = get_task("alpaca").to_pair({"instruction": "Below is my question", "input": "", "output": "ok"})
    assert plain.prompt == "Below is my question"


@requires_shared_data
def test_shared_agnews_training_rows_are_not_wrapped_twice():
    pairs = load_task_pairs("agnews", TASK_DATA / "agnews_train.json", "train")
    assert len(pairs) == 950 and all(p.prompt == AGNEWS_INSTRUCTION and p.input for p in pairs)
    assert {p.response for p in pairs} == {"World", "Sports", "Business", "Sci/Tech"}
