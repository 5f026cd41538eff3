"""Training across processes: `accelerate launch` with two CPU processes (gloo) trains the same adapter as one
process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import save_model

SRC = Path(__file__).resolve().parents[1] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(prefix: list[str], args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf-home")}  # no user accelerate config
    done = subprocess.run([sys.executable, *prefix, "-m", "antidote_llm", *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_cpu_processes_train_the_one_process_adapter(tmp_path):
    model_dir = save_model(tmp_path / "model")
    # 800 rows of varied length: enough that the Trainer's own length grouping (mega-batches of 50 per-device
    # batches) groups them differently for 1 x 4 and 2 x 2 rows, so the same batches need our sampler. Six
    # steps: AdamW's first steps move every weight by about +-lr whatever the rows, which would hide that.
    rows = [{"prompt": f"Question {i}?" + " more" * (i % 7), "response": "I cannot help." + " No." * (i % 5)}
            for i in range(800)]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    common = ["align", "--model", str(model_dir), "--device", "cpu", "--data", str(tmp_path / "data.json"),
              "--preset", "cpu", "--max-steps", "6", "--max-length", "256", "--lr", "1e-2", "--quiet"]
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    two = _run(launch, [*common, "--batch-size", "2", "--out", str(tmp_path / "two")], tmp_path)
    _run([], [*common, "--batch-size", "4", "--out", str(tmp_path / "one")], tmp_path)

    assert two.stdout.count("antidote: align:") == 1  # only the main process reports and writes
    one_adapter = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    two_adapter = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert one_adapter.keys() == two_adapter.keys()
    moved = max(float(t.abs().max()) for k, t in one_adapter.items() if "lora_B" in k)
    assert moved > 1e-3  # training changed the adapter (lora_B starts at zero)
    for key in one_adapter:
        torch.testing.assert_close(two_adapter[key], one_adapter[key], rtol=1e-4, atol=1e-6)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "two" / "adapter")
    assert any("lora_" in name for name, _ in loaded.named_parameters())
