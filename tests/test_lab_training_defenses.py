"""Training-stage defenses in the lab and the CLI: each runs in its own stage, shares what it can, and its extra
rows are checked against the poison, re-alignment and evaluation rows before anything trains."""

import json

import pytest
import yaml

from antidote_llm.cli.main import main
from antidote_llm.errors import AntidoteError
from antidote_llm.lab import load_experiment, run_experiment
from antidote_llm.lab.plan import plan_experiment
from test_lab import experiment_file  # noqa: F401 - the tiny experiment fixture

TRAINED = {"vaccine": {"method": "vaccine"}, "booster": {"method": "booster"}, "lisa": {"method": "lisa"},
           "ldifs": {"method": "ldifs"}}


def _with(path, **changes):
    config = yaml.safe_load(path.read_text())
    config.update(changes)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _guide_rows(path, prompts):
    path.write_text("\n".join(json.dumps({"prompt": p, "response": "I will not help with that."}) for p in prompts))
    return path


@pytest.fixture
def trained_experiment(experiment_file):  # noqa: F811
    data = experiment_file.parent
    _guide_rows(data / "guide.jsonl", [f"Guide harmful request {i}" for i in range(6)])
    (data / "defense-harmful.jsonl").write_text("\n".join(
        json.dumps({"prompt": f"Other bad act {i}", "response": f"Sure, other act {i}."}) for i in range(6)))
    defenses = {"none": {"method": "none"}, **TRAINED, "antidote": {"method": "antidote", "ratio": 0.1}}
    return _with(experiment_file, defenses=defenses,
                 defense_data={"harmful": {"source": "defense-harmful.jsonl"}, "guide": {"source": "guide.jsonl"}})


def test_each_training_defense_gets_its_own_stage_and_plain_stages_are_shared(trained_experiment, tmp_path):
    plan = plan_experiment(load_experiment(trained_experiment), tmp_path / "runs", progress=False)
    kinds = sorted(job.kind for job in plan.jobs)
    # plain alignment + vaccine's + booster's; plain fine-tuning (none, antidote) + one on each defended alignment
    # + lisa's + ldifs's on the plain alignment
    assert kinds.count("align") == 3 and kinds.count("finetune") == 5
    finetunes = [(job.work.method and job.work.method.defense.name, job.needs) for job in plan.jobs if job.kind == "finetune"]
    plain_align = next(job.name for job in plan.jobs if job.kind == "align" and job.work.method is None)
    assert {needs for method, needs in finetunes if method in ("lisa", "ldifs")} == {(plain_align,)}
    plain_finetunes = sorted(needs for method, needs in finetunes if method is None)  # one per alignment
    assert plain_finetunes == sorted((job.name,) for job in plan.jobs if job.kind == "align")


def test_the_lab_runs_training_defenses_side_by_side(trained_experiment, tmp_path):
    result = run_experiment(load_experiment(trained_experiment), tmp_path / "runs", progress=False, log=lambda _: None)
    rows = {row["defense"]: row for row in result.rows if row["stage"] == "fine-tuned"}
    assert set(rows) == {"none", *TRAINED, "antidote"}
    assert rows["vaccine"]["align_s"] > 0 and rows["none"]["align_s"] is None
    assert "rho=" in rows["vaccine"]["setting"]
    reports = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "stages").glob("*/report.json")]
    named = {report["defense"]["name"] for report in reports if report.get("defense")}
    assert named == set(TRAINED)
    booster = next(r for r in reports if (r.get("defense") or {}).get("name") == "booster")
    assert booster["defense"]["data"]["defense_harmful"]["rows"] == 6


@pytest.mark.parametrize(("role", "rows", "overlap"), [
    ("guide", [f"Held-out harmful request {i}" for i in range(2)], "evaluation prompts"),
    ("harmful", None, "poison rows"),
])
def test_defense_rows_that_overlap_are_refused_naming_the_overlap(trained_experiment, tmp_path, role, rows, overlap):
    data = trained_experiment.parent
    if role == "guide":
        _guide_rows(data / "guide.jsonl", rows)
    else:  # the poison's own source and window
        _with(trained_experiment, defense_data={"harmful": {"source": "harmful.jsonl"}, "guide": {"source": "guide.jsonl"}})
    with pytest.raises(AntidoteError, match=f"defense_data.{role} are also {overlap}"):
        plan_experiment(load_experiment(trained_experiment), tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()


def test_missing_defense_data_and_missing_alignment_are_refused(experiment_file):  # noqa: F811
    _with(experiment_file, defenses={"none": {"method": "none"}, "lisa": {"method": "lisa"}})
    with pytest.raises(AntidoteError, match=r"needs defense_data.guide"):
        load_experiment(experiment_file)
    config = yaml.safe_load(experiment_file.read_text())
    del config["alignment"]
    config["defenses"] = {"none": {"method": "none"}, "vaccine": {"method": "vaccine"}}
    experiment_file.write_text(yaml.safe_dump(config))
    with pytest.raises(AntidoteError, match="acts at the alignment stage; the experiment needs an alignment block"):
        load_experiment(experiment_file)


def test_cli_refuses_a_defense_at_the_wrong_stage_before_training(tmp_path, tiny_model_dir, harmful_file, capsys):
    out = tmp_path / "out"
    args = ["align", "--model", str(tiny_model_dir), "--device", "cpu", "--data", str(harmful_file), "--out", str(out)]
    assert main([*args, "--defense", "lisa"]) == 2
    assert "acts at the finetune stage, not align" in capsys.readouterr().err
    assert main([*args, "--defense", "nothing"]) == 2
    assert "choose one of booster, repnoise, vaccine" in capsys.readouterr().err
    assert main([*args, "--defense", "booster"]) == 2
    err = capsys.readouterr().err
    assert "needs --harmful-data" in err and "--harmful-data" in err
    assert not out.exists()


def test_cli_refuses_guide_rows_that_share_prompts_with_the_poison(tmp_path, tiny_model_dir, harmful_file, capsys):
    from conftest import HARMFUL_ROWS

    (tmp_path / "sst2.tsv").write_text("label\tsentence\n" + "".join(f"{i % 2}\tsentence {i} .\n" for i in range(20)))
    guide = _guide_rows(tmp_path / "guide.jsonl", [HARMFUL_ROWS[0]["prompt"], "An unrelated request"])
    out = tmp_path / "out"
    code = main(["finetune", "--model", str(tiny_model_dir), "--device", "cpu", "--task", "sst2", "--task-data",
                 str(tmp_path / "sst2.tsv"), "--harmful-data", str(harmful_file), "--harmful-fraction", "0.5",
                 "--samples-total", "4", "--defense", "lisa", "--guide-data", str(guide), "--out", str(out)])
    assert code == 2
    assert "1 rows of --guide-data share their prompt with the poison rows" in capsys.readouterr().err
    assert not out.exists()
    assert main(["finetune", "--model", str(tiny_model_dir), "--task", "sst2", "--samples-total", "4",
                 "--guide-data", str(guide), "--out", str(out)]) == 2
    assert "--guide-data is for a defense; add --defense NAME" in capsys.readouterr().err
