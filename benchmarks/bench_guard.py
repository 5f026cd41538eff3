"""What guard's search costs, in evaluations of the un-repaired model on the same sets, measured in one run.

One evaluation of the un-repaired model is what a sweep pays per point: every probe prompt answered in full and
every validation row. Guard pays its scoring pass, then only the evaluations the decision needs: a bisection
over the ratios, each probe evaluation stopping once its outcome is known (goal: the search costs at most 4
such evaluations). Reads the demo's stages, so run the demo first:

    antidote demo --out antidote-demo && python benchmarks/bench_guard.py --demo antidote-demo [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from antidote_llm.cli.lab import demo_experiment  # noqa: E402
from antidote_llm.defenses import defense  # noqa: E402
from antidote_llm.frontier.guard import run_guard, split_settings  # noqa: E402
from antidote_llm.lab.data import SettingData  # noqa: E402
from antidote_llm.runtime.loading import ModelSource, load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="antidote-demo", help="the demo's output folder (its stages are reused)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.demo)
    experiment = demo_experiment(out / "data")
    data = SettingData(experiment)
    stages = out / "stages"
    aligned = next(stages.glob("align-*")) / "merged"
    adapter = next(stages.glob("finetune-*")) / "adapter"
    source = ModelSource(str(aligned), adapters=(str(adapter),), dtype="float32", device="cpu")
    settings = defense("guard").configure(experiment.defenses["guard"].options,
                                          {"template": experiment.model.template, "seed": experiment.seed})
    selection, decision = split_settings(settings)
    loaded = load_model(source, keep_adapter=True)
    probe = data.validation

    started = time.perf_counter()
    probe.run(loaded.model, loaded.tokenizer, progress=False, fingerprint=False)
    full = time.perf_counter() - started

    started = time.perf_counter()
    outcome = run_guard(loaded.model, loaded.tokenizer, selection, decision, data.inputs["safe"], probe,
                        contrast_data=data.user_rows)
    total = time.perf_counter() - started
    result = outcome.result
    evaluations = result.cost["probe_s"] + result.cost["validation_s"]
    print(f"SmolLM2-135M, demo stages, {len(probe.prompts)} probe prompts, {len(probe.rows)} validation rows, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"one evaluation of the un-repaired model (every prompt in full, every row): {full:.1f} s")
    print(f"guard: verdict {result.verdict} at ratio {result.ratio}; {len(result.search)} ratios searched of "
          f"{len(decision.ratios)}; {result.cost['probe_answers']} probe answers and "
          f"{result.cost['validation_answers']} validation answers")
    print(f"  its evaluations: {evaluations:.1f} s = {evaluations / full:.2f} un-repaired evaluations  [goal <= 4]")
    print(f"  with the scoring pass: {total:.1f} s = {total / full:.2f} un-repaired evaluations")


if __name__ == "__main__":
    main()
