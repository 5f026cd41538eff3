"""Run an experiment: every stage once per distinct configuration, cached under a hash of its inputs.

A stage's folder appears only when the stage has finished (it is written atomically), so a re-run
or a grown sweep reuses finished stages and an interrupted run resumes where it stopped. The sweep is
planned first as a graph of stage jobs (graph.py), then an executor (executors.py) runs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from antidote_llm.errors import AntidoteError
from antidote_llm.frontier.disk import PLOT_FILE
from antidote_llm.lab.config import Experiment
from antidote_llm.lab.executors import make_executor
from antidote_llm.lab.graph import StageJob, run_graph, stage_states
from antidote_llm.lab.plan import STAGES_DIR, plan_experiment
from antidote_llm.lab.results import write_results
from antidote_llm.runtime.outputs import check_writable


@dataclass
class LabResult:
    out_dir: Path
    rows: list[dict]
    files: dict[str, Path] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)  # stage folders computed in this run (the rest were cached)
    failed: dict[str, str] = field(default_factory=dict)  # stage folder -> its error and log path
    skipped: dict[str, str] = field(default_factory=dict)  # stage folder -> the failed stage it needed


def run_experiment(experiment: Experiment, out_dir: str | Path, *, progress: bool = True,
                   log: Callable[[str], None] = print, executor: str = "local", max_parallel: int = 1) -> LabResult:
    """Run every stage of the sweep not finished yet, then write results.csv, results.md and the plots into `out_dir`.

    `executor`: local (this process), processes (one process per stage) or slurm (one job per stage); a failing
    stage is reported in LabResult.failed, the stages that need it are skipped, and the rest run.
    """
    if max_parallel < 1:
        raise AntidoteError(f"--max-parallel must be at least 1, got {max_parallel}")
    out = Path(out_dir).resolve()
    check_writable(out)
    runner = make_executor(executor, out, experiment.cluster, max_parallel=max_parallel)
    plan = plan_experiment(experiment, out, progress=progress)
    for index, setting in enumerate(plan.settings, 1):
        if setting.values:
            log(f"setting {index}/{len(plan.settings)}: " + ", ".join(f"{k}={v}" for k, v in setting.values.items()))
    graph = run_graph(plan.jobs, out / STAGES_DIR, runner, max_parallel=max_parallel, log=log)
    lost = set(graph.failed) | set(graph.skipped)
    rows = [row.read() for row in plan.rows if lost.isdisjoint(row.needs)]
    files = write_results(rows, out, list(experiment.sweep), experiment.model_dump(mode="json", exclude={"cluster"}))
    for index, setting in enumerate(plan.settings):
        for label, folder in setting.defense_folders.items():
            if (folder / PLOT_FILE).is_file():
                files[f"frontier-{label}" + (f"-{index + 1}" if len(plan.settings) > 1 else "")] = folder / PLOT_FILE
    return LabResult(out_dir=out, rows=rows, files=files, ran=graph.ran, failed=graph.failed, skipped=graph.skipped)


def experiment_status(experiment: Experiment, out_dir: str | Path) -> list[tuple[StageJob, str, str]]:
    """(stage job, done | running | failed | pending, detail) for every stage of the experiment."""
    plan = plan_experiment(experiment, out_dir, progress=False)
    return stage_states(plan.jobs, Path(out_dir).resolve() / STAGES_DIR)
