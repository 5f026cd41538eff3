"""`antidote lab run` and `antidote demo`."""

from __future__ import annotations

import argparse
import sys
from importlib.resources import files
from pathlib import Path

import yaml

from antidote_llm.lab import load_experiment, run_experiment
from antidote_llm.lab.config import parse_experiment
from antidote_llm.lab.executors import EXECUTORS
from antidote_llm.lab.graph import STATES
from antidote_llm.lab.runner import experiment_status

DEMO_CONFIG = files("antidote_llm.lab") / "demo.yaml"  # package data, beside the lab that runs it


def _out_dir(args: argparse.Namespace) -> Path:
    path = Path(args.experiment)
    return Path(args.out) if args.out else path.parent / f"{path.stem}-runs"


def run_lab(args: argparse.Namespace) -> int:
    experiment = load_experiment(args.experiment)
    result = run_experiment(experiment, _out_dir(args), progress=not args.quiet, executor=args.executor,
                            max_parallel=args.max_parallel)
    print(result.files["markdown"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in result.files.values()))
    if not (result.failed or result.skipped):
        return 0
    print(f"antidote: {len(result.failed)} stage(s) failed, {len(result.skipped)} skipped; "
          "the table lacks their rows; run the same command again to retry them", file=sys.stderr)
    for name, why in result.failed.items():
        print(f"  failed  {name}: {why}", file=sys.stderr)
    for name, need in result.skipped.items():
        print(f"  skipped {name}: needs {need}", file=sys.stderr)
    return 1


def lab_status(args: argparse.Namespace) -> int:
    states = experiment_status(load_experiment(args.experiment), _out_dir(args))
    for job, state, detail in states:
        print(f"{state:8} {job.name}" + (f"  {detail}" if detail else ""))
    counts = {state: sum(1 for _, s, _ in states if s == state) for state in STATES}
    print(", ".join(f"{n} {state}" for state, n in counts.items()))
    return 0


def demo_experiment(data_dir: Path):
    raw = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
    return parse_experiment(raw, data_dir, "built-in demo config")


def run_demo(args: argparse.Namespace) -> int:
    from antidote_llm.lab.demo import build_demo_data, demo_data_current

    out = Path(args.out)
    data_dir = out / "data"
    if not demo_data_current(data_dir, args.seed):  # absent, or written by another version or seed
        build_demo_data(data_dir, seed=args.seed, overwrite=True)
    experiment = demo_experiment(data_dir)
    (out / "experiment.yaml").write_text(yaml.safe_dump(experiment.model_dump(mode="json", exclude={"cluster"}), sort_keys=False), encoding="utf-8")
    result = run_experiment(experiment, out, progress=not args.quiet)
    print()
    print(result.files["markdown"].read_text(encoding="utf-8"))
    for row in result.rows:
        if row.get("verdict"):
            print(f"{row['defense']}: {row['verdict'].upper()}: {row['verdict_reason']}")
    print()
    print(DEMO_NOTE)
    print("wrote " + ", ".join(str(p) for p in result.files.values()))
    return 0


DEMO_NOTE = """How to read this table (all numbers measured in this run, nothing fixed in advance):
- HS: share of held-out harmful requests the model did not refuse (refusal-phrase judge), with its 95%
  interval (Wilson). Lower is safer.
- degenerate: share of answers that are empty, repetitive or one or two words (e.g. a sentiment label);
  a pruned model that babbles is broken, not safe.
- complies: share of answers that neither refuse nor are degenerate: genuine attempts to answer.
- FA: accuracy on the held-out sentiment rows the user fine-tuned for, with its 95% interval. Higher is better.
- base -> aligned shows the alignment stage; 'none' is the poisoned fine-tune as the user got it.
- guard decided on other rows (probe prompts, validation rows drawn from the test file), never on these:
  safe (shipped as it is), repaired (shipped pruned at the ratio shown), or rejected (nothing is shipped; the
  demo keeps the best candidate, the smallest ratio meeting the safety target or else the largest searched, so
  its row shows what it does here). guard-random is the control: the same search with random scores."""


def register(subparsers) -> None:
    lab = subparsers.add_parser("lab", help="run experiments: align, poison, defend, evaluate, compare")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True, metavar="COMMAND")
    run = lab_sub.add_parser("run", help="run every stage of an experiment file (cached, resumable)")
    run.add_argument("experiment", help="experiment YAML (see examples/)")
    run.add_argument("--out", help="output folder (default: beside the file, NAME-runs)")
    run.add_argument("--quiet", action="store_true")
    run.add_argument("--executor", choices=EXECUTORS, default="local",
                     help="local: every stage in this process; processes: one process per stage on this machine; "
                          "slurm: one Slurm job per stage (resources from the file's cluster block); "
                          "the last two need pip install 'antidote-llm[slurm]'")
    run.add_argument("--max-parallel", type=int, default=1, metavar="N",
                     help="stages running at once (processes, slurm); a stage starts once the stages it needs are done")
    run.set_defaults(func=run_lab)

    status = lab_sub.add_parser("status", help="which stages of an experiment are done, running, failed or pending")
    status.add_argument("experiment", help="experiment YAML")
    status.add_argument("--out", help="output folder (default: beside the file, NAME-runs)")
    status.set_defaults(func=lab_status)

    demo = subparsers.add_parser(
        "demo", help="the whole story on SmolLM2-135M with generated data (about 8 minutes on 2 CPU cores)",
    )
    demo.add_argument("--out", default="antidote-demo", help="output folder; a re-run reuses its finished stages")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=run_demo)
