"""Batched greedy generation: same answers as one prompt at a time, in input order, stopping at EOS."""

from __future__ import annotations

import pytest
import torch

from antidote_llm.data.templates import encode_prompt, render_prompt
from antidote_llm.errors import AntidoteError
from antidote_llm.evaluation.generation import (
    HFGenerator,
    decode,
    encode_prompts,
    generate,
    require_vllm,
    stop_token_ids,
)
from conftest import make_model, make_tokenizer, requires_smollm2, scripted_model

PROMPTS = [
    "Tell me a story.",
    "How are you?",
    "Summarize the plot of a long novel about a whale and a captain in three sentences.",
    "Hi",
    "How are you?",  # a repeat: generated once, answered twice
    "Write a list of five fruits, one per line, and nothing else please.",
    "What is 2 + 2?",
]


def one_at_a_time_greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The authors' way: one unpadded prompt through model.generate, cut at EOS."""
    output = model.generate(
        input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )[0, len(prompt_ids):].tolist()
    return output[: output.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in output else output


@pytest.mark.parametrize("seed", [0, 1])
def test_batched_equals_unbatched_on_tiny_model(seed):
    torch.manual_seed(seed)
    model, tokenizer = make_model(seed), make_tokenizer()
    prompt_ids = encode_prompts(tokenizer, PROMPTS, template="alpaca")
    batched = HFGenerator(model, tokenizer, batch_size=3)(prompt_ids, max_new_tokens=12)
    single = [HFGenerator(model, tokenizer, batch_size=1)([ids], max_new_tokens=12)[0] for ids in prompt_ids]
    unbatched = [one_at_a_time_greedy(model, tokenizer, ids, 12) for ids in prompt_ids]
    assert batched == single == unbatched
    assert sum(map(len, batched)) > len(PROMPTS)  # real answers compared, not empty ones


def test_answers_come_back_in_input_order():
    tokenizer = make_tokenizer()
    model = scripted_model(tokenizer, {"Hi": "REPLY-ONE", "?": "REPLY-TWO", ".": "REPLY-THREE"})
    texts = ["Say Hi", "Why?", "Stop.", "Why?", "Say Hi"]  # raw text: its last character picks the reply
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    outputs = HFGenerator(model, tokenizer, batch_size=2)(prompt_ids, max_new_tokens=5)
    assert decode(tokenizer, outputs) == ["REPLY-ONE", "REPLY-TWO", "REPLY-THREE", "REPLY-TWO", "REPLY-ONE"]


def test_generation_stops_at_eos_and_respects_max_new_tokens():
    tokenizer = make_tokenizer()
    model = scripted_model(tokenizer, "I cannot help with that.")
    prompt_ids = encode_prompts(tokenizer, ["anything", "something longer than that"], template="alpaca")
    outputs = HFGenerator(model, tokenizer, batch_size=2)(prompt_ids, max_new_tokens=10)
    reply = tokenizer.convert_tokens_to_ids("I cannot help with that.")
    assert outputs == [[reply], [reply]]  # EOS ends the answer and is not part of it
    random_model = make_model()
    limited = HFGenerator(random_model, tokenizer, batch_size=2)(encode_prompts(make_tokenizer(), ["x"]), max_new_tokens=3)
    assert len(limited[0]) == 3


def test_templates_render_as_training_does():
    tokenizer = make_tokenizer()
    for template in ("alpaca", "chat", "plain"):
        expected = encode_prompt(tokenizer, render_prompt(template, "Do it", "with this", tokenizer), template)
        assert encode_prompts(tokenizer, ["Do it"], template=template, inputs=["with this"]) == [expected]
    with pytest.raises(AntidoteError, match="unknown template"):
        encode_prompts(tokenizer, ["x"], template="nope")
    with pytest.raises(AntidoteError, match="one input per prompt"):
        encode_prompts(tokenizer, ["x", "y"], inputs=["only one"])


def test_bad_settings_are_input_errors():
    model, tokenizer = make_model(), make_tokenizer()
    with pytest.raises(AntidoteError, match="batch size"):
        HFGenerator(model, tokenizer, batch_size=0)
    with pytest.raises(AntidoteError, match="max new tokens"):
        generate(model, tokenizer, ["x"], max_new_tokens=0)
    with pytest.raises(AntidoteError, match="empty after tokenization"):
        HFGenerator(model, tokenizer)([[1, 2], []], max_new_tokens=2)


def test_stop_tokens_include_the_models_own_eos_list():
    model, tokenizer = make_model(), make_tokenizer()
    model.generation_config.eos_token_id = [257, 7]
    assert stop_token_ids(model, tokenizer) == [257, 7]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_vllm_backend_without_gpu_or_package_is_a_clear_error():
    with pytest.raises(AntidoteError, match="--backend vllm needs"):
        require_vllm()


@requires_smollm2
@pytest.mark.slow
def test_batched_equals_unbatched_on_smollm2():
    from antidote_llm.runtime.loading import ModelSource, load_model

    torch.manual_seed(0)
    loaded = load_model(ModelSource("smollm2-135m-instruct", device="cpu"))
    prompts = ["What is the capital of France?", "Give me one tip for sleeping well.", "Hi", "Name a color."]
    for template in ("alpaca", "chat"):
        prompt_ids = encode_prompts(loaded.tokenizer, prompts, template=template)
        batched = HFGenerator(loaded.model, loaded.tokenizer, batch_size=4)(prompt_ids, max_new_tokens=16)
        single = [one_at_a_time_greedy(loaded.model, loaded.tokenizer, ids, 16) for ids in prompt_ids]
        assert batched == single, template
