"""What each repair kept from issue 19 costs, in bare forward passes of the same model over the same rows, in one run.

The unit is one forward pass (no gradient, logits computed) of the fine-tuned model over the 64 refusal rows the
selections score on. Each repair is timed on the same loaded model and rows: the Wanda selection (Antidote's),
the refusal score, the anchored compensation's statistics and solves, and SafeMERGE. Run from the repository root with ../shared/data
beside it, on an aligned model and a fine-tuned adapter (e.g. examples/smollm2-frontier.sh's):

    python benchmarks/bench_repairs.py --aligned runs/f/aligned --adapter runs/f/sst2-p0.2/finetuned/adapter
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from antidote_llm.core.realign import RealignConfig, calibration_batches, select_nested  # noqa: E402
from antidote_llm.core.statistics import input_device  # noqa: E402
from antidote_llm.data.spec import DataSpec  # noqa: E402
from antidote_llm.defenses import defense  # noqa: E402
from antidote_llm.evaluation.tasks import load_task_pairs  # noqa: E402
from antidote_llm.registry import DefenseContext  # noqa: E402
from antidote_llm.runtime.loading import ModelSource, load_model  # noqa: E402

RATIOS = (0.01, 0.02, 0.05)


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aligned", required=True, help="the aligned stage's folder (with merged/ and adapter/)")
    parser.add_argument("--adapter", required=True, help="the fine-tuned adapter")
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shared, aligned = Path(args.shared), Path(args.aligned)
    refusals = DataSpec(source=str(shared / "safety/refusals_adv_training.csv"), prompt_field="Behavior",
                        response_field="Safe_Response", samples=64).load("all").pairs
    harmful = DataSpec(source=str(shared / "harmful/beavertails_unsafe_pairs.json"), skip=100, samples=64).load("unsafe").pairs
    user = load_task_pairs("sst2", str(shared / "tasks/sst2_train.tsv"), limit=64)
    loaded = load_model(ModelSource(str(aligned / "merged"), adapters=(args.adapter,), dtype="float32", device="cpu"),
                        keep_adapter=True)
    model, tokenizer = loaded.model, loaded.tokenizer
    base = RealignConfig(ratio=RATIOS[0], targets="adapter-a")

    def forward() -> None:
        with torch.inference_mode():
            for batch in calibration_batches(tokenizer, refusals, base):
                model(input_ids=batch.input_ids.to(input_device(model)), attention_mask=batch.attention_mask, use_cache=False)

    forward()  # warm-up
    unit = min(_timed(forward) for _ in range(3))
    refusal = base.model_copy(update={"score": "refusal"})
    costs = {"Wanda (Antidote), 64 harmful rows": _timed(
        lambda: select_nested(model, tokenizer, base, harmful, ratios=RATIOS, progress=False))}
    costs["refusal score, 64 refusal rows against 64 user rows"] = _timed(lambda: select_nested(
        model, tokenizer, refusal, refusals, ratios=RATIOS, contrast_data=user, progress=False))
    compensated = select_nested(model, tokenizer, refusal.model_copy(update={"compensate": True}),
                                refusals, ratios=RATIOS, contrast_data=user, progress=False)
    costs["refusal score + anchored compensation's statistics (guard's default)"] = (
        compensated.timings["scoring_s"] + compensated.timings["compensation_s"])
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    costs["compensation's solves at one ratio"] = _timed(lambda: compensated.prune(len(RATIOS) - 1))
    model.load_state_dict(state, strict=False)
    safemerge = defense("safemerge").configure({}, {})
    costs["SafeMERGE"] = _timed(lambda: safemerge.apply(model, DefenseContext(
        tokenizer, alignment_adapter=str(aligned / "adapter"))))
    print(f"SmolLM2-135M, {torch.get_num_threads()} thread(s); unit: one bare forward over the 64 refusal rows = "
          f"{unit:.2f} s")
    for name, seconds in costs.items():
        print(f"  {name:<58} {seconds:7.1f} s = {seconds / unit:7.1f} forwards")


if __name__ == "__main__":
    main()
