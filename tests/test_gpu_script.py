"""examples/gpu/paper-gsm8k.sh: every command it runs parses with the CLI's own parser (the GPU run itself is
not tested here), in the order of the paper's stages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_paper_gsm8k_script_commands_parse(tmp_path):
    log = tmp_path / "commands.log"
    stub = tmp_path / "antidote"
    stub.write_text(
        f"#!{sys.executable}\n"
        "import pathlib, sys\n"
        "from antidote_llm.cli.main import build_parser\n"
        "args = build_parser().parse_args(sys.argv[1:])\n"
        f"open({str(log)!r}, 'a').write(args.command + '\\n')\n"
        "if args.command == 'evaluate':\n"
        "    pathlib.Path(args.out).mkdir(parents=True)\n"
        "    (pathlib.Path(args.out) / 'summary.md').write_text('summary')\n"
    )
    stub.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "ANTIDOTE": str(stub), "RUN": str(tmp_path / "run")}
    done = subprocess.run(["bash", str(ROOT / "examples" / "gpu" / "paper-gsm8k.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert log.read_text().split() == ["align", "finetune", "realign", "evaluate", "judge", "evaluate", "judge"]
