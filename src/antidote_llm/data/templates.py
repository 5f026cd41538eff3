"""Prompt templates and tokenization shared by calibration, training and generation.

Every stage formats a (prompt, input, response) row the same way, so a model is calibrated and
evaluated in the format it was trained in. The one exception is the authors' own: their SST-2
evaluation drops the newline after "### Response:" (evaluation/tasks.py, Task.eval_prompt).
Training and calibration rows are prompt + response tokenized as one string, as the authors do.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

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


_RENDERED_ALPACA = re.compile(
    re.escape(ALPACA_WITH_INPUT.split("### Instruction:")[0]) + r"### Instruction:\n(?P<instruction>.*?)\n\n"
    r"### Input:\n(?P<input>.*)\n\n### Response:\n?|"
    + re.escape(ALPACA_NO_INPUT.split("### Instruction:")[0]) + r"### Instruction:\n(?P<bare>.*)\n\n### Response:\n?",
    re.DOTALL,
)


def unrender_alpaca(text: str) -> tuple[str, str] | None:
    """(instruction, input) of a row whose instruction is already a whole Alpaca prompt (some released task
    files store it so, e.g. the AG News training rows), else None; rendering it again would nest two prompts."""
    match = _RENDERED_ALPACA.fullmatch(text)
    if match is None:
        return None
    if match["bare"] is not None:
        return match["bare"], ""
    return match["instruction"], match["input"]


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
    return chat_text(tokenizer, [{"role": "user", "content": content}], add_generation_prompt=True)


def chat_text(tokenizer, messages: list[dict], *, add_generation_prompt: bool, whose: str = "the model",
              instead: str = "use --template alpaca or plain") -> str:
    """`messages` through the tokenizer's chat template. A template that Jinja's sandbox refuses, that does not
    parse, or that raises on these messages is the input's fault: one line naming the problem."""
    from jinja2 import TemplateError, TemplateSyntaxError
    from jinja2.sandbox import SecurityError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        kind = ("Jinja's sandbox refused it" if isinstance(exc, SecurityError)
                else "it has a syntax error" if isinstance(exc, TemplateSyntaxError) else "it raised an error")
        where = f" (line {exc.lineno})" if isinstance(exc, TemplateSyntaxError) and exc.lineno else ""
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise AntidoteError(f"the chat template of {whose} cannot be used: {kind}{where}: {message}; fix the "
                            f"chat_template in its tokenizer files, or {instead}") from None


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


def _special_tokens(template: str) -> bool:
    # A chat template already writes its own special tokens; the others get the tokenizer's BOS.
    return template != "chat"


def encode_prompt(tokenizer, prompt_text: str, template: str) -> list[int]:
    """The prompt's ids for generation: the prompt text tokenized alone, as the authors' evaluation does."""
    return tokenizer(prompt_text, add_special_tokens=_special_tokens(template))["input_ids"]


def _ids_and_boundary(tokenizer, prompt_text: str, text: str, add_special_tokens: bool) -> tuple[list[int], int]:
    """Ids of `text` (which starts with `prompt_text`) and how many of them are the prompt's.

    A token belongs to the answer when its character span ends after the prompt text's end, so a token
    across the boundary is the answer's; special tokens the tokenizer adds (BOS, span (0, 0)) are the
    prompt's. Without offsets (slow tokenizers) the prompt is as long as the prompt tokenized alone,
    the authors' rule.
    """
    if getattr(tokenizer, "is_fast", False):
        try:
            encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
            offsets = encoded["offset_mapping"]
        except (NotImplementedError, KeyError):
            offsets = None
        if offsets is not None:
            ids = list(encoded["input_ids"])
            end = len(prompt_text)
            prompt_len = next((i for i, (_, stop) in enumerate(offsets) if stop > end), len(ids))
            return ids, prompt_len
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    prompt_len = len(tokenizer(prompt_text, add_special_tokens=add_special_tokens)["input_ids"])
    return ids, min(prompt_len, len(ids))


def encode_pair(
    tokenizer, template: str, instruction: str, response: str, input: str = "", max_length: int | None = None
) -> Encoded:
    """Prompt + response tokenized as one string (as the authors' training data), EOS id appended, then cut
    to `max_length`. Tokenizing the response apart would change its first token under SentencePiece-style
    tokenizers (Llama-2: "\u2581I" alone, "I" after the prompt's newline)."""
    prompt_text = render_prompt(template, instruction, input, tokenizer)
    ids, prompt_len = _ids_and_boundary(tokenizer, prompt_text, prompt_text + response, _special_tokens(template))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if max_length is not None:
        ids = ids[:max_length]
    return Encoded(input_ids=ids, prompt_len=min(prompt_len, len(ids)))


DEFAULT_MAX_LENGTH = 2048  # the authors' tokenizer model_max_length (their Alpaca runs use 512)


def fit_max_length(requested: int | None, positions: int | None) -> int:
    """Tokens per row (prompt + answer): by default min(2048, the model's positions); a value given that is longer
    than the model's positions is refused, since its rows would index past the position table."""
    if requested is None:
        return min(DEFAULT_MAX_LENGTH, positions or DEFAULT_MAX_LENGTH)
    if positions is not None and requested > positions:
        raise AntidoteError(f"max_length {requested} is longer than the model's {positions} positions; give "
                            f"--max-length (max_length) {positions} or less, or leave it out for min({DEFAULT_MAX_LENGTH}, {positions})")
    return requested


def pad_ids(tokenizer, rows: Sequence[Sequence[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id rows padded to the longest by the tokenizer, on `side`.

    The mask comes from row lengths, not from the pad id: many tokenizers pad with their EOS."""
    padded = tokenizer.pad({"input_ids": [list(ids) for ids in rows]}, padding=True, padding_side=side,
                           return_attention_mask=True, return_tensors="pt")
    return padded["input_ids"], padded["attention_mask"]
