"""Atomic outputs: a run writes into a hidden sibling folder and renames it into place at the end,
so an interrupted or failed run leaves nothing half-written, and an input is never overwritten."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from antidote_llm.errors import AntidoteError


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
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on error it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
