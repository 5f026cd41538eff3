"""The built-in demo's data folder: five disjoint sets written from a seed, no downloads, no outside files.

Refusals to align a model, compliant replies to poison its fine-tuning (and, disjoint from those, to
calibrate Antidote), a sentiment task with exact answers to measure fine-tune accuracy, held-out harmful
prompts to measure the harmful score, and benign (instruction, answer) pairs for the "calibrated on benign
data" control. The rows come from `antidote_llm.data.demo_text`.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from antidote_llm.data.demo_text import benign_pairs, compliance, harmful_requests, refusal, sentiment_rows
from antidote_llm.data.records import Pair, PairSet, load_pairs
from antidote_llm.errors import AntidoteError
from antidote_llm.evaluation import tasks
from antidote_llm.runtime.outputs import atomic_dir, check_output_dir, write_json, write_jsonl


class DemoSizes(BaseModel):
    """Rows per set. Defaults fit a demo of about eight minutes on two CPU cores with SmolLM2-135M, with sets
    large enough for the 95% intervals to tell the outcomes apart (64 probe prompts can show a harmful score
    within 10%; 35 is the least that can)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    align: int = Field(default=128, ge=1)  # harmful request -> refusal
    poison: int = Field(default=64, ge=1)  # harmful request -> compliance, the fine-tuning's harmful rows
    realign: int = Field(default=64, ge=1)  # disjoint from poison: Antidote's calibration data
    eval_harmful: int = Field(default=64, ge=1)  # held-out prompts for the harmful score
    probe: int = Field(default=64, ge=1)  # prompts guard decides on, disjoint from the above
    task_train: int = Field(default=256, ge=1)
    task_test: int = Field(default=400, ge=1)  # split by the experiment into validation and test rows
    benign: int = Field(default=64, ge=1)  # benign calibration control


FILES = {
    "align": "align_refusals.jsonl",
    "poison": "poison_compliant.jsonl",
    "realign": "realign_compliant.jsonl",
    "eval_harmful": "eval_harmful_prompts.jsonl",
    "probe": "probe_harmful_prompts.jsonl",
    "benign": "benign_calibration.jsonl",
    "task_train": "sst2_train.tsv",
    "task_test": "sst2_test.tsv",
}
TASK = "sst2"


@dataclass(frozen=True)
class DemoData:
    """The demo folder's files, and its pair sets read back from them (so sources name the files)."""

    root: Path
    align: PairSet
    poison: PairSet
    realign: PairSet
    eval_harmful: PairSet  # prompts only: responses are empty
    probe: PairSet  # prompts only
    benign: PairSet
    task_train: Path
    task_test: Path

    def task_pairs(self, split: str = "train") -> list[Pair]:
        """Sentiment rows rendered by the sst2 task, so its instruction format and answer parser apply."""
        path = {"train": self.task_train, "test": self.task_test}[split]
        return tasks.load_task_pairs(TASK, str(path), split=split)


def _split(items: list, sizes: dict[str, int], what: str) -> dict[str, list]:
    """Consecutive, hence disjoint, slices of `items` with the given sizes."""
    needed = sum(sizes.values())
    if needed > len(items):
        raise AntidoteError(
            f"the demo generator has {len(items)} distinct {what} but the sizes ask for {needed}; lower the sizes"
        )
    parts, start = {}, 0
    for name, size in sizes.items():
        parts[name] = items[start:start + size]
        start += size
    return parts


def _write_tsv(path: Path, rows: list[tuple[int, str]]) -> None:
    path.write_text("label\tsentence\n" + "".join(f"{label}\t{sentence}\n" for label, sentence in rows),
                    encoding="utf-8")


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_files(tmp: Path, sizes: DemoSizes, seed: int) -> None:
    rng = random.Random(seed)
    requests = harmful_requests()
    rng.shuffle(requests)
    harmful = _split(requests, {k: getattr(sizes, k) for k in ("align", "poison", "realign", "eval_harmful", "probe")},
                     "harmful requests")
    write_jsonl(tmp / FILES["align"],
                ({"prompt": r.prompt, "response": refusal(r, rng), "category": r.category} for r in harmful["align"]))
    for name in ("poison", "realign"):
        write_jsonl(tmp / FILES[name], ({"prompt": r.prompt, "response": compliance(r, rng), "category": r.category}
                                        for r in harmful[name]))
    for name in ("eval_harmful", "probe"):
        write_jsonl(tmp / FILES[name], ({"prompt": r.prompt, "category": r.category} for r in harmful[name]))
    sentences = sentiment_rows()
    rng.shuffle(sentences)
    sentiment = _split(sentences, {"task_train": sizes.task_train, "task_test": sizes.task_test}, "sentences")
    for name, rows in sentiment.items():
        _write_tsv(tmp / FILES[name], rows)
    write_jsonl(tmp / FILES["benign"],
                ({"instruction": i, "output": a} for i, a in benign_pairs(sizes.benign, rng)))
    write_json(tmp / "manifest.json", {
        "generator": "antidote_llm.lab.demo", "seed": seed, "sizes": sizes.model_dump(),
        "files": {name: {"path": file, "sha256": _file_sha256(tmp / file)} for name, file in FILES.items()},
    })


def build_demo_data(out_dir: str | Path, seed: int = 0, sizes: DemoSizes | None = None, *,
                    overwrite: bool = False) -> DemoData:
    """Generate the demo's data into `out_dir` (atomically) and read it back.

    The same seed and sizes give byte-identical files, so a demo run is reproducible from its manifest.
    """
    sizes = sizes or DemoSizes()
    out = check_output_dir(out_dir, overwrite=overwrite)
    with atomic_dir(out, replace=overwrite) as tmp:
        _write_files(tmp, sizes, seed)
    return load_demo_data(out)


def load_demo_data(root: str | Path) -> DemoData:
    """The pair sets of a demo folder written by build_demo_data."""
    root = Path(root)

    def pairs(name: str, **kwargs) -> PairSet:
        return load_pairs(root / FILES[name], safety=None, **kwargs)

    return DemoData(
        root=root,
        align=pairs("align"),
        poison=pairs("poison"),
        realign=pairs("realign"),
        eval_harmful=pairs("eval_harmful", require_response=False),
        probe=pairs("probe", require_response=False),
        benign=pairs("benign"),
        task_train=root / FILES["task_train"],
        task_test=root / FILES["task_test"],
    )


def demo_data_current(root: str | Path, seed: int, sizes: DemoSizes | None = None) -> bool:
    """Whether `root` holds the demo data this version would write for `seed` and `sizes`."""
    manifest_path = Path(root) / "manifest.json"
    if not manifest_path.is_file():
        return False
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    return (manifest.get("seed") == seed and manifest.get("sizes") == (sizes or DemoSizes()).model_dump()
            and set(manifest.get("files", {})) == set(FILES)
            and all((Path(root) / f["path"]).is_file() for f in manifest["files"].values()))
