"""Antidote scoring speed and memory on SmolLM2-135M-Instruct, against a bare forward and the
authors' algorithm (the oracle), measured in one run. Prints ratios; goals from the issue in brackets.

    python benchmarks/bench_realign.py [--rows 64] [--threads 1] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from antidote_llm.core.oracle import oracle_masks  # noqa: E402
from antidote_llm.core.realign import RealignConfig, calibration_batches, realign, select_nested  # noqa: E402
from antidote_llm.core.statistics import input_device  # noqa: E402
from antidote_llm.core.targets import resolve_targets  # noqa: E402
from antidote_llm.data.records import load_pairs  # noqa: E402
from antidote_llm.runtime.loading import ModelSource, load_model  # noqa: E402
from antidote_llm.runtime.runinfo import MemoryMonitor  # noqa: E402

RATIOS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "harmful" / "beavertails_unsafe_pairs.json"


def bare_forward_s(model, batches) -> float:
    """No-grad forward through the decoder layers only (no LM head), same batches."""
    decoder = model.get_decoder()
    device = input_device(model)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            decoder(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each side; the best counts")
    parser.add_argument("--skip-oracle", "--skip-reference", dest="skip_oracle", action="store_true",
                        help="do not time the authors' algorithm (the oracle)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not DATA.is_file():
        raise SystemExit(f"needs {DATA} (the shared BeaverTails pairs)")

    pairs = load_pairs(DATA, samples=args.rows).pairs
    loaded = load_model(ModelSource("smollm2-135m-instruct", dtype="float32", device="cpu"))
    model, tokenizer = loaded.model, loaded.tokenizer
    config = RealignConfig(ratio=0.05, targets=("all-linear",), batch_size=args.batch_size, max_length=args.max_length)
    batches = calibration_batches(tokenizer, pairs, config)
    lengths = [int(b.attention_mask.sum(1).max()) for b in batches]
    tokens = sum(b.tokens for b in batches)
    padded = sum(b.input_ids.numel() for b in batches)
    print(f"SmolLM2-135M-Instruct fp32, {len(pairs)} rows, {tokens} tokens ({padded - tokens} padding), "
          f"batch {args.batch_size}, longest {max(lengths)}, {args.threads} thread(s)")

    bare_forward_s(model, batches[:1])  # warm-up
    original = {n: p.detach().clone() for n, p in model.named_parameters()}

    def restore() -> None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(original[name])

    # Interleaved, best of --repeats, so a busy machine slows both sides alike.
    bare, ours, best, frontier, refusal = float("inf"), float("inf"), {}, float("inf"), float("inf")
    for _ in range(args.repeats):
        bare = min(bare, bare_forward_s(model, batches))
        restore()
        with MemoryMonitor() as memory:
            result = realign(model, tokenizer, config, pairs, progress=False)
        timings = result.report.timings
        if timings["scoring_s"] + timings["selection_s"] < ours:
            ours, best = timings["scoring_s"] + timings["selection_s"], timings
        restore()
        nested = select_nested(model, tokenizer, config, pairs, ratios=RATIOS, progress=False)
        frontier = min(frontier, nested.timings["scoring_s"] + nested.timings["selection_s"])
        # the refusal score's cost: a forward and a backward per batch (the same rows stand in for refusals)
        gradient = select_nested(model, tokenizer, config.model_copy(update={"score": "refusal"}), pairs, progress=False)
        refusal = min(refusal, gradient.timings["scoring_s"] + gradient.timings["selection_s"])
    print(f"bare no-grad forward through the decoder layers: {bare:.2f} s")
    print(f"antidote statistics + scores + selection (all Linear in the decoder): {ours:.2f} s "
          f"(statistics {best['scoring_s']:.2f} s, scores and selection {best['selection_s']:.2f} s)")
    print(f"  ratio scoring / bare forward: {ours / bare:.3f}  [goal <= 1.05]")
    k = len(RATIOS)
    print(f"{k} ratios ({', '.join(map(str, RATIOS))}) from one statistics pass: {frontier:.2f} s, "
          f"{frontier / bare:.3f} bare forwards  [goal <= {1.1 + 0.05 * k:.2f} = 1.1 + 0.05 k]")
    print(f"the refusal score (--score refusal), one ratio: {refusal:.2f} s, {refusal / bare:.2f} bare forwards "
          "(a forward with the LM head and a backward per batch; with --contrast-data, the user's rows cost as much again)")
    rss_ratio = memory.peak_rss / memory.start_rss
    extra_mb = (memory.peak_rss - memory.start_rss) / 2**20
    print(f"  peak RSS during scoring / RSS before: {rss_ratio:.3f} (+{extra_mb:.0f} MiB)  [goal <= 1.5 plus one batch of activations]")

    if not args.skip_oracle:
        restore()
        targets = resolve_targets(model, ["all-linear"])
        start = time.perf_counter()
        expected = oracle_masks(model, tokenizer, pairs, targets, ratio=0.05, max_length=args.max_length)
        oracle_s = time.perf_counter() - start
        agree = sum(int((expected[n] == result.masks[n]).sum()) for n in expected)
        total = sum(m.numel() for m in expected.values())
        print(f"the authors' algorithm, the oracle (batch 1, layer by layer, two forwards per layer): {oracle_s:.2f} s")
        print(f"  ratio oracle / ours: {oracle_s / ours:.2f}  [goal >= 2 on CPU]")
        print(f"  mask agreement with the oracle: {agree / total:.6%} of {total:,} weights")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")


if __name__ == "__main__":
    main()
