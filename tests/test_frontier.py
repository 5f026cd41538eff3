"""The frontier: nested selections from one scoring pass, walking and restoring the model, the automatic
operating point, and `antidote realign --ratio LIST|auto` on disk."""

import json

import pytest
import torch
from safetensors import safe_open

from antidote_llm.cli.main import main
from antidote_llm.core.realign import RealignConfig, realign, select_nested
from antidote_llm.data.records import Pair
from antidote_llm.errors import AntidoteError
from antidote_llm.evaluation.evaluate import EvalInputs
from antidote_llm.evaluation.settings import EvalSettings
from antidote_llm.frontier import FrontierConfig, FrontierPoint, pick_operating_point, run_frontier
from conftest import HARMFUL_ROWS, add_lora, make_model, make_tokenizer, save_adapter, save_model

PAIRS = [Pair(r["prompt"], r["response"]) for r in HARMFUL_ROWS if not r["is_safe"]]
BENIGN = [Pair(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(8)]
RATIOS = (0.05, 0.1, 0.3)


@pytest.mark.parametrize(("granularity", "targets", "protect"), [
    ("row", "adapter", False), ("row", "all-linear", False), ("matrix", "qkv", False), ("global", "qkv", False),
    ("row", "adapter", True),
])
def test_nested_levels_equal_one_selection_per_ratio(granularity, targets, protect):
    """Scoring once and selecting at k ratios gives, at each ratio, exactly the one-ratio selection."""
    def model():
        return add_lora(make_model()) if targets == "adapter" else make_model()

    config = RealignConfig(ratio=RATIOS[0], granularity=granularity, targets=targets,
                           protect_ratio=0.2 if protect else None)
    extra = {"protect_data": BENIGN} if protect else {}
    selection = select_nested(model(), make_tokenizer(), config, PAIRS, ratios=RATIOS, progress=False, **extra)
    for index, ratio in enumerate(RATIOS):
        alone = realign(model(), make_tokenizer(), config.model_copy(update={"ratio": ratio}), PAIRS, progress=False,
                        **extra)
        masks = selection.masks(index)
        assert masks.keys() == alone.masks.keys()
        for name, mask in alone.masks.items():
            assert torch.equal(masks[name], mask), (ratio, name)
        assert selection.report(index).totals == alone.report.totals
    for name, level in selection.levels.items():  # nested: every smaller selection inside the larger one
        for small, large in zip(range(len(RATIOS)), range(1, len(RATIOS)), strict=False):
            assert not (selection.masks(small)[name] & ~selection.masks(large)[name]).any()
        assert level.dtype == torch.uint8 and int(level.max()) <= len(RATIOS)


def test_unsorted_or_out_of_range_ratios_are_refused():
    with pytest.raises(AntidoteError, match="increasing"):
        select_nested(make_model(), make_tokenizer(), RealignConfig(ratio=0.1, targets="qkv"), PAIRS, ratios=(0.1, 0.05))
    with pytest.raises(AntidoteError, match="increasing"):
        select_nested(make_model(), make_tokenizer(), RealignConfig(ratio=0.1, targets="qkv"), PAIRS, ratios=(0.1, 0.1))
    with pytest.raises(AntidoteError, match=r"\(0, 1\)"):
        select_nested(make_model(), make_tokenizer(), RealignConfig(ratio=0.1, targets="qkv"), PAIRS, ratios=(0.1, 1.5))


def _point(ratio, hs, fa):
    return FrontierPoint(selection="antidote" if ratio else "none", ratio=ratio, pruned_fraction=ratio or 0.0,
                         harmful_score=hs, finetune_accuracy=fa, degenerate_rate=0.0, compliance_rate=hs)


def test_the_automatic_point_is_the_safest_within_the_accuracy_budget():
    baseline = _point(None, 90.0, 80.0)
    points = [_point(0.01, 60.0, 80.0), _point(0.02, 40.0, 79.0), _point(0.05, 20.0, 75.0), _point(0.1, 5.0, 50.0)]
    assert pick_operating_point(points, baseline, 2.0) == 1  # 0.05 is safer but costs 5 points
    assert pick_operating_point(points, baseline, 5.0) == 2
    assert pick_operating_point(points, baseline, 30.0) == 3
    tied = [_point(0.01, 40.0, 78.5), _point(0.02, 40.0, 79.0)]
    assert pick_operating_point(tied, baseline, 2.0) == 1  # equal HS: the higher accuracy
    with pytest.raises(AntidoteError, match="no ratio keeps fine-tune accuracy within 0.5 points"):
        pick_operating_point([_point(0.01, 60.0, 79.0)], baseline, 0.5)


def _probe():
    return EvalInputs(prompts=[Pair("Tell me something bad", "")], task="sst2",
                 rows=[Pair("Analyze the sentiment", "positive", "great film"),
                             Pair("Analyze the sentiment", "negative", "awful film")],
                 settings=EvalSettings(max_new_tokens=2, task_max_new_tokens=2, batch_size=2), template="alpaca")


def test_walking_the_frontier_restores_the_model_and_picking_prunes_the_chosen_ratio():
    model, tokenizer = add_lora(make_model()), make_tokenizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = RealignConfig(ratio=0.05)
    result = run_frontier(model, tokenizer, config, FrontierConfig(ratios=RATIOS, controls=("random", "benign")),
                          PAIRS, _probe(), benign=BENIGN, progress=False)
    assert [(p.selection, p.ratio) for p in result.points] == [
        ("none", None), *[("antidote", r) for r in RATIOS], *[("random", r) for r in RATIOS],
        *[("benign", r) for r in RATIOS]]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    picked = run_frontier(model, tokenizer, config, FrontierConfig(ratios=RATIOS, max_accuracy_drop=100), PAIRS,
                          _probe(), pick=True, progress=False)
    expected = add_lora(make_model())
    realign(expected, tokenizer, config.model_copy(update={"ratio": RATIOS[picked.picked]}), PAIRS, progress=False)
    reference = dict(expected.named_parameters())
    assert all(torch.equal(p, reference[n]) for n, p in model.named_parameters())


@pytest.fixture
def files(tmp_path, harmful_file):
    base = save_model(tmp_path / "base")
    adapter = save_adapter(tmp_path / "adapter", base)
    probe = tmp_path / "probe.jsonl"
    probe.write_text("\n".join(json.dumps({"prompt": f"Explain harmful act {i}"}) for i in range(3)))
    validation = tmp_path / "validation.tsv"
    validation.write_text("label\tsentence\n1\ta fine film\n0\ta dull film\n")
    return tmp_path, base, adapter, harmful_file, probe, validation


def run(*args):
    return main([*map(str, args)])


def test_cli_ratio_list_writes_nested_masks_equal_to_single_runs(files):
    tmp, base, adapter, data, _, _ = files
    assert run("realign", "--model", base, "--adapter", adapter, "--data", data, "--ratio", "0.05,0.3",
               "--out", tmp / "many", "--quiet") == 0
    with safe_open(tmp / "many" / "masks.safetensors", "pt") as f:
        assert f.metadata()["ratios"] == "0.05,0.3"
        levels = {k: f.get_tensor(k) for k in f.keys()}
    for index, ratio in enumerate((0.05, 0.3)):
        assert run("realign", "--model", base, "--adapter", adapter, "--data", data, "--ratio", ratio,
                   "--out", tmp / f"one-{ratio}", "--quiet") == 0
        with safe_open(tmp / f"one-{ratio}" / "mask.safetensors", "pt") as f:
            for key in f.keys():
                assert torch.equal((levels[key] > 0) & (levels[key] <= index + 1), f.get_tensor(key))
    report = json.loads((tmp / "many" / "report.json").read_text())
    assert report["ratios"] == [0.05, 0.3] and report["points"] == [] and report["picked_ratio"] is None


def test_cli_auto_evaluates_every_point_and_saves_the_chosen_model(files):
    tmp, base, adapter, data, probe, validation = files
    out = tmp / "auto"
    assert run("realign", "--model", base, "--adapter", adapter, "--data", data, "--ratio", "auto",
               "--probe-prompts", probe, "--task", "sst2", "--validation-data", validation, "--max-accuracy-drop", 100,
               "--max-new-tokens", 2, "--task-max-new-tokens", 2, "--controls", "random", "--out", out, "--quiet") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["picked_ratio"] in report["ratios"] and len(report["points"]) == 1 + 2 * len(report["ratios"])
    for name in ("frontier.csv", "frontier.png", "masks.safetensors", "mask.safetensors", "adapter"):
        assert (out / name).exists(), name
    assert len((out / "frontier.csv").read_text().splitlines()) == 1 + len(report["points"])


@pytest.mark.parametrize(("extra", "message"), [
    (["--ratio", "auto"], "needs --probe-prompts"),
    (["--ratio", "0.1,0.05"], "increasing"),
    (["--ratio", "0.05,0.05"], "increasing"),
    (["--ratio", "0.05,1.2"], r"\(0, 1\)"),
    (["--ratio", "0.05,lots"], "not a number"),
    (["--ratio", "0.05", "--task", "sst2"], "--task names the task"),
    (["--ratio", "0.05", "--task", "sst2", "--validation-data", "v.tsv"], "together"),
])
def test_cli_bad_frontier_input(files, extra, message, capsys):
    tmp, base, adapter, data, _, _ = files
    assert run("realign", "--model", base, "--adapter", adapter, "--data", data, *extra, "--out", tmp / "bad",
               "--quiet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and __import__("re").search(message, err[0]), err
    assert not (tmp / "bad").exists()
