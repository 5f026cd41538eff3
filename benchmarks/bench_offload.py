"""Peak memory and time of `antidote realign --offload` (layer by layer from the safetensors files) against
the in-memory path, on SmolLM2-135M-Instruct with BeaverTails pairs. Each path runs in a fresh process;
memory is the peak RSS above that process's RSS after imports. Goals from the issue in brackets.

    python benchmarks/bench_offload.py [--rows 64] [--targets qkv] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "harmful" / "beavertails_unsafe_pairs.json"
MODEL = "smollm2-135m-instruct"


def child(args: argparse.Namespace) -> None:
    """One realign_to_disk run; prints a JSON line with the peak RSS above the post-import baseline and time."""
    import psutil
    import torch

    from antidote_llm.core.pipeline import realign_to_disk
    from antidote_llm.core.realign import RealignConfig
    from antidote_llm.data.spec import DataSpec
    from antidote_llm.runtime.loading import ModelSource
    from antidote_llm.runtime.runinfo import MemoryMonitor

    torch.set_num_threads(args.threads)
    # transformers, peft and accelerate import their model and tokenizer code lazily: import it before the baseline
    import accelerate.utils  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: F401

    baseline = psutil.Process().memory_info().rss
    config = RealignConfig(ratio=0.05, targets=(args.targets,), max_length=args.max_length, batch_size=args.batch_size)
    data = DataSpec(source=str(DATA), samples=args.rows)
    with MemoryMonitor(interval_s=0.005) as memory:
        start = time.perf_counter()
        result = realign_to_disk(ModelSource(MODEL, dtype="float32", device="cpu"), config, Path(args.out_dir) / args.child,
                                 data=data, offload=args.child == "sequential", progress=False)
        seconds = time.perf_counter() - start
    print(json.dumps({"path": result.report.execution.path, "seconds": seconds, "peak_above_baseline": memory.peak_rss - baseline,
                      "baseline": baseline, "timings": result.report.timings, "pruned": result.report.totals.pruned}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--targets", default="qkv", help="qkv (the authors' full mode) or all-linear")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--child", choices=["in-memory", "sequential"], help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if not DATA.is_file():
        raise SystemExit(f"needs {DATA} (the shared BeaverTails pairs)")
    from antidote_llm.runtime.loading import _locate

    _locate(MODEL)  # converts the built-in GGUF once, outside the measured runs
    runs = {}
    out_dir = tempfile.mkdtemp(prefix="bench-offload-")
    for path in ("in-memory", "sequential"):
        command = [sys.executable, __file__, "--child", path, "--out-dir", out_dir, *sys.argv[1:]]
        line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        runs[path] = json.loads(line)
        run = runs[path]
        print(f"{path:>10}: {run['seconds']:.2f} s, peak RSS {run['peak_above_baseline'] / 2**20:.0f} MiB above the "
              f"post-import baseline ({run['baseline'] / 2**20:.0f} MiB); timings {run['timings']}")
    memory, sequential = runs["in-memory"], runs["sequential"]
    from safetensors.torch import load_file

    masks = [load_file(str(Path(out_dir) / path / "mask.safetensors")) for path in ("in-memory", "sequential")]
    differ = sum(int((masks[0][name] != masks[1][name]).sum()) for name in masks[0])
    shutil.rmtree(out_dir)
    print(f"masks: {len(masks[0])} tensors, {sum(m.numel() for m in masks[0].values()):,} weights, "
          f"{differ} differ between the two paths [0]")
    print(f"SmolLM2-135M-Instruct fp32, {args.rows} rows, targets {args.targets}, {args.threads} thread(s)")
    print(f"memory ratio (sequential / in-memory, above baseline): "
          f"{sequential['peak_above_baseline'] / memory['peak_above_baseline']:.3f} [<= 0.4]")
    print(f"time ratio (sequential / in-memory, load + statistics + selection + save): "
          f"{sequential['seconds'] / memory['seconds']:.3f} [<= 1.5]")


if __name__ == "__main__":
    main()
