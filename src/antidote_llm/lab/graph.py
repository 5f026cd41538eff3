"""The stage graph: stage jobs with their dependencies, run by an executor, cached on disk, one run per stage.

A stage's folder in the stages folder appears only when the stage has finished (it is written atomically);
then its completion record (done.json in it: the sha256 of every other file) is written last. A stage is done
only when its folder matches its record: a folder damaged since (a file truncated, deleted or rewritten) is
reported, naming the file, and computed again, with every stage that needs it. A run takes a stage's lock
(locks.py) before running it, so two runs of one experiment at once never run a stage twice; a run that
finds a stage locked waits for it. A failing stage leaves a failure marker (NAME.failed, with its error and
log path); stages that need it are skipped, the others go on. A later run retries failed stages.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from antidote_llm.errors import AntidoteError
from antidote_llm.lab.executors import Executor, Handle
from antidote_llm.lab.locks import JobHeartbeat, LockSet, is_stale, lock_path, read_lock
from antidote_llm.runtime.outputs import write_json

FAILED_SUFFIX = ".failed"
DONE_FILE = "done.json"
POLL_S = 0.5


def stage_key(*parts) -> str:
    """A short, stable hash of everything that determines a stage's output, this package's version included."""
    from antidote_llm.runtime.version import __version__

    payload = json.dumps([__version__, *(p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts)],
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StageJob:
    """One stage: `work(folder)` writes its folder atomically from `needs` (stage folder names) on disk.

    `work` must be picklable (executors other than `local` run it in another process or on another machine).
    `family` (align | finetune | eval | defense) chooses its cluster resources; `kind` prefixes its folder.
    """

    kind: str
    family: str
    key: str
    work: Callable[[Path], None]
    needs: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.key}"


def check_inside(jobs: list[StageJob], stages: Path) -> None:
    """Refuse a stage whose folder would not be a child of the stages folder (a name that climbs out of it)."""
    root = stages.resolve()
    for job in jobs:
        if (root / job.name).resolve().parent != root:
            raise AntidoteError(f"stage {job.name!r} would be written outside {root}; rename what it is named after")


@dataclass
class GraphRun:
    ran: list[str] = field(default_factory=list)  # stages computed by this run
    failed: dict[str, str] = field(default_factory=dict)  # stage -> its error and log
    skipped: dict[str, str] = field(default_factory=dict)  # stage -> the failed stage it needs


def failure_path(stages: Path, name: str) -> Path:
    return stages / f"{name}{FAILED_SUFFIX}"


def _file_hashes(folder: Path) -> dict[str, str]:
    hashes = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / DONE_FILE):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        hashes[str(path.relative_to(folder))] = digest.hexdigest()
    return hashes


def record_done(stages: Path, name: str) -> None:
    """Write the completion record of a finished stage: what its folder holds, file by file."""
    write_json(stages / name / DONE_FILE, {"files": _file_hashes(stages / name)})


def damage(stages: Path, name: str) -> str | None:
    """Why the stage's folder is not the finished stage (None: it is): no record, or a file that differs."""
    record = stages / name / DONE_FILE
    try:
        expected = json.loads(record.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its completion record {record.name} is missing or unreadable"
    found = _file_hashes(stages / name)
    for file, digest in expected.items():
        if file not in found:
            return f"{file} is missing"
        if found[file] != digest:
            return f"{file} was changed since the stage finished"
    extra = sorted(set(found) - set(expected))
    return f"{extra[0]} was added since the stage finished" if extra else None


def _set_aside(stages: Path, name: str) -> None:
    """Remove a damaged stage (folder and record), so the stage runs again."""
    folder = stages / name
    aside = stages / f".{name}.damaged-{os.getpid()}"
    os.replace(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _failure_text(record: dict) -> str:
    log = f" (log: {record['log']})" if record.get("log") else ""
    return f"{record.get('error') or 'failed'}{log}"


def read_failure(stages: Path, name: str) -> dict | None:
    try:
        return json.loads(failure_path(stages, name).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_graph(jobs: list[StageJob], stages: Path, executor: Executor, *, max_parallel: int = 1,
              log: Callable[[str], None] = print, poll_s: float = POLL_S) -> GraphRun:
    """Run every job not finished yet, each after the jobs it needs, at most `max_parallel` at once."""
    check_inside(jobs, stages)
    stages.mkdir(parents=True, exist_ok=True)
    result = GraphRun()
    started = time.time()
    done: set[str] = set()
    pending = list(jobs)
    running: dict[str, tuple[StageJob, Handle, float]] = {}
    waiting: set[str] = set()
    locks = LockSet()
    try:
        while pending or running:
            progressed = _collect(running, stages, locks, result, done, log)
            for job in list(pending):
                if len(running) >= max_parallel:
                    break
                state = _start(job, stages, executor, locks, result, done, running, waiting, started, log)
                if state != "wait":
                    pending.remove(job)
                    progressed = True
            if not progressed:
                time.sleep(poll_s)
    finally:
        for job, handle, _ in running.values():  # an interrupted run stops the jobs it started
            with contextlib.suppress(Exception):
                handle.cancel()
            log(f"[stopped] {job.kind} {job.key}")
        locks.release_all()
    return result


def _start(job, stages, executor, locks, result, done, running, waiting, started, log) -> str:
    """Start `job` if it can: 'done' (cached), 'skip', 'failed', 'run', or 'wait' (needs or lock not free)."""
    blocked = next((need for need in job.needs if need in result.failed or need in result.skipped), None)
    if blocked is not None:
        result.skipped[job.name] = blocked
        log(f"[skipped] {job.kind} {job.key}: needs {blocked}, which failed")
        return "skip"
    if not all(need in done for need in job.needs):
        return "wait"
    folder = stages / job.name
    if folder.is_dir() and _problem(job, stages, result) is None:
        done.add(job.name)
        log(f"[cached] {job.kind} {job.key}")
        return "done"
    failure = read_failure(stages, job.name)
    if failure is not None and failure.get("time", 0) >= started:  # another run failed it while this one waited
        result.failed[job.name] = _failure_text(failure)
        log(f"[failed] {job.kind} {job.key} in another run: {result.failed[job.name]}")
        return "failed"
    lock = lock_path(stages, job.name)
    if not locks.acquire(lock, job=not executor.in_process):
        if job.name not in waiting:
            waiting.add(job.name)
            log(f"[waiting] {job.kind} {job.key}: another run is computing it")
        return "wait"
    if folder.is_dir():  # under the lock: finished by another run meanwhile, or damaged
        problem = _problem(job, stages, result)
        if problem is None:
            locks.release(lock)
            done.add(job.name)
            log(f"[cached] {job.kind} {job.key}")
            return "done"
        log(f"[damaged] {job.kind} {job.key}: {problem}; computing it again")
        _set_aside(stages, job.name)
    log(f"[run] {job.kind} {job.key}")
    started_s = time.perf_counter()
    try:
        work = job.work if executor.in_process else JobHeartbeat(job.work, lock)
        handle = executor.submit(job.name, job.family, work, folder)
    except Exception as exc:  # e.g. an option the cluster refuses: the job's error
        _fail(job, stages, locks, result, log, f"submission refused: {exc}".splitlines()[0], None)
        return "failed"
    running[job.name] = (job, handle, started_s)
    return "run"


def _problem(job: StageJob, stages: Path, result: GraphRun) -> str | None:
    """Why a stage's folder is not the finished stage (None: it is): it does not match its record, or a stage it
    needs was computed again by this run (it was made from what that stage held before)."""
    recomputed = next((need for need in job.needs if need in result.ran), None)
    return damage(stages, job.name) if recomputed is None else f"it needs {recomputed}, computed again"


def _collect(running, stages, locks, result, done, log) -> bool:
    """Take in the jobs that ended; True when any did."""
    ended = False
    for name, (job, handle, t0) in list(running.items()):
        if not handle.done():
            continue
        ended = True
        del running[name]
        error = handle.error()
        if error is None and not (stages / name).is_dir():
            error = "the job ended without writing its stage folder"
        if error is None:
            record_done(stages, name)
            done.add(name)
            result.ran.append(name)
            failure_path(stages, name).unlink(missing_ok=True)
            locks.release(lock_path(stages, name))
            log(f"[done] {job.kind} {job.key} in {time.perf_counter() - t0:.0f}s")
        else:
            _fail(job, stages, locks, result, log, error, handle.log)
    return ended


def _fail(job, stages, locks, result, log, error: str, log_path: Path | None) -> None:
    record = {"error": error, "log": str(log_path) if log_path else None, "host": socket.gethostname(), "time": time.time()}
    write_json(failure_path(stages, job.name), record)
    locks.release(lock_path(stages, job.name))
    result.failed[job.name] = _failure_text(record)
    log(f"[failed] {job.kind} {job.key}: {result.failed[job.name]}")


STATES = ("done", "running", "failed", "pending")


def stage_states(jobs: list[StageJob], stages: Path) -> list[tuple[StageJob, str, str]]:
    """(job, state, detail) per job: done, running (a live lock: who holds it), failed (error and log), pending."""
    rows = []
    for job in jobs:
        if (stages / job.name).is_dir():
            problem = damage(stages, job.name)
            rows.append((job, "done", "") if problem is None else (job, "pending", f"damaged: {problem}"))
            continue
        lock = lock_path(stages, job.name)
        found = read_lock(lock)
        if found is not None and not is_stale(lock, found[1]):
            holder = found[1]
            rows.append((job, "running", f"by pid {holder.get('pid')} on {holder.get('host')}"))
            continue
        failure = read_failure(stages, job.name)
        if failure is not None:
            rows.append((job, "failed", _failure_text(failure)))
            continue
        rows.append((job, "pending", "stale lock, recovered by the next run" if found is not None else ""))
    return rows
