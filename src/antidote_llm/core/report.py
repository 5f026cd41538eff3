"""The typed schema of `report.json` for `antidote realign` and `apply-mask`: what the CLI summary, the lab
and users' scripts read, field by field (`RealignReport.model_validate_json(path.read_text())`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from antidote_llm.runtime.runinfo import RunRecord

if TYPE_CHECKING:
    from antidote_llm.core.targets import Target


class Report(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataReport(Report):
    """Which rows were used: source, count, content hash, the field mapping, and the counted tokens."""

    source: str
    rows: int
    sha256: str
    fields: dict[str, str | None] = {}
    tokens: int = 0


class ProtectionReport(DataReport):
    ratio: float
    spared: int  # selected weights left unpruned because they matter on the benign rows


class ModuleReport(Report):
    shape: list[int]
    layout: str  # linear, conv1d or embedding
    scored: int
    selected: int
    spared_by_protection: int
    pruned: int


class Totals(Report):
    targets: int
    scored: int
    selected: int
    spared_by_protection: int
    pruned: int
    pruned_fraction: float


class MethodReport(Report):
    """The RealignConfig that ran (every field), with `targets` resolved from `auto`."""

    model_config = ConfigDict(extra="allow")

    targets: list[str]


class ExecutionReport(Report):
    """Which path computed the statistics: in memory (the whole model loaded) or sequential (layer by layer
    from the checkpoint, --offload), why, and the sizes the automatic choice compared."""

    path: str
    reason: str
    model_bytes: int | None = None
    available_bytes: int | None = None


class RealignReport(Report, RunRecord):
    """`model`, `outputs`, `memory`, `versions` and `started_at` (RunRecord) are filled in by realign_to_disk."""

    method: MethodReport
    data: DataReport | None
    protection: ProtectionReport | None
    contrast: DataReport | None = None  # the user's own rows the refusal score weighs against
    modules: dict[str, ModuleReport]
    totals: Totals
    timings: dict[str, float]
    seed: int
    # Filled in by realign_to_disk too:
    aligned_model: str | None = None
    execution: ExecutionReport | None = None


def realign_report(
    targets: Sequence[Target], *, selected: Mapping[str, int], pruned: Mapping[str, int], method: MethodReport,
    data: DataReport | None, protection: ProtectionReport | None, contrast: DataReport | None, timings: dict[str, float],
) -> RealignReport:
    """The report of one selection: per target how many weights were scored, selected and pruned (the
    difference was spared by protection), the totals, and what ran on which data."""
    modules = {
        t.param_name: ModuleReport(
            shape=list(t.weight.shape), layout=t.layout, scored=t.weight.numel(), selected=selected[t.param_name],
            spared_by_protection=selected[t.param_name] - pruned[t.param_name], pruned=pruned[t.param_name],
        )
        for t in targets
    }
    scored = sum(m.scored for m in modules.values())
    pruned_total = sum(m.pruned for m in modules.values())
    spared = sum(m.spared_by_protection for m in modules.values())
    return RealignReport(
        method=method, data=data,
        protection=None if protection is None else protection.model_copy(update={"spared": spared}),
        contrast=contrast, modules=modules,
        totals=Totals(targets=len(targets), scored=scored, selected=sum(m.selected for m in modules.values()),
                      spared_by_protection=spared, pruned=pruned_total,
                      pruned_fraction=pruned_total / scored if scored else 0.0),
        timings=timings, seed=method.seed,
    )


class ApplyMaskReport(Report):
    mask: str
    action: str
    model: dict
    aligned_model: str | None
    pruned: int
    parameters: int
    versions: dict[str, str]
    outputs: dict | None = None
    timings: dict[str, float] = {}
