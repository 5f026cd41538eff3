"""Where stage jobs run: in this process (`local`), one process each on this machine (`processes`, submitit's
local executor), or one Slurm job each (`slurm`, through submitit). One registry; the scheduler is the same."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil

from antidote_llm.errors import AntidoteError
from antidote_llm.lab.config import ClusterSpec, SlurmResources

JOBS_DIR = "jobs"  # submitit's pickles and logs, beside the stages folder
LOCAL_LOGS_DIR = "logs"
NO_TIME_LIMIT_MIN = 60 * 24 * 365  # the processes executor never cuts a stage short


class Handle(Protocol):
    log: Path | None

    def done(self) -> bool: ...

    def error(self) -> str | None:
        """After done(): None when the stage succeeded, else its error in one line."""

    def cancel(self) -> None: ...


class Executor(Protocol):
    name: str
    in_process: bool  # stages run in this process (else as jobs that outlive it)
    remote_workers: bool  # workers may sit on other machines: the stages folder must be shared storage

    def submit(self, name: str, family: str, work: Callable[[Path], None], folder: Path) -> Handle: ...


# --- in this process --------------------------------------------------------------------------------------


@dataclass
class _Finished:
    log: Path | None = None
    message: str | None = None

    def done(self) -> bool:
        return True

    def error(self) -> str | None:
        return self.message

    def cancel(self) -> None:
        pass


@dataclass
class LocalExecutor:
    """Each stage in this process, one after another, as the lab always ran (an interrupt stops the run)."""

    logs: Path
    name: str = "local"
    in_process: bool = True
    remote_workers: bool = False

    def submit(self, name, family, work, folder) -> Handle:
        try:
            work(folder)
        except Exception as exc:  # a failing stage is reported; its dependents are skipped, the rest go on
            self.logs.mkdir(parents=True, exist_ok=True)
            log = self.logs / f"{name}.log"
            log.write_text(traceback.format_exc(), encoding="utf-8")
            return _Finished(log=log, message=_one_line(exc))
        return _Finished()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}".rstrip(": ")


# --- submitit (processes on this machine, Slurm jobs) -------------------------------------------------------


def _submitit(executor: str):
    try:
        import submitit
    except ImportError:
        raise AntidoteError(
            f"executor {executor!r} needs the submitit package; pip install 'antidote-llm[slurm]'"
        ) from None
    return submitit


def stage_threads(max_parallel: int) -> int | None:
    """Threads for each of `max_parallel` stages sharing this machine's cores: their share, so they do not fight
    over them (two stages of two threads on two cores run several times slower than of one each). None when the
    user set OMP_NUM_THREADS (theirs is kept)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS: no affinity
    return max(1, cores // max_parallel)


@dataclass(frozen=True)
class _WithThreads:
    """A stage's work run with a number of torch threads (set in the stage's own process)."""

    work: Callable[[Path], None]
    threads: int

    def __call__(self, folder: Path) -> None:
        import torch

        torch.set_num_threads(self.threads)
        return self.work(folder)


STOP_GRACE_S = 10.0  # a stopped local stage gets this long to clean up after Ctrl-C before it is killed


def stop_process_tree(pid: int, grace_s: float = STOP_GRACE_S) -> None:
    """Stop a local job and every process under it: Ctrl-C first (the stage removes its temporary output),
    then a kill for what still runs after `grace_s`. submitit's own cancel only signals its launcher."""
    try:
        root = psutil.Process(pid)
        tree = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGINT)
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=grace_s)  # a kill is not instant: return once they are gone


@dataclass
class _SubmititHandle:
    job: object
    local: bool = False  # the processes executor: the job id is the pid of a process on this machine

    @property
    def log(self) -> Path | None:
        return Path(self.job.paths.stderr)

    def done(self) -> bool:
        return self.job.done()

    def error(self) -> str | None:
        exc = self.job.exception()
        if exc is None:
            return None
        # submitit quotes the job's traceback between rules, then names the log files: the traceback's last line
        quoted = str(exc).split("-" * 22)
        lines = [line.strip() for line in (quoted[1] if len(quoted) > 2 else str(exc)).splitlines() if line.strip()]
        return lines[-1] if lines else type(exc).__name__

    def cancel(self) -> None:
        if self.local:
            stop_process_tree(int(self.job.job_id))
        else:
            self.job.cancel(check=False)


def slurm_parameters(resources: SlurmResources, name: str) -> dict:
    """submitit SlurmExecutor parameters for one stage; unset resources are left to the cluster's defaults."""
    given = {
        "partition": resources.partition, "gpus_per_node": resources.gpus, "cpus_per_task": resources.cpus,
        "mem": resources.mem, "account": resources.account, "qos": resources.qos, "constraint": resources.constraint,
    }
    params = {key: value for key, value in given.items() if value is not None}
    # submitit asks for 5 minutes unless told; None leaves the limit to the partition's default
    params["time"] = resources.minutes
    params["job_name"] = name
    if resources.setup:
        params["setup"] = list(resources.setup)
    if resources.additional:
        params["additional_parameters"] = dict(resources.additional)
    return params


@dataclass
class SubmititExecutor:
    """One submitit job per stage: `slurm` submits to Slurm, `processes` starts a local process per stage."""

    folder: Path
    cluster: ClusterSpec
    name: str = "slurm"
    remote_workers: bool = True
    in_process: bool = False
    threads: int | None = None  # processes: torch threads per stage (None: torch's default)
    _executors: dict = field(default_factory=dict)

    def __post_init__(self):
        self._submitit = _submitit(self.name)
        if self.name == "slurm" and not all(shutil.which(command) for command in ("sbatch", "srun")):
            raise AntidoteError("executor 'slurm' finds no Slurm here (sbatch, srun); run on a node of the cluster "
                                "that submits jobs, or choose --executor processes")

    def _executor(self, family: str, name: str):
        if self.name == "processes":
            executor = self._executors.get("processes")
            if executor is None:
                executor = self._submitit.LocalExecutor(folder=self.folder / "%j")
                # every stage sees the GPUs this process sees (submitit's local executor hides them otherwise)
                executor.update_parameters(timeout_min=NO_TIME_LIMIT_MIN, gpus_per_node=_visible_gpus())
                self._executors["processes"] = executor
            return executor
        executor = self._submitit.SlurmExecutor(folder=self.folder / "%j")
        executor.update_parameters(**slurm_parameters(self.cluster.slurm_resources(family), name))
        return executor

    def submit(self, name, family, work, folder) -> Handle:
        if self.threads is not None:
            work = _WithThreads(work, self.threads)
        return _SubmititHandle(self._executor(family, name).submit(work, folder), local=self.name == "processes")


def _visible_gpus() -> int:
    if "torch" not in sys.modules:
        return 0
    torch = sys.modules["torch"]
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


EXECUTORS = ("local", "processes", "slurm")


def make_executor(name: str, out: Path, cluster: ClusterSpec | None, max_parallel: int = 1) -> Executor:
    """The executor `name`; stages of `processes` share this machine's cores (stage_threads)."""
    cluster = cluster or ClusterSpec()
    if name == "local":
        return LocalExecutor(logs=out / LOCAL_LOGS_DIR)
    if name in ("processes", "slurm"):
        remote = name == "slurm"
        if remote:
            check_shared_storage(out, cluster.shared_storage)
        return SubmititExecutor(folder=out / JOBS_DIR, cluster=cluster, name=name, remote_workers=remote,
                                threads=None if remote else stage_threads(max_parallel))
    raise AntidoteError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")


# --- the shared-storage rule ------------------------------------------------------------------------------

NETWORK_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "smbfs", "ceph", "cephfs", "glusterfs",
                       "fuse.glusterfs", "fuse.cephfs", "fuse.sshfs", "wekafs", "panfs", "pvfs2", "orangefs", "9p",
                       "afs", "fuse.juicefs", "fuse.s3fs", "virtiofs")
NODE_LOCAL_FILESYSTEMS = ("tmpfs", "ramfs", "devtmpfs", "overlay", "squashfs", "aufs")
NODE_LOCAL_PATHS = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), Path("/run"))


def filesystem_of(path: Path) -> tuple[str, str]:
    """(mount point, filesystem type) holding `path` (or, when it does not exist yet, its nearest parent)."""
    path = path.resolve()
    best = ("/", "")
    for part in psutil.disk_partitions(all=True):
        mount = Path(part.mountpoint)
        if (path == mount or mount in path.parents) and len(part.mountpoint) >= len(best[0]):
            best = (part.mountpoint, part.fstype)
    return best


def check_shared_storage(out: Path, acknowledged: bool) -> None:
    """Refuse an output folder other machines cannot see; a local-disk filesystem needs the experiment's say-so."""
    resolved = out.resolve()
    mount, fstype = filesystem_of(resolved)
    local_path = next((p for p in NODE_LOCAL_PATHS if p == resolved or p in resolved.parents), None)
    if fstype in NODE_LOCAL_FILESYSTEMS or local_path is not None:
        where = f"under {local_path}" if local_path is not None else f"on {fstype} ({mount})"
        raise AntidoteError(
            f"output folder {resolved} is {where}, which only this machine sees; choose --out on storage "
            f"shared by the cluster's nodes (e.g. an NFS or Lustre home or project folder)"
        )
    if fstype not in NETWORK_FILESYSTEMS and not acknowledged:
        raise AntidoteError(
            f"output folder {resolved} is on {fstype or 'an unknown filesystem'} ({mount}), which may be local to "
            f"this machine; if every node sees it, set cluster.shared_storage: true in the experiment file"
        )

