"""A new post-fine-tuning defense with a new input, written in a temporary module as a user would: the registry,
the lab and the CLI accept it with no edit of the package (the inputs table and @register are the only hooks)."""

import json
import sys
import textwrap

import pytest
import yaml

from antidote_llm.cli.main import main
from antidote_llm.defenses import DEFENSES, defense
from antidote_llm.errors import AntidoteError
from antidote_llm.lab import load_experiment, run_experiment
from antidote_llm.registry import INPUTS, DefenseContext
from test_lab import experiment_file  # noqa: F401 - a fixture
from test_post_peers import lineage  # noqa: F401 - a fixture

TOY_MODULE = '''
from typing import ClassVar

from pydantic import Field

from antidote_llm.defenses.adapters import lora_modules
from antidote_llm.defenses.report import post_report
from antidote_llm.registry import Defense, DefenseInput, DefenseOutcome, register, register_input
from antidote_llm.runtime.runinfo import Timings

register_input(DefenseInput("toy_rows", "rows the toy defense counts", "rows", ("toy_data",), flag="--toy-data"))


@register
class Toy(Defense):
    name: ClassVar[str] = "toy"
    description: ClassVar[str] = "counts its rows and scales the adapter by a constant"
    scale: float = Field(default=0.5, ge=0, le=1)

    def inputs(self):
        return (("toy_rows",),)

    def knob(self):
        return f"scale={self.scale}"

    def apply(self, model, context):
        for layer in lora_modules(model).values():
            for factor in layer.lora_B.values():
                factor.weight.data.mul_(self.scale)
        report = post_report("toy", self, {}, "adapter", Timings()).model_dump(mode="json")
        return DefenseOutcome(report=report, changed_fraction=len(context.toy_rows) / 100)  # shows what it read
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_defense.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import toy_defense

    yield toy_defense.Toy
    DEFENSES.pop("toy")
    INPUTS.pop("toy_rows")
    sys.modules.pop("toy_defense")


def test_the_registry_builds_the_toy_from_its_options(toy):
    assert defense("toy", "post") is toy
    chosen = defense("toy").configure({"scale": 0.25})
    assert chosen.scale == 0.25 and chosen.knob() == "scale=0.25" and chosen.inputs() == (("toy_rows",),)
    with pytest.raises(AntidoteError, match="scale"):
        defense("toy").configure({"scale": 2})
    assert DefenseContext(None, toy_rows=[1, 2]).toy_rows == [1, 2]
    with pytest.raises(AntidoteError, match="unknown defense input 'elsewhere'"):
        DefenseContext(None, elsewhere=1)


def test_the_lab_reads_the_toys_input_from_its_own_experiment_key(toy, experiment_file, tmp_path):  # noqa: F811
    raw = yaml.safe_load(experiment_file.read_text())
    raw["defenses"] = {"none": {"method": "none"}, "toy": {"method": "toy", "scale": 0.5}}
    experiment_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(AntidoteError, match="needs toy_data"):
        load_experiment(experiment_file)
    raw["toy_data"] = {"source": "benign.jsonl", "samples": 3}
    experiment_file.write_text(yaml.safe_dump(raw))
    result = run_experiment(load_experiment(experiment_file), tmp_path / "runs", progress=False, log=lambda _: None)
    row = next(r for r in result.rows if r["defense"] == "toy")
    assert row["setting"] == "scale=0.5" and row["pruned_fraction"] == 0.03  # it read the 3 rows of toy_data
    raw["unknown_data"] = {"source": "benign.jsonl"}  # a key no input declares is still a mistake
    experiment_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(AntidoteError, match="unknown_data"):
        load_experiment(experiment_file)


def test_the_cli_offers_the_toy_as_a_method_with_its_input_flag(toy, lineage, tmp_path, capsys):  # noqa: F811
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": f"p{i}", "response": "r"}) for i in range(5)))
    args = ["realign", "--model", str(lineage / "aligned"), "--adapter", str(lineage / "ft"), "--device", "cpu",
            "--method", "toy"]
    assert main([*args, "--out", str(tmp_path / "missing")]) == 2
    assert "toy needs --toy-data" in capsys.readouterr().err and not (tmp_path / "missing").exists()
    assert main([*args, "--toy-data", str(rows), "--toy-samples", "4", "--scale", "0.5", "--out", str(tmp_path / "o")]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["inputs"] == {"toy_rows": str(rows), "toy_rows_rows": 4} and report["settings"] == {"scale": 0.5}
