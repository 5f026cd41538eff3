"""The one LoRA adapter reader (runtime.checkpoints.LoraAdapter) that --offload and the adapter defenses share."""

from __future__ import annotations

import json

import pytest
import torch

from antidote_llm.errors import AntidoteError
from antidote_llm.runtime.checkpoints import LoraAdapter
from conftest import add_lora, make_model


def test_lora_adapter_updates_equal_peft_delta_weights(tmp_path):
    model = add_lora(make_model(), r=4)
    model.save_pretrained(tmp_path / "adapter")
    adapter = LoraAdapter(tmp_path / "adapter")
    layers = {name: module for name, module in model.get_base_model().named_modules() if hasattr(module, "lora_A")}
    assert set(adapter.factors) == set(layers)
    updates = adapter.updates(list(layers))
    for name, layer in layers.items():
        expected = layer.get_delta_weight("default").float()
        assert adapter.update_shape(name) == tuple(expected.shape)
        torch.testing.assert_close(updates[name], expected)


@pytest.mark.parametrize("option", ["use_dora", "modules_to_save"])
def test_lora_adapter_refuses_what_is_not_plain_lora(tmp_path, option):
    add_lora(make_model()).save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), option: ["lm_head"]}))
    with pytest.raises(AntidoteError, match=f"uses {option}; give a plain LoRA adapter"):
        LoraAdapter(tmp_path / "adapter")
    with pytest.raises(AntidoteError, match="is not a PEFT adapter folder"):
        LoraAdapter(tmp_path)
