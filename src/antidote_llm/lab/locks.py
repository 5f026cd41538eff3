"""One lock file per stage, so that two runs of one experiment sharing a stages folder never run a stage twice.

A lock is a file created atomically (O_CREAT | O_EXCL, which NFS v3+ and the cluster filesystems honour)
holding its holder's host, pid, process start time and a random token. The holder refreshes the file's
modification time while it holds it (a heartbeat); so does the job running the stage when it runs in
another process or on another machine (JobHeartbeat). A lock is stale, and is broken by the next run that
wants the stage, when nobody keeps it: the heartbeat is older than STALE_AFTER_S; or, for a stage run in
the holder's own process, the holder is on this host and its process no longer exists (or the pid now
belongs to a later process). A stage run as a job outlives its driving process, so only its heartbeat
counts.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

STALE_AFTER_S = 600.0  # ten missed heartbeats
HEARTBEAT_S = 60.0
LOCK_SUFFIX = ".lock"


def lock_path(stages: Path, name: str) -> Path:
    return stages / f"{name}{LOCK_SUFFIX}"


def _process_started() -> float:
    return psutil.Process(os.getpid()).create_time()


def _holder_alive(holder: dict) -> bool:
    """Whether the process that wrote `holder` still runs; only answerable on its own host."""
    try:
        return psutil.Process(holder["pid"]).create_time() == holder["started"]
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError):
        return False


def read_lock(path: Path) -> tuple[str, dict] | None:
    """(raw text, holder) of the lock at `path`, or None when there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:  # a holder that died between creating and writing the file
        holder = {}
    return text, holder if isinstance(holder, dict) else {}


def is_stale(path: Path, holder: dict, *, now: float | None = None, stale_after_s: float = STALE_AFTER_S) -> bool:
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return True
    if age > stale_after_s:
        return True
    if holder.get("job"):  # the job's own heartbeat keeps it
        return False
    if holder.get("host") == socket.gethostname():
        return not _holder_alive(holder)
    # Another host's holder: only its heartbeat tells; a lock written moments ago may still be half-written.
    return not holder and age > HEARTBEAT_S


def _break(path: Path, seen: str) -> None:
    """Remove the stale lock whose text was `seen`, never a fresh one another run created meanwhile."""
    grave = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return  # another run broke it first
    if grave.read_text(encoding="utf-8") != seen:  # we moved a fresh lock: put it back unless a third run took the slot
        with contextlib.suppress(FileExistsError):
            os.link(grave, path)
    grave.unlink()


class LockSet:
    """The stage locks this process holds, with a heartbeat thread that keeps them fresh."""

    def __init__(self, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.held: dict[Path, str] = {}
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self._guard = threading.Lock()
        self._stop: threading.Event | None = None  # set: the heartbeat thread ends
        self._me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_started()}

    def acquire(self, path: Path, *, job: bool = False) -> bool:
        """Take the lock at `path`; False when a live holder has it. A stale lock is broken and taken.

        `job`: the stage runs as a job elsewhere, which keeps the lock fresh itself (JobHeartbeat)."""
        for _ in range(2):
            text = json.dumps({**self._me, "job": job, "time": time.time(), "token": uuid.uuid4().hex})
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                found = read_lock(path)
                if found is not None and not is_stale(path, found[1], stale_after_s=self.stale_after_s):
                    return False
                if found is not None:
                    _break(path, found[0])
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            with self._guard:
                self.held[path] = text
            self._start_heartbeat()
            return True
        return False

    def release(self, path: Path) -> None:
        with self._guard:
            text = self.held.pop(path, None)
        found = read_lock(path)
        if text is not None and found is not None and found[0] == text:
            path.unlink(missing_ok=True)

    def release_all(self) -> None:
        for path in list(self.held):
            self.release(path)
        if self._stop is not None:
            self._stop.set()
            self._stop = None

    def _start_heartbeat(self) -> None:
        if self._stop is None:
            self._stop = threading.Event()
            threading.Thread(target=self._beat, args=(self._stop,), name="stage-lock-heartbeat", daemon=True).start()

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            with self._guard:
                paths = list(self.held)
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.utime(path)


@dataclass(frozen=True)
class JobHeartbeat:
    """A stage's work run as a job, refreshing the stage's lock while it runs (picklable, like the work)."""

    work: Callable[[Path], None]
    lock: Path
    every_s: float = HEARTBEAT_S

    def __call__(self, folder: Path) -> None:
        stop = threading.Event()

        def beat():
            while not stop.wait(self.every_s):
                with contextlib.suppress(FileNotFoundError):
                    os.utime(self.lock)

        threading.Thread(target=beat, name="stage-lock-heartbeat", daemon=True).start()
        try:
            self.work(folder)
        finally:
            stop.set()
