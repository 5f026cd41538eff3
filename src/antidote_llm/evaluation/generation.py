"""Greedy generation: the one decoder behind evaluation, the model-based judges and the benchmarks.

The authors' code generates one prompt at a time (about 2 s a prompt on an H100). Here prompts are
tokenized once in the training template, identical prompts are generated once, the rest are sorted by
length so a batch holds prompts of similar length (little padding), left-padded, decoded greedily in
batches, and the answers are handed back in input order. Greedy decoding with a correct attention mask
gives the same tokens batched or not (up to float noise in exact near-ties of the argmax).
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from tqdm.auto import tqdm

from antidote_llm.data.templates import encode_prompt, pad_ids, render_prompt
from antidote_llm.errors import AntidoteError
from antidote_llm.runtime.loading import model_positions

DEFAULT_MAX_NEW_TOKENS = 512  # the paper's limit for harmful-score answers
DEFAULT_BATCH_SIZE = 16


class TokenGenerator(Protocol):
    """Maps prompt token ids to the greedy continuation's token ids (EOS and what follows removed)."""

    backend: str

    def __call__(
        self, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, progress: bool = False, desc: str = "generating"
    ) -> list[list[int]]: ...


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and the model's (Llama 3 lists several)."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured):
        if value is None:
            continue
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token not in ids:
                ids.append(int(token))
    return ids


def _cut_at_stop(tokens: list[int], stops: Sequence[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in stops:
            return tokens[:position]
    return tokens


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


class HFGenerator:
    """Batched greedy decoding with a transformers (or PEFT) causal LM held in memory."""

    backend = "hf"

    def __init__(self, model, tokenizer, batch_size: int = DEFAULT_BATCH_SIZE):
        if batch_size < 1:
            raise AntidoteError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.stops = stop_token_ids(model, tokenizer)
        if tokenizer.pad_token_id is None:  # padding is masked out; any id will do, the EOS is the usual one
            tokenizer.pad_token_id = self.stops[0] if self.stops else 0
        self.pad_id = tokenizer.pad_token_id

    def _config(self, max_new_tokens: int):
        from transformers import GenerationConfig

        # Every sampling knob pinned: the model's own generation_config (often sampling) must not leak in.
        return GenerationConfig(
            do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
            temperature=1.0, top_p=1.0, top_k=50, repetition_penalty=1.0,
            eos_token_id=self.stops or None, pad_token_id=self.pad_id,
        )

    @torch.inference_mode()
    def _batch(self, batch: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        input_ids, attention = pad_ids(self.tokenizer, batch, "left")
        device = _model_device(self.model)
        input_ids, attention = input_ids.to(device), attention.to(device)
        output = self.model.generate(
            input_ids=input_ids, attention_mask=attention, generation_config=self._config(max_new_tokens)
        )
        new = output[:, input_ids.shape[1]:].tolist()
        return [_cut_at_stop(tokens, self.stops) for tokens in new]

    def __call__(
        self, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, progress: bool = False, desc: str = "generating"
    ) -> list[list[int]]:
        max_new_tokens = fit_new_tokens(prompt_ids, max_new_tokens, model_positions(self.model))
        return batched_by_length(
            prompt_ids, lambda batch: self._batch(batch, max_new_tokens), self.batch_size, progress, desc
        )


def fit_new_tokens(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, positions: int | None) -> int:
    """The answer budget of one generation call: `max_new_tokens`, ended where the longest prompt reaches the model's
    last position (a model cannot write past it; GPT-2's position table would be indexed past its end). A prompt
    that fills every position leaves no room for an answer: refused."""
    if positions is None or not prompt_ids:
        return max_new_tokens
    index, longest = max(enumerate(len(ids) for ids in prompt_ids), key=lambda item: item[1])
    if longest >= positions:
        raise AntidoteError(f"prompt {index + 1} is {longest} tokens long, and the model has {positions} positions, "
                            "so there is no room for an answer; shorten the prompts or use a model with more positions")
    return min(max_new_tokens, positions - longest)


def batched_by_length(
    prompt_ids: Sequence[Sequence[int]],
    run_batch: Callable[[Sequence[Sequence[int]]], list[list[int]]],
    batch_size: int,
    progress: bool,
    desc: str,
) -> list[list[int]]:
    """Run unique prompts longest first in batches of similar length; results in input order."""
    empty = [index for index, ids in enumerate(prompt_ids) if not ids]
    if empty:
        raise AntidoteError(f"prompt {empty[0]} is empty after tokenization; drop empty prompts")
    counts = Counter(tuple(ids) for ids in prompt_ids)  # greedy is deterministic: repeats run once
    order = sorted(counts, key=len, reverse=True)  # longest first: a memory error shows at once
    results: dict[tuple[int, ...], list[int]] = {}
    with tqdm(total=len(prompt_ids), desc=desc, unit="prompt", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            for key, tokens in zip(batch, run_batch(batch), strict=True):
                results[key] = tokens
            bar.update(sum(counts[key] for key in batch))
    return [list(results[tuple(ids)]) for ids in prompt_ids]


class VllmGenerator:
    """Greedy decoding with vLLM (GPU only), from a model directory or hub id; same prompt token ids."""

    backend = "vllm"

    def __init__(self, model_path: str, *, stops: Sequence[int], dtype: str = "auto", trust_remote_code: bool = False):
        require_vllm()
        from vllm import LLM

        self.stops = list(stops)
        self.llm = LLM(model=model_path, dtype=dtype, trust_remote_code=trust_remote_code)

    def __call__(
        self, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, progress: bool = False, desc: str = "generating"
    ) -> list[list[int]]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=self.stops)
        outputs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], params, use_tqdm=progress)
        return [_cut_at_stop(list(out.outputs[0].token_ids), self.stops) for out in outputs]


def require_vllm() -> None:
    """Fail early and in one line when the vLLM backend cannot run here."""
    if importlib.util.find_spec("vllm") is None:
        raise AntidoteError("--backend vllm needs the vllm package (pip install 'antidote-llm[vllm]'); or use --backend hf")
    if not torch.cuda.is_available():
        raise AntidoteError("--backend vllm needs a CUDA GPU, and none is visible; use --backend hf")


BACKENDS = ("hf", "vllm")


def encode_prompts(
    tokenizer, prompts: Sequence[str], *, template: str = "alpaca", inputs: Sequence[str] | None = None
) -> list[list[int]]:
    """Token ids of each (instruction, input) rendered in `template`, exactly as training encodes prompts."""
    if inputs is not None and len(inputs) != len(prompts):
        raise AntidoteError(f"{len(prompts)} prompts but {len(inputs)} inputs; give one input per prompt")
    extras = inputs if inputs is not None else [""] * len(prompts)
    return [
        encode_prompt(tokenizer, render_prompt(template, prompt, extra, tokenizer), template)
        for prompt, extra in zip(prompts, extras, strict=True)
    ]


def decode(tokenizer, outputs: Sequence[Sequence[int]]) -> list[str]:
    return [tokenizer.decode(list(ids), skip_special_tokens=True) for ids in outputs]


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    inputs: Sequence[str] | None = None,
    template: str = "alpaca",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> list[str]:
    """Greedy answers to instructions (with optional inputs) rendered in `template`, in input order."""
    if max_new_tokens < 1:
        raise AntidoteError(f"max new tokens must be at least 1, got {max_new_tokens}")
    prompt_ids = encode_prompts(tokenizer, prompts, template=template, inputs=inputs)
    generator = HFGenerator(model, tokenizer, batch_size=batch_size)
    return decode(tokenizer, generator(prompt_ids, max_new_tokens=max_new_tokens, progress=progress))
