"""Restore with rollback (issue 19): groups of the selection tried in score order, a group rolled back when the
validation accuracy falls past the tolerance; nested results; the model left as it was; its inputs refused."""

import json

import pytest
import torch

import antidote_llm.frontier.rollback as rollback_module
from antidote_llm.core.realign import RealignConfig, select_nested
from antidote_llm.frontier.rollback import RollbackConfig, group_ratios, kept_levels, select_with_rollback
from conftest import add_lora, make_model, make_tokenizer
from test_frontier import PAIRS, _probe, files, run  # noqa: F401 - a fixture


def test_each_ratio_step_is_cut_into_equal_groups():
    assert group_ratios((0.1, 0.3), 2) == pytest.approx((0.05, 0.1, 0.2, 0.3))
    assert group_ratios((0.1,), 1) == (0.1,)


def test_kept_levels_map_groups_to_their_ratio_without_the_rolled_back_ones():
    levels = torch.tensor([0, 1, 2, 3, 4], dtype=torch.uint8)
    assert kept_levels(levels, set(), 2).tolist() == [0, 1, 1, 2, 2]
    assert kept_levels(levels, {2, 3}, 2).tolist() == [0, 1, 0, 0, 2]


def test_a_group_costing_more_than_the_tolerance_is_rolled_back_and_the_model_left_as_it_was(monkeypatch):
    """Scripted accuracies: before 80, then one per group in order; the tolerance is 2 points."""
    accuracies = iter([80.0, 79.5, 70.0, 78.5, 77.0])
    monkeypatch.setattr(rollback_module, "_accuracy", lambda model, tokenizer, validation: next(accuracies))
    model, tokenizer = add_lora(make_model()), make_tokenizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = RealignConfig(ratio=0.1)
    selection = select_with_rollback(model, tokenizer, config, PAIRS, _probe(), RollbackConfig(tolerance=2, groups=2),
                                     ratios=(0.1, 0.3))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    record = selection.method.model_extra["rollback"]
    assert [g["kept"] for g in record["groups_tried"]] == [True, False, True, False]
    fine = select_nested(add_lora(make_model()), tokenizer, config, PAIRS, ratios=group_ratios((0.1, 0.3), 2),
                         progress=False)
    for name, level in fine.levels.items():  # groups 1 and 3 kept: group 1 at the first ratio, 1 and 3 at the second
        assert torch.equal(selection.masks(0)[name], level == 1)
        assert torch.equal(selection.masks(1)[name], (level == 1) | (level == 3))
    assert selection.report(1).totals.pruned == sum(int(((lv == 1) | (lv == 3)).sum()) for lv in fine.levels.values())


def test_cli_rollback_frontier_reports_the_groups(files):  # noqa: F811
    tmp, base, adapter, data, probe, validation = files
    out = tmp / "rolled"
    assert run("realign", "--model", base, "--adapter", adapter, "--data", data, "--ratio", "0.05,0.2",
               "--probe-prompts", probe, "--task", "sst2", "--validation-data", validation,
               "--rollback-tolerance", 100, "--rollback-groups", 2, "--rollback-data", validation,
               "--max-new-tokens", 2, "--task-max-new-tokens", 2, "--out", out, "--quiet") == 0
    report = json.loads((out / "report.json").read_text())
    rolled = report["selections"][1]["method"]["rollback"]
    assert rolled["tolerance"] == 100 and len(rolled["groups_tried"]) == 4 and all(g["kept"] for g in rolled["groups_tried"])


@pytest.mark.parametrize(("extra", "message"), [
    (["--rollback-tolerance", "1", "--probe-prompts", "P", "--task", "sst2", "--validation-data", "V"],
     "give --rollback-data and --task"),
    (["--rollback-data", "V"], "--rollback-data is read by --rollback-tolerance only"),
    (["--rollback-tolerance", "1", "--rollback-data", "V", "--task", "sst2", "--ratio", "0.05"],
     "rolls back groups of an evaluated frontier"),
])
def test_cli_rollback_without_its_rows_is_one_line_and_writes_nothing(files, extra, message, capsys):  # noqa: F811
    tmp, base, adapter, data, probe, validation = files
    extra = [{"V": str(validation), "P": str(probe)}.get(a, a) for a in extra]
    ratio = [] if "--ratio" in extra else ["--ratio", "0.05,0.1"]
    assert run("realign", "--model", base, "--adapter", adapter, "--data", data, *ratio, *extra,
               "--out", tmp / "bad", "--quiet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp / "bad").exists()
