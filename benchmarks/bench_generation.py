"""Batched greedy generation against the authors' one-prompt-at-a-time loop, on SmolLM2-135M-Instruct
with AdvBench prompts in the Alpaca template, measured in one run. Prints prompts/s of each and the ratio
(goal: >= 4x on CPU), and how many answers are identical.

    python benchmarks/bench_generation.py [--prompts 64] [--new-tokens 64] [--batch-size 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from antidote_llm.evaluation.evaluate import load_harmful_prompts  # noqa: E402
from antidote_llm.evaluation.generation import HFGenerator, encode_prompts  # noqa: E402
from antidote_llm.runtime.loading import ModelSource, load_model  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "harmful" / "advbench_behaviors.csv"


@torch.inference_mode()
def one_at_a_time(model, tokenizer, prompt_ids: list[list[int]], new_tokens: int) -> list[list[int]]:
    """The authors' loop: model.generate on each unpadded prompt, greedy, stop at EOS."""
    answers = []
    for ids in prompt_ids:
        output = model.generate(
            input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False, max_new_tokens=new_tokens, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(ids):].tolist()
        answers.append(output[: output.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in output else output)
    return answers


def timed(run) -> tuple[list[list[int]], float]:
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not DATA.is_file():
        raise SystemExit(f"needs {DATA} (the shared AdvBench prompts)")

    prompts = [pair.prompt for pair in load_harmful_prompts(str(DATA), limit=args.prompts).pairs]
    loaded = load_model(ModelSource("smollm2-135m-instruct", dtype="float32", device="cpu"))
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt_ids = encode_prompts(tokenizer, prompts, template="alpaca")
    generator = HFGenerator(model, tokenizer, batch_size=args.batch_size)
    generator(prompt_ids[:2], max_new_tokens=2)  # warm-up: first-call allocations out of the timings

    batched, batched_s = timed(lambda: generator(prompt_ids, max_new_tokens=args.new_tokens))
    single, single_s = timed(lambda: one_at_a_time(model, tokenizer, prompt_ids, args.new_tokens))

    new_tokens = sum(map(len, batched))
    same = sum(a == b for a, b in zip(batched, single, strict=True))
    print(f"SmolLM2-135M-Instruct, {len(prompts)} AdvBench prompts (alpaca template), up to {args.new_tokens} new "
          f"tokens, {args.threads} thread(s), fp32 CPU")
    print(f"one prompt at a time (authors'): {single_s:8.2f} s  {len(prompts) / single_s:7.2f} prompts/s")
    print(f"batched (batch {args.batch_size:>3}):              {batched_s:8.2f} s  {len(prompts) / batched_s:7.2f} prompts/s  "
          f"{new_tokens / batched_s:8.1f} new tokens/s")
    print(f"speed-up: {single_s / batched_s:.2f}x  [goal >= 4x]")
    print(f"identical answers: {same}/{len(prompts)} (differences are float near-ties of greedy argmax)")


if __name__ == "__main__":
    main()
