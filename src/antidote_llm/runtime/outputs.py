"""Atomic outputs: a run writes into a hidden sibling folder and renames it into place at the end,
so an interrupted or failed run leaves nothing half-written, and an input is never overwritten.
`output_run` is the shell every to-disk command runs in; `save_model` writes a model, adapter and tokenizer."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from antidote_llm.errors import AntidoteError
from antidote_llm.runtime.loading import MERGE_DTYPE, ModelSource, merge_adapter
from antidote_llm.runtime.runinfo import MemoryMonitor, Timings, library_versions


def check_output_dir(out: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """Validate an output folder before any work: not an input, not inside one, and empty unless overwrite."""
    out = Path(out).resolve()
    for item in inputs:
        if item is None:
            continue
        path = Path(item)
        if not path.exists():
            continue
        path = path.resolve()
        if out == path or path in out.parents or out in path.parents:
            raise AntidoteError(f"output {out} overlaps the input {path}; choose another --out")
    if out.exists():
        if not out.is_dir():
            raise AntidoteError(f"output {out} exists and is not a folder; choose another --out")
        if any(out.iterdir()) and not overwrite:
            raise AntidoteError(f"output folder {out} exists and is not empty; choose another --out or pass --overwrite")
    check_writable(out.parent)
    return out


def check_writable(folder: Path) -> None:
    """Refuse, before any work, an output whose nearest existing folder cannot be written (read-only, no rights):
    otherwise the error would come only after the whole run, at the final rename."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise AntidoteError(f"cannot write in {existing} ({exc.strerror}); choose another --out") from None


STALE_TEMP_S = 24 * 3600.0  # a run writes its hidden folder in one go at its end: one untouched for a day is dead


def _temp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


def stale_temporaries(out: Path, now: float, max_age_s: float = STALE_TEMP_S) -> list[Path]:
    """The hidden folders that runs writing `out` made beside it (`.NAME.tmp-*`) and left behind, killed before
    they could remove them (kill -9, a lost node): nothing in them changed for `max_age_s`."""
    prefix = _temp_prefix(out)
    try:
        names = sorted(n for n in os.listdir(out.parent) if n.startswith(prefix))
    except OSError:
        return []
    folders = [out.parent / name for name in names]
    return [f for f in folders if f.is_dir() and not f.is_symlink() and now - _last_change(f) > max_age_s]


def _last_change(folder: Path) -> float:
    """The newest modification time in `folder`, its own included."""
    newest = folder.lstat().st_mtime
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what it was raised from) says the disk or the quota is full. safetensors reports it as a
    SafetensorError whose text carries the OS error."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if type(exc).__name__ == "SafetensorError" and any(
                s in str(exc) for s in ("No space left on device", "os error 28", "StorageFull", "Disk quota exceeded")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it becomes `out`, on error it is removed (a full disk is
    said in one line). Without `replace`, a folder with files that appeared at `out` meanwhile (another run writing
    the same output) is never replaced: the rename itself refuses a non-empty target, so of two runs exactly one
    writes. Temporary folders of `out` that killed runs left (see stale_temporaries) are removed first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(out, time.time()):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(exc):
            raise AntidoteError(f"the disk holding {out.parent} is full (no space left while writing {out}); "
                                "nothing was written and the partial output was removed; free space or choose "
                                "another --out") from None
        raise
    if not replace:
        try:
            os.rename(tmp, out)  # onto nothing, or onto an empty folder; a non-empty one is refused atomically
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise AntidoteError(f"output {out} was written by another run meanwhile; nothing was written "
                                    "by this one (choose another --out, or pass --overwrite)") from None
            raise
        return
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class OutputRun:
    """A to-disk run in progress (see `output_run`): where it writes, its timings and memory, when it began."""

    out: Path
    timings: Timings
    memory: MemoryMonitor
    started_at: str
    overwrite: bool
    _stack: contextlib.ExitStack
    _folder: Path | None = None

    @property
    def folder(self) -> Path:
        """The hidden folder the run writes into, renamed to `out` at the end. Made on first use, so a run
        that writes nothing (a process of `accelerate launch` other than the main one) leaves no trace."""
        if self._folder is None:
            self._folder = self._stack.enter_context(atomic_dir(self.out, replace=self.overwrite))
        return self._folder

    def report_fields(self) -> dict:
        """What every to-disk report records about the run itself."""
        return {"timings": dict(self.timings), "memory": self.memory.report(), "versions": library_versions(),
                "started_at": self.started_at}


@contextlib.contextmanager
def output_run(out: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[OutputRun]:
    """The shell of every command that writes an output folder: the folder is checked first (`check_output_dir`),
    memory is watched and timings kept over the block, which writes into `run.folder`; at a normal exit that
    folder is renamed into place, on an error it is removed and nothing is written."""
    checked = check_output_dir(out, overwrite=overwrite, inputs=inputs)
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with contextlib.ExitStack() as stack, MemoryMonitor() as memory:
        yield OutputRun(checked, Timings(), memory, started_at, overwrite, stack)


def save_model(folder: Path, model, tokenizer, timings: Timings, *, adapter: bool, merged: bool = False,
               base: ModelSource | None = None) -> tuple[dict, torch.nn.Module]:
    """Write a model output into `folder`: with `adapter`, the live LoRA adapter as adapter/ (PEFT; `base`, the
    model it was loaded from, is recorded as what it lies on) and, with `merged`, also the model with it merged as merged/; without, the
    whole model (a live adapter merged) as model/. A whole model gets its tokenizer so the folder loads alone.
    Returns what went where, for the report, and the model as written (merged, when it was)."""
    outputs: dict = {}
    if adapter:
        with timings.measure("save_s"):
            _save_active_adapter(model, folder / "adapter")  # before merging: merging removes the LoRA layers
        outputs["adapter"] = "adapter"
        if base is not None:
            outputs["base"] = {"model": base.model, "merged_adapters": list(base.adapters[:-1])}
        if not merged:
            return outputs, model
    if hasattr(model, "peft_config"):
        with timings.measure("merge_s"):
            model = merge_adapter(model)
    name = "merged" if adapter else "model"
    with timings.measure("save_s"):
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    outputs[name] = name
    if adapter:
        outputs["merge_dtype"] = str(MERGE_DTYPE).removeprefix("torch.")
    return outputs, model


def _save_active_adapter(model, folder: Path) -> None:
    """The active adapter as a plain PEFT folder (PEFT writes an adapter not named "default" into a subfolder)."""
    name = model.active_adapter
    if name == "default":
        model.save_pretrained(folder)
        return
    parts = folder.with_name(folder.name + ".parts")
    model.save_pretrained(parts, selected_adapters=[name])
    (parts / name).rename(folder)
    shutil.rmtree(parts)


def write_json(path: str | Path, obj) -> None:
    """Write JSON through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


def write_report(path: str | Path, report) -> None:
    """A typed report (a pydantic model) as JSON, through a temporary file and a rename."""
    write_json(path, report.model_dump(mode="json"))
