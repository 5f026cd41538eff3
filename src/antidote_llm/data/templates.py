"""Prompt templates and tokenization shared by calibration, training and generation.

Every stage formats a (prompt, input, response) row the same way, so a model is calibrated and
evaluated in the format it was trained in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from antidote_llm.errors import AntidoteError

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def _alpaca(instruction: str, input: str, tokenizer) -> str:
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def _chat(instruction: str, input: str, tokenizer) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise AntidoteError(
            "template 'chat' needs a tokenizer with a chat template; use --template alpaca or plain"
        )
    content = f"{instruction}\n\n{input}" if input else instruction
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def _plain(instruction: str, input: str, tokenizer) -> str:
    return f"{instruction}\n\n{input}\n" if input else f"{instruction}\n"


TEMPLATES: dict[str, Callable[[str, str, object], str]] = {
    "alpaca": _alpaca,
    "chat": _chat,
    "plain": _plain,
}


def render_prompt(template: str, instruction: str, input: str = "", tokenizer=None) -> str:
    """The text the model sees before its answer."""
    try:
        render = TEMPLATES[template]
    except KeyError:
        raise AntidoteError(
            f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}"
        ) from None
    return render(instruction, input or "", tokenizer)


@dataclass(frozen=True)
class Encoded:
    """Token ids of prompt + response (+ EOS); the first `prompt_len` ids are the prompt."""

    input_ids: list[int]
    prompt_len: int


def encode_prompt(tokenizer, prompt_text: str, template: str) -> list[int]:
    # A chat template already writes its own special tokens; the others get the tokenizer's BOS.
    return tokenizer(prompt_text, add_special_tokens=template != "chat")["input_ids"]


def encode_pair(
    tokenizer, template: str, instruction: str, response: str, input: str = "", max_length: int | None = None
) -> Encoded:
    """Prompt and response tokenized apart and concatenated, so the boundary is exact; EOS appended."""
    prompt_ids = encode_prompt(tokenizer, render_prompt(template, instruction, input, tokenizer), template)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    ids = prompt_ids + response_ids
    if max_length is not None:
        ids = ids[:max_length]
    return Encoded(input_ids=ids, prompt_len=min(len(prompt_ids), len(ids)))
