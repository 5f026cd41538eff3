"""The example scripts (examples/gpu/paper-gsm8k.sh, examples/smollm2-frontier.sh): every command they run parses
with the CLI's own parser (the runs themselves are not tested here), in the order of the stages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _stub_cli(tmp_path: Path) -> tuple[Path, Path]:
    """An `antidote` that only parses its arguments and logs the command."""
    log = tmp_path / "commands.log"
    stub = tmp_path / "antidote"
    stub.write_text(
        f"#!{sys.executable}\n"
        "import pathlib, sys\n"
        "from antidote_llm.cli.main import build_parser\n"
        "args = build_parser().parse_args(sys.argv[1:])\n"
        f"open({str(log)!r}, 'a').write(args.command + '\\n')\n"
        "if args.command == 'realign':\n"
        "    pathlib.Path(args.out).mkdir(parents=True)\n"
        "    (pathlib.Path(args.out) / 'frontier.csv').write_text('selection,ratio\\nnone,\\n')\n"
        "if args.command == 'evaluate':\n"
        "    pathlib.Path(args.out).mkdir(parents=True)\n"
        "    (pathlib.Path(args.out) / 'summary.md').write_text('summary')\n"
    )
    stub.chmod(0o755)
    return stub, log


@pytest.mark.slow
def test_paper_gsm8k_script_commands_parse(tmp_path):
    stub, log = _stub_cli(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "ANTIDOTE": str(stub), "RUN": str(tmp_path / "run")}
    done = subprocess.run(["bash", str(ROOT / "examples" / "gpu" / "paper-gsm8k.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert log.read_text().split() == ["align", "finetune", "realign", "evaluate", "judge", "evaluate", "judge"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sst2", "agnews"])
def test_frontier_script_commands_parse(tmp_path, task):
    stub, log = _stub_cli(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "ANTIDOTE": str(stub), "SHARED": str(tmp_path / "data")}
    script = str(ROOT / "examples" / "smollm2-frontier.sh")
    done = subprocess.run(["bash", script, str(tmp_path / "run"), task], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # alignment, then per poison fraction (0.2, 0): the fine-tune and three frontiers (both factors, lora_A, refusal)
    assert log.read_text().split() == ["align"] + ["finetune", "realign", "realign", "realign"] * 2
    wrong = subprocess.run(["bash", script, str(tmp_path / "run"), "gsm9k"], env=env, capture_output=True, text=True)
    assert wrong.returncode == 2 and "task must be sst2 or agnews" in wrong.stderr


@pytest.mark.slow
def test_selections_script_commands_parse_and_collect_every_frontier(tmp_path):
    stub, log = _stub_cli(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "ANTIDOTE": str(stub), "SHARED": str(tmp_path / "data"),
           "JOBS": "4"}
    run = tmp_path / "run"
    done = subprocess.run(["bash", str(ROOT / "examples" / "gpu" / "smollm2-selections.sh"), str(run)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    commands = log.read_text().split()
    # one alignment, four fine-tunes (two tasks, two poison fractions), nine frontiers per task
    assert commands[0] == "align" and commands.count("finetune") == 4 and commands.count("realign") == 18
    rows = (run / "selections.csv").read_text().splitlines()
    assert rows[0] == "task,poison,variant,selection,ratio" and len(rows) == 1 + 18
    assert "sst2,0.2,refusal-a,none," in rows and "agnews,0,lora-a,none," in rows
