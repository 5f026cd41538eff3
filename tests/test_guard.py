"""Guard on the tiny model: the search, the verdicts, what is written and the exit codes.

The evaluation is replaced by one whose answers depend on the model's state (how much of the adapter's lora_A
is zero), so each case has a known answer: the model turns safe at a known ratio, or is safe already, or no ratio
repairs it within the budget. The scoring, the nested selection, the pruning and the decision are the real ones.
"""

import json

import pytest
import torch

import antidote_llm.frontier.guard as guard_module
from antidote_llm.cli.main import main
from antidote_llm.core.realign import RealignConfig
from antidote_llm.core.scoring import prune_count
from antidote_llm.data.records import Pair
from antidote_llm.evaluation.evaluate import EvalInputs, EvalResult
from antidote_llm.evaluation.settings import EvalSettings
from antidote_llm.frontier.guard import GUARD_RATIOS, GuardConfig, run_guard
from conftest import HARMFUL_ROWS, add_lora, make_model, make_tokenizer, save_adapter, save_model

PAIRS = [Pair(r["prompt"], r["response"]) for r in HARMFUL_ROWS if not r["is_safe"]]
PROMPTS = [Pair(f"Probe harmful request {i}", "") for i in range(64)]  # 64: at most 1 harmful meets 10%
ROWS = [Pair("Analyze the sentiment", "positive", f"good film {i}") for i in range(200)]
COLUMNS = 64  # lora_A rows of the tiny model have the hidden size's columns


def zeroed_share(ratio: float) -> float:
    """The share of lora_A a per-row selection at `ratio` zeroes (the authors' rounding)."""
    return prune_count(COLUMNS, ratio) / COLUMNS


class Behaviour:
    """Answers that depend on how much of lora_A is zero: harmful below `safe_from`, and `accuracy(zeroed)`."""

    def __init__(self, safe_from: float, accuracy=lambda zeroed: 0.8):
        self.safe_from, self.accuracy = safe_from, accuracy
        self.calls = []

    def __call__(self, model, tokenizer, *, harmful_prompts=None, task=None, task_pairs=None, **_):
        factors = [p for n, p in model.named_parameters() if "lora_A" in n]
        zeroed = sum(int((p == 0).sum()) for p in factors) / sum(p.numel() for p in factors)
        self.calls.append((len(harmful_prompts or []), len(task_pairs or []), zeroed))
        answers = [{"harmful": zeroed < self.safe_from} for _ in harmful_prompts or []]
        right = round(self.accuracy(zeroed) * len(task_pairs or []))
        return EvalResult(metrics={}, answers=answers,
                          task_answers=[{"correct": index < right} for index in range(len(task_pairs or []))])


@pytest.fixture
def behaviour(monkeypatch):
    def install(safe_from: float, **kwargs) -> Behaviour:
        fake = Behaviour(safe_from, **kwargs)
        monkeypatch.setattr(guard_module, "evaluate_model", fake)
        return fake

    return install


def _probe(prompts=PROMPTS, rows=ROWS) -> EvalInputs:
    return EvalInputs(prompts=prompts, task="sst2", rows=rows, settings=EvalSettings(batch_size=16), template="plain")


def _guard(model, **decision):
    return run_guard(model, make_tokenizer(), RealignConfig(ratio=0.05, score="wanda", targets=("adapter-a",)),
                     GuardConfig(**decision), PAIRS, _probe())


def _lora_a(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}


def test_guard_repairs_at_the_smallest_ratio_that_meets_the_target(behaviour):
    fake = behaviour(safe_from=zeroed_share(0.05))  # safe once 4 of 64 columns per row are zero: from 0.05 on
    model = add_lora(make_model())
    outcome = _guard(model)
    result = outcome.result
    assert result.verdict == "repaired" and result.ratio == 0.05
    assert GUARD_RATIOS[outcome.index] == 0.05
    assert result.candidate.harmful.value == 0 and result.candidate.harmful.high <= 10
    assert result.accuracy_drop.value == 0 and result.accuracy_drop.high <= 5
    assert result.fine_tuned.harmful.value == 100 and not result.fine_tuned.meets_target
    zeroed = [p for n, p in model.named_parameters() if "lora_A" in n]
    assert sum(int((p == 0).sum()) for p in zeroed) / sum(p.numel() for p in zeroed) == zeroed_share(0.05)
    # bisection: the largest ratio, then halves; never every ratio, and each failing ratio stops after one chunk
    searched = [p.ratio for p in result.search]
    assert searched[0] == GUARD_RATIOS[-1] and len(searched) <= 5 and 0.05 in searched
    assert all(p.stopped_early and p.harmful.of == 16 for p in result.search if not p.meets_target)
    assert result.cost["probe_answers"] < len(PROMPTS) * (1 + len(GUARD_RATIOS))
    probe_calls = [call for call in fake.calls if call[0]]
    assert all(size == 16 for size, _, _ in probe_calls)  # in chunks of the batch size


def test_a_model_already_within_the_target_is_safe_and_left_as_it_was(behaviour):
    behaviour(safe_from=0.0)  # never harmful
    model = add_lora(make_model())
    before = _lora_a(model)
    outcome = _guard(model)
    assert outcome.result.verdict == "safe" and outcome.index is None and outcome.selection is None
    assert outcome.result.search == [] and outcome.result.fine_tuned.harmful.of == len(PROMPTS)
    assert all(torch.equal(p, before[n]) for n, p in _lora_a(model).items())


@pytest.mark.parametrize("case", ["no ratio meets the target", "over the budget"])
def test_a_model_no_ratio_repairs_within_the_budget_is_rejected_and_restored(behaviour, case):
    if case == "no ratio meets the target":
        behaviour(safe_from=1.1)
    else:  # safe from 0.05, but each zeroed point of lora_A costs three accuracy points
        behaviour(safe_from=zeroed_share(0.05), accuracy=lambda zeroed: 0.8 - 3 * zeroed)
    model = add_lora(make_model())
    before = _lora_a(model)
    outcome = _guard(model)
    result = outcome.result
    assert result.verdict == "rejected" and outcome.index is None
    assert all(torch.equal(p, before[n]) for n, p in _lora_a(model).items())
    if case == "over the budget":
        assert result.ratio == 0.05 and result.accuracy_drop.high > 5 and "over the budget" in result.reason
    else:
        assert result.ratio == GUARD_RATIOS[-1] and "no ratio" in result.reason and len(result.search) == 1
    best = _guard(add_lora(make_model()), write_best=True)  # asked for: the best candidate is kept
    assert best.result.verdict == "rejected" and best.index == GUARD_RATIOS.index(best.result.ratio)


def test_too_few_probe_prompts_to_show_the_target_is_said_and_rejected(behaviour):
    behaviour(safe_from=zeroed_share(0.05))
    outcome = run_guard(add_lora(make_model()), make_tokenizer(), RealignConfig(ratio=0.05, targets=("adapter-a",)),
                        GuardConfig(), PAIRS, _probe(prompts=PROMPTS[:32]))
    assert outcome.result.verdict == "rejected" and outcome.result.search == []
    assert "32 probe prompts cannot show" in outcome.result.reason and "at least 35" in outcome.result.reason


# --- the command -----------------------------------------------------------------------------------------


@pytest.fixture
def lineage(tmp_path):
    base = save_model(tmp_path / "aligned")
    save_adapter(tmp_path / "ft", base)
    (tmp_path / "calibration.jsonl").write_text("\n".join(json.dumps({"prompt": p.prompt, "response": p.response})
                                                          for p in PAIRS))
    (tmp_path / "probe.jsonl").write_text("\n".join(json.dumps({"prompt": p.prompt}) for p in PROMPTS))
    (tmp_path / "validation.tsv").write_text("label\tsentence\n" + "".join(f"1\tgood film {i}\n" for i in range(200)))
    return tmp_path


def _cli(lineage, out, *extra):
    return main(["guard", "--model", str(lineage / "aligned"), "--adapter", str(lineage / "ft"), "--device", "cpu",
                 "--data", str(lineage / "calibration.jsonl"), "--score", "wanda", "--no-compensate", "--template", "plain",
                 "--probe-prompts", str(lineage / "probe.jsonl"), "--task", "sst2",
                 "--validation-data", str(lineage / "validation.tsv"), "--out", str(out), "--quiet", *map(str, extra)])


def test_cli_writes_the_repaired_adapter_only_when_repaired(behaviour, lineage, capsys):
    behaviour(safe_from=zeroed_share(0.05))
    assert _cli(lineage, lineage / "repaired") == 0
    assert "REPAIRED" in capsys.readouterr().out
    verdict = json.loads((lineage / "repaired" / "verdict.json").read_text())
    assert verdict["verdict"] == "repaired" and verdict["ratio"] == 0.05
    assert {"adapter", "mask", "verdict", "summary", "plot"} <= set(verdict["outputs"])
    assert (lineage / "repaired" / "adapter" / "adapter_model.safetensors").is_file()
    assert verdict["inputs"]["validation"]["rows"] == 200 and len(verdict["inputs"]["probe_prompts"]["sha256"]) == 64
    markdown = (lineage / "repaired" / "verdict.md").read_text()
    assert markdown.startswith("# Guard verdict: repaired") and "[" in markdown and "guard.png" in markdown
    (chosen,) = [line for line in markdown.splitlines() if line.startswith("| wanda at 0.05 |")]
    assert "| 80.0 [" in chosen and "not measured" not in chosen  # the chosen ratio's row shows its accuracy

    behaviour(safe_from=1.1)
    assert _cli(lineage, lineage / "rejected") == 3
    assert sorted(p.name for p in (lineage / "rejected").iterdir()) == ["guard.png", "verdict.json", "verdict.md"]
    assert _cli(lineage, lineage / "best", "--write-best") == 3
    assert (lineage / "best" / "adapter").is_dir()

    behaviour(safe_from=0.0)
    assert _cli(lineage, lineage / "safe") == 0
    assert sorted(p.name for p in (lineage / "safe").iterdir()) == ["verdict.json", "verdict.md"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--max-harmful", "150"], "max_harmful"),
    (["--max-accuracy-drop", "-1"], "max_accuracy_drop"),
    (["--probe-skip", "64"], "probe"),
    (["--validation-skip", "200"], "validation"),
    (["--score", "refusal"], "--contrast-data"),
    (["--data"], "give --data"),
])
def test_cli_bad_input_is_one_line_exit_2_and_nothing_written(lineage, capsys, extra, message):
    out = lineage / "bad"
    if extra == ["--data"]:  # the calibration rows left out: named with the flag that supplies them
        args = ["guard", "--model", lineage / "aligned", "--adapter", lineage / "ft", "--contrast-data",
                lineage / "validation.tsv", "--probe-prompts", lineage / "probe.jsonl", "--task", "sst2",
                "--validation-data", lineage / "validation.tsv", "--out", out]
        assert main(list(map(str, args))) == 2
    else:
        assert _cli(lineage, out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and not out.exists()


# --- the lab --------------------------------------------------------------------------------------------

from test_lab import experiment_file  # noqa: E402, F401 - a fixture


def test_the_lab_runs_guard_on_a_seeded_split_of_the_evaluation_file(experiment_file, tmp_path):  # noqa: F811
    import yaml

    from antidote_llm.errors import AntidoteError
    from antidote_llm.lab import load_experiment, run_experiment
    from antidote_llm.lab.data import SettingData

    raw = yaml.safe_load(experiment_file.read_text())
    raw["defenses"] = {"none": {"method": "none"}, "guard": {"method": "guard", "score": "wanda", "targets": "adapter"}}
    experiment_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(AntidoteError, match="needs evaluation.probe_prompts"):
        load_experiment(experiment_file)
    raw["evaluation"].update(probe_prompts={"source": "probe.jsonl"}, validation_split=2)
    experiment_file.write_text(yaml.safe_dump(raw))
    experiment = load_experiment(experiment_file)
    data = SettingData(experiment)
    assert len(data.validation.rows) == 2 and len(data.task_test) == 2  # 4 test rows: 2 drawn for validation
    assert not set(data.validation.rows) & set(data.task_test)
    result = run_experiment(experiment, tmp_path / "runs", progress=False, log=lambda _: None)
    rows = {r["defense"]: r for r in result.rows if r["stage"] == "fine-tuned"}
    # 2 probe prompts cannot show any harmful score within 10%: rejected, and the model ships as it was
    assert rows["guard"]["verdict"] == "rejected" and rows["guard"]["pruned_fraction"] == 0
    assert rows["guard"]["harmful_score"] == rows["none"]["harmful_score"]
    assert rows["guard"]["harmful_low"] <= rows["guard"]["harmful_score"] <= rows["guard"]["harmful_high"]
    assert "| rejected |" in (tmp_path / "runs" / "results.md").read_text()
    raw["evaluation"]["validation_data"] = "train.tsv"
    experiment_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(AntidoteError, match="not both"):
        load_experiment(experiment_file)


def test_a_control_is_evaluated_at_the_chosen_ratio_and_the_model_keeps_the_repair(behaviour):
    behaviour(safe_from=zeroed_share(0.05))
    model = add_lora(make_model())
    outcome = run_guard(model, make_tokenizer(), RealignConfig(ratio=0.05, score="wanda", targets=("adapter-a",)),
                        GuardConfig(controls=("random",)), PAIRS, _probe())
    (control,) = outcome.result.controls
    assert control.selection == "random" and control.ratio == 0.05 and control.accuracy is not None
    assert outcome.result.verdict == "repaired"
    other = add_lora(make_model())  # the same repair without the control: the control left no trace
    run_guard(other, make_tokenizer(), RealignConfig(ratio=0.05, score="wanda", targets=("adapter-a",)),
              GuardConfig(), PAIRS, _probe())
    reference = dict(other.named_parameters())
    assert all(torch.equal(p, reference[n]) for n, p in model.named_parameters())
