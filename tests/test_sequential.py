"""Antidote layer by layer from the checkpoint (--offload) equals the in-memory path exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from antidote_llm.core.pipeline import realign_to_disk
from antidote_llm.core.realign import RealignConfig
from antidote_llm.core.report import RealignReport
from antidote_llm.core.sequential import choose_execution
from antidote_llm.data.spec import DataSpec
from antidote_llm.errors import AntidoteError
from antidote_llm.runtime.loading import ModelSource
from conftest import save_adapter, save_model


def _run(tmp_path, source, config, data, offload, name):
    realign_to_disk(source, config, tmp_path / name, data=data, offload=offload, progress=False)
    report = RealignReport.model_validate_json((tmp_path / name / "report.json").read_text())
    return load_file(str(tmp_path / name / "mask.safetensors")), report


def _assert_same_masks(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(("targets", "score"), [("qkv", "wanda"), ("all-linear", "wanda"), ("all-linear", "random")])
def test_full_model_offload_equals_in_memory(tmp_path, harmful_file, targets, score):
    model_dir = save_model(tmp_path / "model", layers=3)
    source = ModelSource(str(model_dir), device="cpu")
    config = RealignConfig(ratio=0.1, targets=targets, score=score, batch_size=4, max_length=64)
    data = DataSpec(source=str(harmful_file))
    memory_masks, memory_report = _run(tmp_path, source, config, data, False, "memory")
    offload_masks, offload_report = _run(tmp_path, source, config, data, True, "offload")
    _assert_same_masks(memory_masks, offload_masks)
    assert memory_report.execution.path == "in-memory" and offload_report.execution.path == "sequential"
    assert offload_report.totals == memory_report.totals and offload_report.modules == memory_report.modules
    # the written model equals the in-memory pruned model, tensor by tensor
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "memory" / "model").state_dict()
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "offload" / "model").state_dict()
    assert expected.keys() == written.keys()
    for name in expected:
        assert torch.equal(expected[name], written[name]), name
    assert json.loads((tmp_path / "offload" / "model" / "model.safetensors.index.json").read_text())["weight_map"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adapter_offload_equals_in_memory(tmp_path, harmful_file, dtype):
    """Alignment adapter merged per layer in fp32, the fine-tuning adapter pruned: the same adapter out."""
    model_dir = save_model(tmp_path / "model", layers=3)
    aligned = save_adapter(tmp_path / "align", model_dir, seed=3, scale=0.1)
    finetune = save_adapter(tmp_path / "ft", model_dir, seed=4, targets=("q_proj", "v_proj", "down_proj"), scale=0.3)
    source = ModelSource(str(model_dir), adapters=(str(aligned), str(finetune)), device="cpu", dtype=dtype)
    config = RealignConfig(ratio=0.2, batch_size=3, max_length=64)
    data = DataSpec(source=str(harmful_file))
    memory_masks, _ = _run(tmp_path, source, config, data, False, "memory")
    offload_masks, report = _run(tmp_path, source, config, data, True, "offload")
    _assert_same_masks(memory_masks, offload_masks)
    assert all(".lora_" in name for name in offload_masks)
    expected = load_file(str(tmp_path / "memory" / "adapter" / "adapter_model.safetensors"))
    written = load_file(str(tmp_path / "offload" / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == written.keys()
    for name in expected:
        assert torch.equal(expected[name], written[name]), name
    assert report.totals.pruned > 0


def test_offload_refuses_what_it_cannot_do_and_writes_nothing(tmp_path, harmful_file):
    model_dir = save_model(tmp_path / "model")
    source = ModelSource(str(model_dir), device="cpu")
    data = DataSpec(source=str(harmful_file))
    with pytest.raises(AntidoteError, match="global"):
        realign_to_disk(source, RealignConfig(ratio=0.1, granularity="global"), tmp_path / "a", data=data, offload=True)
    with pytest.raises(AntidoteError, match="decoder layers only"):
        realign_to_disk(source, RealignConfig(ratio=0.1, targets="lm_head"), tmp_path / "b", data=data, offload=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_auto_goes_sequential_only_when_the_model_does_not_fit(tiny_model_dir, monkeypatch):
    source = ModelSource(str(tiny_model_dir), device="cpu")
    fits = choose_execution(source, None)
    assert fits.path == "in-memory" and fits.model_bytes > 0
    monkeypatch.setattr("antidote_llm.core.sequential._available_bytes", lambda device: fits.model_bytes)
    assert choose_execution(source, None).path == "sequential"  # no headroom left
    assert choose_execution(source, False).path == "in-memory"


def test_cli_offload_flag_and_refusal(tmp_path, harmful_file, capsys):
    from antidote_llm.cli.main import main

    model_dir = save_model(tmp_path / "model")
    common = ["realign", "--model", str(model_dir), "--device", "cpu", "--data", str(harmful_file), "--ratio", "0.1",
              "--batch-size", "4", "--quiet"]
    assert main([*common, "--offload", "--out", str(tmp_path / "out")]) == 0
    assert "path: sequential (asked for (--offload))" in capsys.readouterr().out
    report = RealignReport.model_validate_json((tmp_path / "out" / "report.json").read_text())
    assert report.execution.path == "sequential" and report.memory.peak_rss_bytes > 0
    assert main([*common, "--offload", "--granularity", "global", "--out", str(tmp_path / "bad")]) == 2
    assert "global" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_offload_names_a_truncated_weights_file(tmp_path, harmful_file):
    model_dir = save_model(tmp_path / "model")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(AntidoteError, match="model.safetensors: it is truncated or corrupt"):
        realign_to_disk(ModelSource(str(model_dir), device="cpu"), RealignConfig(ratio=0.1), tmp_path / "out",
                        data=DataSpec(source=str(harmful_file)), offload=True)
    assert not (tmp_path / "out").exists()


def test_merging_an_adapter_keeps_fp32_buffers(tmp_path):
    """Merging in fp32 and casting back touches parameters only: the rotary inv_freq stays fp32 (a bf16
    inv_freq shifted every position angle, and the offload path, which builds the model fresh, disagreed)."""
    from antidote_llm.runtime.loading import load_model

    model_dir = save_model(tmp_path / "model")
    aligned = save_adapter(tmp_path / "align", model_dir)
    loaded = load_model(ModelSource(str(model_dir), adapters=(str(aligned),), device="cpu", dtype="bfloat16"))
    assert loaded.model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("targets", ["adapter-a", "adapter-b"])
def test_cli_offload_prunes_one_factor_of_the_adapter_as_in_memory(tmp_path, harmful_file, targets):
    """A single LoRA factor is adapter mode too: the fine-tuning adapter stays live, not merged away."""
    from antidote_llm.cli.main import main

    model_dir = save_model(tmp_path / "model", layers=2)
    finetune = save_adapter(tmp_path / "ft", model_dir, seed=4, scale=0.3)
    common = ["realign", "--model", str(model_dir), "--adapter", str(finetune), "--device", "cpu", "--data",
              str(harmful_file), "--ratio", "0.2", "--batch-size", "4", "--targets", targets, "--quiet"]
    assert main([*common, "--no-offload", "--out", str(tmp_path / "memory")]) == 0
    assert main([*common, "--offload", "--out", str(tmp_path / "offload")]) == 0
    memory = load_file(str(tmp_path / "memory" / "mask.safetensors"))
    offload = load_file(str(tmp_path / "offload" / "mask.safetensors"))
    _assert_same_masks(memory, offload)
    factor = ".lora_A." if targets == "adapter-a" else ".lora_B."
    assert all(factor in name for name in offload)
    report = RealignReport.model_validate_json((tmp_path / "offload" / "report.json").read_text())
    assert report.method.targets == [targets] and report.totals.pruned > 0
