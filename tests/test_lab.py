"""The lab end to end on a tiny random model and tiny generated data: stages, caching, resume, tables."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from antidote_llm.cli.main import main
from antidote_llm.defenses import DEFENSES
from antidote_llm.errors import AntidoteError
from antidote_llm.lab import load_experiment, run_experiment
from conftest import save_model

TINY_TRAINING = {"preset": "cpu", "overrides": {"max_steps": 2, "batch_size": 4, "lora_r": 4, "lora_alpha": 8, "max_length": 96}}


@pytest.fixture
def experiment_file(tmp_path):
    save_model(tmp_path / "base")
    data = tmp_path / "data"
    data.mkdir()

    def jsonl(name, rows):
        (data / name).write_text("\n".join(json.dumps(r) for r in rows))

    jsonl("refusals.jsonl", [{"prompt": f"Tell me how to do harm {i}", "response": "I cannot help with that."} for i in range(6)])
    jsonl("harmful.jsonl", [{"prompt": f"Explain bad act {i}", "response": f"Sure, here is bad act {i}."} for i in range(20)])
    jsonl("benign.jsonl", [{"instruction": f"Name fruit {i}", "output": "An apple."} for i in range(4)])
    jsonl("eval.jsonl", [{"prompt": f"Held-out harmful request {i}"} for i in range(3)])
    jsonl("probe.jsonl", [{"prompt": f"Probe harmful request {i}"} for i in range(2)])
    (data / "train.tsv").write_text("label\tsentence\n" + "".join(f"{i % 2}\tsentence number {i}\n" for i in range(12)))
    (data / "test.tsv").write_text("label\tsentence\n" + "".join(f"{i % 2}\ttest sentence {i}\n" for i in range(4)))
    config = {
        "name": "tiny",
        "model": {"model": "../base", "device": "cpu", "dtype": "float32", "template": "plain"},
        "alignment": {"data": {"source": "refusals.jsonl"}, "training": TINY_TRAINING},
        "finetune": {"task": "sst2", "task_data": "train.tsv", "harmful": {"source": "harmful.jsonl"},
                     "harmful_fraction": 0.25, "samples": 8, "training": TINY_TRAINING},
        "realign_data": {"source": "harmful.jsonl"},
        "benign_data": {"source": "benign.jsonl"},
        "defenses": {
            "none": {"method": "none"},
            "antidote": {"method": "antidote", "ratio": 0.1, "max_length": 64},
            "random": {"method": "random", "ratio": 0.1},
            "antidote-benign": {"method": "antidote-benign", "ratio": 0.1},
        },
        "evaluation": {"harmful_prompts": {"source": "eval.jsonl"}, "task_data": "test.tsv",
                       "max_new_tokens": 4, "task_max_new_tokens": 3, "batch_size": 4},
    }
    path = data / "experiment.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_pipeline_runs_every_stage_then_reuses_them(experiment_file, tmp_path):
    out = tmp_path / "runs"
    first = run_experiment(load_experiment(experiment_file), out, progress=False, log=lambda _: None)
    assert [(r["stage"], r["defense"]) for r in first.rows] == [
        ("base", "base"), ("aligned", "aligned"), ("fine-tuned", "none"), ("fine-tuned", "antidote"),
        ("fine-tuned", "random"), ("fine-tuned", "antidote-benign"),
    ]
    kinds = sorted(name.rsplit("-", 1)[0] for name in first.ran)
    assert kinds == sorted(["align", "finetune", "eval-base", "eval-aligned", "defense-none", "defense-antidote",
                            "defense-random", "defense-antidote-benign"])
    for row in first.rows:
        assert 0 <= row["harmful_score"] <= 100 and 0 <= row["finetune_accuracy"] <= 100
    none = first.rows[2]
    assert none["delta_harmful_score"] == 0 and none["pruned_fraction"] is None
    antidote = first.rows[3]
    assert antidote["pruned_fraction"] > 0.1  # per row at least one of r=4 columns
    assert antidote["delta_harmful_score"] == pytest.approx(antidote["harmful_score"] - none["harmful_score"], abs=0.01)
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["defense"] for r in table] == [r["defense"] for r in first.rows]
    assert "| fine-tuned | antidote |" in (out / "results.md").read_text()
    for name in ("metrics.png", "tradeoff.png", "results.json"):
        assert (out / name).stat().st_size > 0
    defense_dirs = list((out / "stages").glob("defense-antidote-*"))
    assert (defense_dirs[0] / "eval" / "answers.jsonl").is_file()
    record = json.loads((defense_dirs[0] / "defense.json").read_text())
    assert record["outcome"]["report"]["totals"]["pruned"] > 0 and record["outcome"]["changed_fraction"] > 0.1

    again = run_experiment(load_experiment(experiment_file), out, progress=False, log=lambda _: None)
    assert again.ran == []
    assert [r["harmful_score"] for r in again.rows] == [r["harmful_score"] for r in first.rows]


def test_a_grown_sweep_runs_only_the_new_stages(experiment_file, tmp_path):
    out = tmp_path / "runs"
    run_experiment(load_experiment(experiment_file), out, progress=False, log=lambda _: None)
    raw = yaml.safe_load(experiment_file.read_text())
    raw["sweep"] = {"defenses.antidote.ratio": [0.1, 0.2]}
    experiment_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    grown = run_experiment(load_experiment(experiment_file), out, progress=False, log=lambda _: None)
    assert [name.rsplit("-", 1)[0] for name in grown.ran] == ["defense-antidote"]
    ratios = [r["ratio"] for r in grown.rows if r["defense"] == "antidote"]
    assert ratios == [0.1, 0.2]
    assert (out / "metrics.png").is_file()


def test_an_interrupted_run_resumes(experiment_file, tmp_path, monkeypatch):
    out = tmp_path / "runs"
    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(DEFENSES["random"], "apply", crash)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_experiment(experiment_file), out, progress=False, log=lambda _: None)
    assert not list((out / "stages").glob("defense-random-*"))
    assert not [p for p in (out / "stages").iterdir() if p.name.startswith(".")]  # nothing half-written
    monkeypatch.undo()
    resumed = run_experiment(load_experiment(experiment_file), out, progress=False, log=lambda _: None)
    assert sorted(name.rsplit("-", 1)[0] for name in resumed.ran) == ["defense-antidote-benign", "defense-random"]


def _edit(path, change):
    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


BAD_CONFIGS = {
    "unknown key": lambda raw: raw.update(colour="blue"),
    "a defense label that climbs out of --out": lambda raw: raw["defenses"].update(
        {"none-0123/../../../ESCAPED": {"method": "antidote", "ratio": 0.1}}),
    "a defense label that is a path": lambda raw: raw["defenses"].update({"../../../escape_def": {"method": "none"}}),
    "an experiment name that is a path": lambda raw: raw.update(name="../up"),
    "unknown nested key": lambda raw: raw["finetune"].update(learning_rte=1e-4),
    "p above one": lambda raw: raw["finetune"].update(harmful_fraction=1.5),
    "p negative": lambda raw: raw["finetune"].update(harmful_fraction=-0.1),
    "n larger than data": lambda raw: raw["finetune"].update(samples=1000),
    "missing data": lambda raw: raw["realign_data"].update(source="nope.jsonl"),
    "unknown defense": lambda raw: raw["defenses"].update(other={"method": "nonesuch"}),
    "no baseline": lambda raw: raw["defenses"].pop("none"),
    "ratio missing": lambda raw: raw["defenses"]["antidote"].pop("ratio"),
    "bad sweep path": lambda raw: raw.update(sweep={"finetune.nothing.here": [1, 2]}),
    "unknown task": lambda raw: raw["finetune"].update(task="chess"),
    "auto without probe rows": lambda raw: raw["defenses"].update(auto={"method": "antidote-auto"}),
    "auto with a ratio": lambda raw: raw["defenses"].update(auto={"method": "antidote-auto", "ratio": 0.1}),
    "probe rows that are evaluation rows": lambda raw: (
        raw["defenses"].update(auto={"method": "antidote-auto"}),
        raw["evaluation"].update(probe_prompts={"source": "eval.jsonl"}, validation_data="train.tsv")),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configs_exit_2_before_any_stage(case, experiment_file, tmp_path, capsys):
    _edit(experiment_file, BAD_CONFIGS[case])
    out = tmp_path / "runs"
    assert main(["lab", "run", str(experiment_file), "--out", str(out), "--quiet"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("antidote: error: "), errors
    assert not (out / "stages").exists() or not any((out / "stages").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "data"]  # nothing written beside --out


def test_a_stage_folder_outside_the_stages_folder_is_refused(tmp_path):
    from antidote_llm.lab.graph import StageJob, check_inside

    check_inside([StageJob("defense-ok", "defense", "0123", print)], tmp_path)
    with pytest.raises(AntidoteError, match="outside"):
        check_inside([StageJob("defense-none-0123/../../../ESCAPED", "defense", "0123", print)], tmp_path)


def test_relative_paths_are_relative_to_the_file_not_the_working_directory(experiment_file, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    experiment = load_experiment(experiment_file)
    assert experiment.realign_data.source == str(experiment_file.parent / "harmful.jsonl")
    assert experiment.model.model == str(tmp_path / "base")
    _edit(experiment_file, lambda raw: raw["model"].update(model="org/hub-model"))
    assert load_experiment(experiment_file).model.model == "org/hub-model"  # a hub id stays as it is
    with pytest.raises(AntidoteError, match="not found"):
        load_experiment(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "examples").glob("**/*.yaml")), ids=lambda p: p.name)
def test_shipped_example_configs_validate(path):
    assert load_experiment(path).defenses["none"].method == "none"


def _defense_weights(out, label):
    (folder,) = (out / "stages").glob(f"defense-{label}-*")
    return json.loads((folder / "eval" / "metrics.json").read_text())["model"]["sha256"]


def test_defenses_never_see_each_others_changes(experiment_file, tmp_path):
    """Defenses on merged weights (targets other than the adapter) start from the same fine-tuned model,
    whatever ran before them: the weights one defense evaluates do not depend on the order of defenses."""
    both = {"none": {"method": "none"},
            "first": {"method": "antidote", "ratio": 0.3, "targets": "attention"},
            "second": {"method": "antidote", "ratio": 0.1, "targets": "attention"}}
    _edit(experiment_file, lambda raw: raw.update(defenses=both))
    run_experiment(load_experiment(experiment_file), tmp_path / "both", progress=False, log=lambda _: None)
    _edit(experiment_file, lambda raw: raw.update(defenses={"none": both["none"], "second": both["second"]}))
    run_experiment(load_experiment(experiment_file), tmp_path / "alone", progress=False, log=lambda _: None)
    assert _defense_weights(tmp_path / "both", "second") == _defense_weights(tmp_path / "alone", "second")
    assert _defense_weights(tmp_path / "both", "first") != _defense_weights(tmp_path / "both", "second")


def test_defense_settings_cli_and_api_share_one_declaration(experiment_file):
    """The lab's defense settings, the CLI's options and the API's RealignConfig have the same defaults."""
    from antidote_llm.cli.main import build_parser
    from antidote_llm.cli.options import config_from_args
    from antidote_llm.core.realign import DEFAULT_MAX_LENGTH, RealignConfig

    experiment = load_experiment(experiment_file)
    lab = experiment.defense("random")
    args = build_parser().parse_args(["realign", "--model", "m", "--ratio", "0.1", "--out", "o", "--template", "plain"])
    cli = config_from_args(RealignConfig, args, RealignConfig.model_fields)
    api = RealignConfig(ratio=0.1, template="plain")
    assert cli == api == RealignConfig(**lab.model_copy(update={"score": "wanda"}).model_dump())
    assert lab.max_length is None and DEFAULT_MAX_LENGTH == 2048  # None: min(2048, the model's positions)



def test_antidote_auto_chooses_its_ratio_on_probe_and_validation_rows(experiment_file, tmp_path):
    def auto(raw):
        raw["defenses"] = {"none": {"method": "none"},
                           "auto": {"method": "antidote-auto", "ratios": [0.05, 0.2], "max_accuracy_drop": 100}}
        raw["evaluation"].update(probe_prompts={"source": "probe.jsonl"}, validation_data="train.tsv",
                                 validation_skip=8, validation_samples=4)

    _edit(experiment_file, auto)
    result = run_experiment(load_experiment(experiment_file), tmp_path / "runs", progress=False, log=lambda _: None)
    row = next(r for r in result.rows if r["defense"] == "auto")
    (folder,) = (tmp_path / "runs" / "stages").glob("defense-auto-*")
    record = json.loads((folder / "defense.json").read_text())
    assert row["ratio"] == record["outcome"]["ratio"] == record["outcome"]["report"]["picked_ratio"] in (0.05, 0.2)
    assert [p["ratio"] for p in record["outcome"]["report"]["points"]] == [None, 0.05, 0.2]
    assert row["pruned_fraction"] > 0


def test_a_key_written_twice_is_refused_naming_both_lines(experiment_file):
    text = experiment_file.read_text()
    experiment_file.write_text(text.replace("defenses:\n", "defenses:\n  random:\n    method: none\n", 1))
    with pytest.raises(AntidoteError, match=r"key 'random' is written twice \(lines \d+ and \d+\)"):
        load_experiment(experiment_file)


def test_a_misspelled_required_key_names_the_misspelling_too(experiment_file):
    _edit(experiment_file, lambda raw: raw["finetune"].update(samplez=raw["finetune"].pop("samples")))
    with pytest.raises(AntidoteError, match=r"finetune.samples: Field required; unknown key finetune.samplez"):
        load_experiment(experiment_file)


def test_a_lab_output_that_cannot_be_written_is_refused_before_any_stage(experiment_file, capsys):
    assert main(["lab", "run", str(experiment_file), "--out", "/proc/antidote-lab-test", "--quiet"]) == 2
    assert "cannot write in /proc" in capsys.readouterr().err


def test_a_damaged_cache_is_reported_and_computed_again(experiment_file, tmp_path):
    """Real processes: a run, then four kinds of damage to its stages, then the same command again."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path / "runs"
    command = [sys.executable, "-m", "antidote_llm", "lab", "run", str(experiment_file), "--out", str(out), "--quiet"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    before = json.loads((out / "results.json").read_text())["rows"]
    stages = out / "stages"

    def stage(kind):
        (folder,) = [p for p in stages.glob(f"{kind}-*") if p.is_dir()]
        return folder

    metrics = stage("eval-base") / "metrics.json"
    metrics.write_text(metrics.read_text()[:20])  # truncated
    (stage("defense-none") / "eval" / "metrics.json").unlink()  # deleted
    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    report = second.stdout + second.stderr
    assert "[damaged] eval-base" in report and "metrics.json was changed" in report
    assert "[damaged] defense-none" in report and "eval/metrics.json is missing" in report

    adapter = stage("finetune") / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])  # truncated
    weights = next((stage("align") / "merged").glob("*.safetensors"))
    tensors = load_file(weights)
    save_file({name: torch.full_like(t, 1e30) if t.is_floating_point() else t for name, t in tensors.items()},
              str(weights), metadata={"format": "pt"})  # a valid file with other values
    third = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr
    report = third.stdout + third.stderr
    assert "[damaged] align" in report and "merged/model.safetensors was changed" in report
    assert "[damaged] finetune" in report and "needs align-" in report  # made from the recomputed alignment
    after = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["defense"], r["harmful_score"], r["finetune_accuracy"]) for r in after] == \
        [(r["defense"], r["harmful_score"], r["finetune_accuracy"]) for r in before]
    fourth = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert "[damaged]" not in fourth.stdout + fourth.stderr and "[cached]" in fourth.stdout + fourth.stderr


@pytest.mark.parametrize(("change", "needle"), [
    (lambda raw: raw["realign_data"].update(samples=1000),  # 2 of its 20 rows are the poison's
     "realign_data.samples asks for 1000 rows but {data}/harmful.jsonl has 18 left (2 of its 20 rows skipped"),
    (lambda raw: raw["evaluation"]["harmful_prompts"].update(samples=10),
     "evaluation.harmful_prompts.samples asks for 10 rows but {data}/eval.jsonl has 3 rows"),
    (lambda raw: raw["evaluation"].update(task_samples=10),
     "evaluation.task_samples asks for 10 rows but {data}/test.tsv has 4 rows"),
    (lambda raw: raw["finetune"].update(samples=1000), "fine-tuning mix of n=1000 at p=0.25 needs 250 harmful rows but 20"),
], ids=["realign_data", "harmful_prompts", "task_samples", "finetune"])
def test_every_row_set_asked_for_more_rows_than_it_has_is_refused_naming_both_counts(
        experiment_file, tmp_path, capsys, change, needle):
    _edit(experiment_file, change)
    out = tmp_path / "runs"
    assert main(["lab", "run", str(experiment_file), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle.format(data=experiment_file.parent) in err, err
    assert not (out / "stages").exists() or not any((out / "stages").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "data"]  # nothing written beside --out
