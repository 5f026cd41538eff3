"""Experiment tracking: the training stages take `report_to` as any Trainer run does; TensorBoard's events land in
the stage's own folder (tensorboard/), never in the Trainer's scratch folder."""

from __future__ import annotations

import json

import pytest

from antidote_llm import training
from antidote_llm.cli import main as cli
from antidote_llm.errors import AntidoteError
from antidote_llm.training.config import report_to, tracker_names
from conftest import make_model, make_tokenizer
from test_training import FAST, MEMO, tiny_config


def _scalars(folder) -> dict[str, list[float]]:
    """The scalars of the one events file under `folder`, by tag (read with TensorBoard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = list(folder.rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return {tag: [event.value for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_report_to_names_are_checked():
    assert tracker_names("none") == () == tracker_names(None) == tracker_names([])
    with pytest.raises(ValueError, match="unknown report_to 'tensorbord'; choose none or some of .*tensorboard"):
        tracker_names("tensorbord")
    with pytest.raises(AntidoteError) as error:
        report_to("none,wandb,tensorbord")
    assert "\n" not in str(error.value)


def test_a_tracker_whose_package_is_missing_is_named_with_its_extra(monkeypatch):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations", lambda: [])
    with pytest.raises(AntidoteError, match=r"report_to tensorboard needs its package.*antidote-llm\[tensorboard\]"):
        report_to("tensorboard")


def test_a_training_run_reporting_to_tensorboard_writes_the_loss_curve_into_its_folder(tmp_path):
    pytest.importorskip("tensorboard")
    assert tracker_names("tensorboard") == ("tensorboard",)
    result = training.align(make_model(), make_tokenizer(), MEMO, tiny_config(max_steps=3, logging_steps=1),
                            tmp_path / "align", progress=False, report_to=("tensorboard",))
    assert result.report.outputs["tensorboard"] == "tensorboard"
    scalars = _scalars(tmp_path / "align" / "tensorboard")
    losses = [entry["loss"] for entry in result.report.train.loss_history]
    assert scalars["train/loss"] == pytest.approx(losses) and len(losses) == 3
    plain = training.align(make_model(), make_tokenizer(), MEMO, tiny_config(max_steps=1), tmp_path / "plain",
                           progress=False)
    assert "tensorboard" not in plain.report.outputs and not (tmp_path / "plain" / "tensorboard").exists()


def test_cli_report_to(tmp_path, tiny_model_dir, harmful_file, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "aligned"
    base = ["align", "--model", str(tiny_model_dir), "--data", str(harmful_file), "--safety", "all", "--samples", "4",
            "--out", str(out), *FAST]
    assert cli.main([*base, "--report-to", "nope"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "unknown report_to 'nope'" in error and not out.exists()
    assert cli.main([*base, "--report-to", "tensorboard", "--max-steps", "5"]) == 0  # the preset logs every 5 steps
    assert "train/loss" in _scalars(out / "tensorboard")
    assert json.loads((out / "report.json").read_text())["outputs"]["tensorboard"] == "tensorboard"


from test_lab import experiment_file  # noqa: E402, F401 - a fixture


def test_the_labs_training_stages_report_to_tensorboard_without_changing_their_keys(experiment_file, tmp_path):  # noqa: F811
    pytest.importorskip("tensorboard")
    import yaml

    from antidote_llm.lab import load_experiment, run_experiment

    raw = yaml.safe_load(experiment_file.read_text())
    raw.pop("alignment")
    raw.update(defenses={"none": {"method": "none"}}, evaluate_stages=[])
    training_spec = raw["finetune"]["training"]
    training_spec["overrides"] = {**training_spec.get("overrides", {}), "logging_steps": 1}
    raw["finetune"]["training"] = {**training_spec, "report_to": "tensorbord"}
    experiment_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(AntidoteError, match="unknown report_to 'tensorbord'"):
        load_experiment(experiment_file)
    raw["finetune"]["training"]["report_to"] = "none"
    experiment_file.write_text(yaml.safe_dump(raw))
    plain = run_experiment(load_experiment(experiment_file), tmp_path / "plain", progress=False, log=lambda _: None)
    raw["finetune"]["training"]["report_to"] = ["tensorboard"]
    experiment_file.write_text(yaml.safe_dump(raw))
    tracked = run_experiment(load_experiment(experiment_file), tmp_path / "tracked", progress=False, log=lambda _: None)
    (finetune,) = [name for name in tracked.ran if name.startswith("finetune-")]
    assert finetune in plain.ran  # the same key: how a run is watched is not what it computes
    assert "train/loss" in _scalars(tmp_path / "tracked" / "stages" / finetune / "tensorboard")
