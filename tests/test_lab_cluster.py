"""The lab beyond one process: the stage graph, stage locks, failure isolation, executors, Slurm resources."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from antidote_llm.cli.main import main
from antidote_llm.defenses import DEFENSES
from antidote_llm.errors import AntidoteError
from antidote_llm.lab import load_experiment, locks, run_experiment
from antidote_llm.lab.config import ClusterSpec
from antidote_llm.lab.executors import LocalExecutor, SubmititExecutor, check_shared_storage, make_executor
from antidote_llm.lab.graph import StageJob, run_graph, stage_states
from antidote_llm.lab.locks import JobHeartbeat, LockSet, is_stale, lock_path
from test_lab import experiment_file  # noqa: F401  (the tiny experiment fixture)

submitit = pytest.importorskip("submitit")
cloudpickle = pytest.importorskip("cloudpickle")
# The test's stage functions travel to the workers by value; so does the lock heartbeat around them, so that
# these workers need not import the package (torch, transformers: seconds each on a small machine).
cloudpickle.register_pickle_by_value(sys.modules[__name__])
cloudpickle.register_pickle_by_value(locks)

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"log": lambda _: None}


# --- generic stage functions (picklable, run in the workers) ------------------------------------------------


def write_stage(folder, *, seconds=0.0, fail=False):
    """A stage: records its process and when it ran, fails on request, appears atomically."""
    started = time.time()
    time.sleep(seconds)
    if fail:
        raise RuntimeError("boom in the stage")
    tmp = folder.with_name(f".{folder.name}.tmp")
    tmp.mkdir()
    import torch

    (tmp / "run.json").write_text(json.dumps({"pid": os.getpid(), "start": started, "end": time.time(),
                                              "threads": torch.get_num_threads()}))
    os.replace(tmp, folder)


def stage_fn(**options):
    return lambda folder: write_stage(folder, **options)


def _run(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def _graph(fail_c=True):
    """a -> b; c (fails) -> d -> e; f alone."""
    return [
        StageJob("a", "align", "1", stage_fn()),
        StageJob("b", "finetune", "1", stage_fn(), ("a-1",)),
        StageJob("c", "finetune", "1", stage_fn(fail=fail_c)),
        StageJob("d", "eval", "1", stage_fn(), ("c-1",)),
        StageJob("e", "defense", "1", stage_fn(), ("d-1",)),
        StageJob("f", "eval", "1", stage_fn()),
    ]


# --- the graph with real separate processes (submitit's local executor) -------------------------------------


def test_a_failing_stage_skips_its_dependents_only_and_a_rerun_retries_it(tmp_path):
    stages = tmp_path / "stages"
    executor = make_executor("processes", tmp_path, None)
    first = run_graph(_graph(), stages, executor, max_parallel=3, poll_s=0.05, **QUIET)
    assert sorted(first.ran) == ["a-1", "b-1", "f-1"]
    assert list(first.failed) == ["c-1"] and first.skipped == {"d-1": "c-1", "e-1": "d-1"}
    assert "RuntimeError: boom in the stage" in first.failed["c-1"]
    marker = json.loads((stages / "c-1.failed").read_text())
    assert "boom in the stage" in Path(marker["log"]).read_text()  # the job's own log, named in the marker
    assert {_run(stages / n)["pid"] for n in first.ran} & {os.getpid()} == set()  # each ran in another process
    states = {job.name: (state, detail) for job, state, detail in stage_states(_graph(), stages)}
    assert {n: s for n, (s, _) in states.items()} == {"a-1": "done", "b-1": "done", "c-1": "failed", "d-1": "pending",
                                                      "e-1": "pending", "f-1": "done"}
    assert marker["log"] in states["c-1"][1]
    assert not list(stages.glob("*.lock"))

    again = run_graph(_graph(fail_c=False), stages, executor, max_parallel=3, poll_s=0.05, **QUIET)
    assert sorted(again.ran) == ["c-1", "d-1", "e-1"] and not again.failed and not again.skipped
    assert not (stages / "c-1.failed").exists()
    assert _run(stages / "d-1")["start"] >= _run(stages / "c-1")["end"]  # a stage starts after what it needs


def test_max_parallel_bounds_the_stages_running_at_once(tmp_path):
    jobs = [StageJob(f"s{i}", "eval", "k", stage_fn(seconds=1.5)) for i in range(4)]
    run_graph(jobs, tmp_path / "stages", make_executor("processes", tmp_path, None), max_parallel=2, poll_s=0.05,
              **QUIET)
    spans = [_run(tmp_path / "stages" / job.name) for job in jobs]
    overlap = max(sum(s["start"] < t["end"] and t["start"] < s["end"] for s in spans) for t in spans)
    assert overlap == 2


def test_a_cancelled_stage_process_stops_with_everything_under_it(tmp_path):
    import psutil

    executor = make_executor("processes", tmp_path, None)
    handle = executor.submit("slow-1", "eval", stage_fn(seconds=120), tmp_path / "stages" / "slow-1")
    launcher = psutil.Process(int(handle.job.job_id))
    deadline = time.time() + 60
    while not launcher.children(recursive=True) and time.time() < deadline:  # the worker has started
        time.sleep(0.1)
    tree = [*launcher.children(recursive=True), launcher]
    assert len(tree) >= 2
    started = time.time()
    handle.cancel()
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert time.time() - started < 25 and not (tmp_path / "stages" / "slow-1").exists()


def test_stages_in_processes_share_the_cores(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)))
    jobs = [StageJob(f"s{i}", "eval", "k", stage_fn()) for i in range(2)]
    run_graph(jobs, tmp_path / "stages", make_executor("processes", tmp_path, None, max_parallel=3), max_parallel=3,
              poll_s=0.05, **QUIET)
    assert [_run(tmp_path / "stages" / job.name)["threads"] for job in jobs] == [2, 2]  # 8 cores // 3 stages
    assert make_executor("processes", tmp_path, None, max_parallel=16).threads == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert make_executor("processes", tmp_path, None, max_parallel=2).threads is None  # the user's setting stays


def test_the_local_executor_isolates_failures_in_one_process(tmp_path):
    stages = tmp_path / "stages"
    result = run_graph(_graph(), stages, LocalExecutor(logs=tmp_path / "logs"), **QUIET)
    assert sorted(result.ran) == ["a-1", "b-1", "f-1"] and list(result.failed) == ["c-1"]
    assert _run(stages / "a-1")["pid"] == os.getpid()
    assert "RuntimeError: boom in the stage" in (tmp_path / "logs" / "c-1.log").read_text()


def test_a_stage_locked_by_a_live_run_waits_and_a_stage_failed_there_is_not_rerun(tmp_path):
    stages = tmp_path / "stages"
    stages.mkdir()
    other = LockSet()
    lock = lock_path(stages, "a-1")
    assert other.acquire(lock)
    log = []
    jobs = [StageJob("a", "align", "1", stage_fn()), StageJob("f", "eval", "1", stage_fn())]

    def other_run_fails_a():  # the lock's holder fails the stage while this run waits for it
        time.sleep(0.3)
        (stages / "a-1.failed").write_text(json.dumps({"error": "OOM", "log": "x.log", "time": time.time()}))
        other.release(lock)

    import threading

    threading.Thread(target=other_run_fails_a).start()
    result = run_graph(jobs, stages, LocalExecutor(logs=tmp_path / "logs"), poll_s=0.05, log=log.append)
    assert result.ran == ["f-1"] and result.failed == {"a-1": "OOM (log: x.log)"}
    assert any(line.startswith("[waiting] a 1") for line in log)
    assert not (stages / "a-1").exists()


# --- locks ------------------------------------------------------------------------------------------------


def _write_lock(path, holder, age_s=0.0):
    path.write_text(json.dumps(holder))
    past = time.time() - age_s
    os.utime(path, (past, past))


def test_a_live_lock_holds_and_stale_locks_are_recovered(tmp_path):
    path = tmp_path / "x.lock"
    mine = LockSet()
    assert mine.acquire(path)
    assert not LockSet().acquire(path)  # held by a live process
    mine.release(path)
    assert not path.exists()

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    _write_lock(path, {"host": host, "pid": int(gone.stdout), "started": 1.0})
    assert is_stale(path, json.loads(path.read_text()))  # its process has ended
    recovered = LockSet()
    assert recovered.acquire(path)  # a killed run's lock is taken over at once
    recovered.release_all()
    _write_lock(path, {"host": host, "pid": os.getpid(), "started": 1.0})
    assert is_stale(path, json.loads(path.read_text()))  # the pid now belongs to another process
    _write_lock(path, {"host": "elsewhere", "pid": 1, "started": 1.0}, age_s=5)
    assert not is_stale(path, json.loads(path.read_text()))  # another host's holder with a recent heartbeat
    assert not LockSet().acquire(path)
    _write_lock(path, {"host": "elsewhere", "pid": 1, "started": 1.0}, age_s=3600)
    taker = LockSet()
    assert taker.acquire(path)  # no heartbeat for an hour: broken and taken
    assert json.loads(path.read_text())["pid"] == os.getpid()
    taker.release_all()


def test_a_stage_run_as_a_job_keeps_its_lock_after_its_driver_died(tmp_path):
    path = tmp_path / "x.lock"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = {"host": socket.gethostname(), "pid": int(gone.stdout), "started": 1.0, "job": True}
    _write_lock(path, holder, age_s=5)
    assert not is_stale(path, holder)  # the job may still run: only its heartbeat counts
    _write_lock(path, holder, age_s=3600)
    assert is_stale(path, holder)

    seen = []

    def work(folder):
        time.sleep(0.4)
        seen.append(time.time() - path.stat().st_mtime)

    JobHeartbeat(work, path, every_s=0.05)(tmp_path / "stage")
    assert seen[0] < 1  # the job refreshed the hour-old lock while it ran


def test_the_heartbeat_keeps_a_held_lock_fresh(tmp_path):
    path = tmp_path / "x.lock"
    locks = LockSet(heartbeat_s=0.05, stale_after_s=0.5)
    assert locks.acquire(path)
    past = time.time() - 100
    os.utime(path, (past, past))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 1
    locks.release_all()


def test_two_concurrent_lab_runs_never_run_a_stage_twice(experiment_file, tmp_path):  # noqa: F811
    _edit(experiment_file, lambda raw: raw.update(defenses={"none": {"method": "none"}}, evaluate_stages=["base"]))
    out = tmp_path / "runs"
    command = [sys.executable, "-m", "antidote_llm", "lab", "run", str(experiment_file), "--out", str(out), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    ran = [line.split()[1:3] for text in outputs for line in text.splitlines() if line.startswith("[run] ")]
    stages = sorted(p.name for p in (out / "stages").iterdir())
    assert sorted("-".join(r) for r in ran) == stages and len(stages) == 4  # every stage once, across both runs
    assert all("| fine-tuned | none |" in text for text in outputs)
    assert not list((out / "stages").glob("*.lock"))


# --- the lab's stages through the executors ------------------------------------------------------------------


def _edit(path, change):
    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _defense_folder(out, label):
    (folder,) = [p for p in (out / "stages").iterdir() if re.fullmatch(f"defense-{label}-[0-9a-f]{{16}}", p.name)]
    return folder


def _weights(out, label):
    return json.loads((_defense_folder(out, label) / "eval" / "metrics.json").read_text())["model"]["sha256"]


def test_a_failing_defense_is_reported_and_the_others_finish(experiment_file, tmp_path, monkeypatch, capsys):  # noqa: F811
    def broken(*args):
        raise RuntimeError("random defense broke")

    monkeypatch.setattr(DEFENSES["random"], "apply", broken)
    out = tmp_path / "runs"
    assert main(["lab", "run", str(experiment_file), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    (failed,) = [line for line in err.splitlines() if line.strip().startswith("failed")]
    assert "defense-random-" in failed and "random defense broke" in failed and str(out / "logs") in failed
    rows = [r["defense"] for r in json.loads((out / "results.json").read_text())["rows"]]
    assert rows == ["base", "aligned", "none", "antidote", "antidote-benign"]
    assert main(["lab", "status", str(experiment_file), "--out", str(out)]) == 0
    status = capsys.readouterr().out
    assert "7 done, 0 running, 1 failed, 0 pending" in status
    assert "random defense broke" in next(line for line in status.splitlines() if line.startswith("failed"))

    monkeypatch.undo()
    retried = run_experiment(load_experiment(experiment_file), out, progress=False, **QUIET)
    assert [n.rsplit("-", 1)[0] for n in retried.ran] == ["defense-random"] and len(retried.rows) == 6
    assert not (out / "stages" / f"{retried.ran[0]}.failed").exists()

    # a stage again in its own process (submitit's local executor): the same weights as in this process
    in_process = _weights(out, "antidote")
    folder = _defense_folder(out, "antidote")
    folder.rename(tmp_path / folder.name)
    result = run_experiment(load_experiment(experiment_file), out, progress=False, executor="processes", **QUIET)
    assert [n.rsplit("-", 1)[0] for n in result.ran] == ["defense-antidote"] and not result.failed
    assert _weights(out, "antidote") == in_process
    assert result.rows == retried.rows[:3] + result.rows[3:4] + retried.rows[4:] and result.rows[3]["defense"] == "antidote"


# --- Slurm: resources, refusals, shared storage, the missing package -----------------------------------------

FAKE_SBATCH = """#!/bin/sh
cp "$1" "{copy}"
if grep -q -- "--partition=nope" "$1"; then
  echo "sbatch: error: invalid partition specified: nope" >&2
  echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2
  exit 1
fi
echo "Submitted batch job 4242"
"""


def test_slurm_resources_reach_sbatch_and_a_refused_option_is_the_jobs_error(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(FAKE_SBATCH.format(copy=tmp_path / "submitted.sh"))
    sbatch.chmod(0o755)
    (bin_dir / "srun").symlink_to("/bin/true")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cluster = ClusterSpec(slurm={"default": {"partition": "gpu", "time": "1:30:00", "mem": "64G", "setup": ["module load cuda"]},
                                 "align": {"gpus": 2, "additional": {"exclusive": "user"}},
                                 "eval": {"partition": "nope"}})
    executor = SubmititExecutor(folder=tmp_path / "jobs", cluster=cluster, name="slurm")
    handle = executor.submit("align-abc", "align", stage_fn(), tmp_path / "stages" / "align-abc")
    script = (tmp_path / "submitted.sh").read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --mem=64G", "#SBATCH --time=90",
                 "#SBATCH --job-name=align-abc", "#SBATCH --exclusive=user", "module load cuda"):
        assert line in script, line
    assert handle.job.job_id == "4242"
    bare = SubmititExecutor(folder=tmp_path / "jobs", cluster=ClusterSpec(), name="slurm")
    bare.submit("align-abc", "align", stage_fn(), tmp_path / "stages" / "align-abc")
    assert "--time" not in (tmp_path / "submitted.sh").read_text()  # the partition's limit, not submitit's 5 minutes

    result = run_graph([StageJob("eval-base", "eval", "k", stage_fn())], tmp_path / "stages", executor, **QUIET)
    assert "invalid partition specified: nope" in result.failed["eval-base-k"]
    assert not list((tmp_path / "stages").glob("*.lock"))


def test_non_local_executors_refuse_storage_other_nodes_cannot_see(tmp_path, monkeypatch):
    from antidote_llm.lab import executors

    with pytest.raises(AntidoteError, match="only this machine sees"):
        check_shared_storage(Path("/tmp/somewhere"), acknowledged=True)
    monkeypatch.setattr(executors, "filesystem_of", lambda path: ("/scratch", "tmpfs"))
    with pytest.raises(AntidoteError, match="only this machine sees"):
        check_shared_storage(Path("/scratch/runs"), acknowledged=True)
    monkeypatch.setattr(executors, "filesystem_of", lambda path: ("/", "ext4"))
    with pytest.raises(AntidoteError, match="cluster.shared_storage: true"):
        check_shared_storage(Path("/home/me/runs"), acknowledged=False)
    check_shared_storage(Path("/home/me/runs"), acknowledged=True)
    monkeypatch.setattr(executors, "filesystem_of", lambda path: ("/home", "nfs4"))
    check_shared_storage(Path("/home/me/runs"), acknowledged=False)
    make_executor("processes", Path("/tmp/anything"), None)  # one machine: any folder will do


def test_cli_refusals_exit_2_before_any_stage(experiment_file, tmp_path, monkeypatch, capsys):  # noqa: F811
    out = tmp_path / "runs"
    if str(out.resolve()).startswith("/tmp/"):
        assert main(["lab", "run", str(experiment_file), "--out", str(out), "--executor", "slurm"]) == 2
        assert "only this machine sees" in capsys.readouterr().err
    assert main(["lab", "run", str(experiment_file), "--out", str(out), "--max-parallel", "0"]) == 2
    assert "--max-parallel must be at least 1" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "submitit", None)  # not installed
    assert main(["lab", "run", str(experiment_file), "--out", str(out), "--executor", "processes"]) == 2
    assert "pip install 'antidote-llm[slurm]'" in capsys.readouterr().err
    assert not (out / "stages").exists() or not any((out / "stages").iterdir())


BAD_CLUSTER = {
    "unknown stage family": {"slurm": {"aling": {"gpus": 1}}},
    "malformed time": {"slurm": {"default": {"time": "two hours"}}},
    "malformed memory": {"slurm": {"align": {"mem": "lots"}}},
    "unknown resource": {"slurm": {"align": {"gpu": 1}}},
}


@pytest.mark.parametrize("case", list(BAD_CLUSTER))
def test_bad_cluster_blocks_are_refused(case, experiment_file, capsys):  # noqa: F811
    _edit(experiment_file, lambda raw: raw.update(cluster=BAD_CLUSTER[case]))
    assert main(["lab", "status", str(experiment_file)]) == 2
    assert capsys.readouterr().err.startswith("antidote: error: ")


def test_slurm_time_formats():
    from antidote_llm.lab.config import SlurmResources

    minutes = {30: 30, "45": 45, "10:30": 11, "1:30:00": 90, "1-12": 2160, "1-00:30": 1470, "2-00:00:00": 2880}
    assert {t: SlurmResources(time=t).minutes for t in minutes} == minutes
