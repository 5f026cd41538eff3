"""`antidote realign` with several ratios or `--ratio auto`: one scoring pass, the nested masks, the evaluated
frontier (frontier.csv, frontier.png, report.json) and, with auto, the model repaired at the chosen ratio."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from antidote_llm.core.pipeline import (
    MASK_FILE,
    REPORT_FILE,
    local_inputs,
    realign_card,
    save_cards,
    save_repaired,
)
from antidote_llm.core.realign import RealignConfig, select_nested
from antidote_llm.core.report import RealignReport
from antidote_llm.core.targets import adapter_mode
from antidote_llm.data.records import PairSet
from antidote_llm.data.spec import DataSpec
from antidote_llm.errors import AntidoteError
from antidote_llm.evaluation.evaluate import EvalInputs
from antidote_llm.evaluation.judges import get_judge
from antidote_llm.evaluation.settings import EvalSettings
from antidote_llm.evaluation.tasks import get_task, load_task_pairs
from antidote_llm.frontier.search import FrontierConfig, FrontierPoint, run_frontier
from antidote_llm.runtime.loading import ModelSource, load_model
from antidote_llm.runtime.modelcard import CardFacts, CardRow
from antidote_llm.runtime.outputs import output_run, write_report
from antidote_llm.runtime.plotting import save_figure, tradeoff_axes
from antidote_llm.runtime.runinfo import RunRecord

LEVELS_FILE = "masks.safetensors"  # one uint8 tensor per parameter: 0 kept, i pruned from the i-th ratio on
CSV_FILE, PLOT_FILE = "frontier.csv", "frontier.png"


@dataclass(frozen=True)
class ProbeSpec:
    """Where the points are evaluated: harmful probe prompts and the user's validation rows of a task."""

    prompts: DataSpec
    task: str
    validation: str
    validation_samples: int | None = None
    validation_skip: int = 0
    settings: EvalSettings = EvalSettings()

    def load(self, template: str) -> EvalInputs:
        """The rows, and the judge built once (so a missing judge model, key or server fails before any work)."""
        get_task(self.task)
        prompts = self.prompts.load("unsafe", require_response=False, name="--probe-samples",
                                    categories=True)
        validation = load_task_pairs(self.task, self.validation, "train", samples=self.validation_samples,
                                     skip=self.validation_skip, name="--validation-samples")
        return EvalInputs(prompts=prompts.pairs, task=self.task, rows=validation, settings=self.settings,
                          template=template, judge=get_judge(self.settings.judge, self.settings.judge_options()))


def user_rows(task: str | None, source: str, samples: int | None = None, skip: int = 0) -> PairSet:
    """The user's own fine-tuning rows (what --score refusal weighs against): `task`'s training rows when a task is
    named, else prompt/response rows."""
    if task is None:
        return DataSpec(source=source, samples=samples, skip=skip).load("all", name="--contrast-samples")
    rows = load_task_pairs(task, source, "train", samples=samples, skip=skip, name="--contrast-samples")
    return PairSet(pairs=tuple(rows), source=source, indices=tuple(range(skip, skip + len(rows))))


class FrontierReport(RunRecord):
    """report.json of a frontier run: the selection at every ratio, every evaluated point, the choice."""

    ratios: list[float]
    selections: list[RealignReport]  # Antidote at each ratio (what was scored, selected and pruned)
    points: list[FrontierPoint]  # empty when nothing was evaluated
    picked_ratio: float | None
    max_accuracy_drop: float | None
    probe: dict | None
    timings: dict[str, float]


def frontier_csv(points: Sequence[FrontierPoint]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(FrontierPoint.model_fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(point.model_dump() for point in points)
    return buffer.getvalue()


def frontier_figure(points: Sequence[FrontierPoint], picked_ratio: float | None):
    """Harmful score against accuracy: Antidote's points labelled by ratio (the chosen one marked), the
    un-repaired model, and each control as a dashed curve."""
    def usable(point: FrontierPoint) -> bool:
        return point.finetune_accuracy is not None and point.harmful_score is not None

    labelled = [
        (p.finetune_accuracy, p.harmful_score,
         "un-repaired" if p.ratio is None else f"{p.ratio:g}" + (" (auto)" if p.ratio == picked_ratio else ""))
        for p in points if usable(p) and p.selection in ("none", "antidote")
    ]
    controls = {}
    for p in points:
        if usable(p) and p.selection not in ("none", "antidote"):
            controls.setdefault(f"control: {p.selection}", []).append((p.finetune_accuracy, p.harmful_score))
    return tradeoff_axes(labelled, "Antidote's frontier (labels: ratio)", lines=controls)


def write_frontier(folder: Path, points: Sequence[FrontierPoint], picked_ratio: float | None) -> dict[str, str]:
    """frontier.csv and frontier.png of evaluated points into `folder`."""
    (folder / CSV_FILE).write_text(frontier_csv(points), encoding="utf-8")
    save_figure(frontier_figure(points, picked_ratio), folder / PLOT_FILE)
    return {"csv": CSV_FILE, "plot": PLOT_FILE}


def frontier_card(selected: RealignReport, source: ModelSource, points: Sequence[FrontierPoint], ratio: float,
                  frontier: FrontierConfig, probe: ProbeSpec) -> CardFacts:
    """The model card's facts of `--ratio auto`: the realign facts at the chosen ratio, with HS and FA of the
    un-repaired model and the repaired one on the probe prompts and validation rows."""
    chosen = next(p for p in points if p.selection == "antidote" and p.ratio == ratio)

    def row(name: str, point: FrontierPoint) -> CardRow:
        harmful, accuracy = point.harmful(), point.accuracy()
        return CardRow(model=name, harmful=harmful and harmful.counted(), accuracy=accuracy and accuracy.counted())

    facts = realign_card(selected, source)
    return facts.model_copy(update={
        "summary": facts.summary + f" The ratio was chosen by `--ratio auto`: the lowest harmful score whose accuracy "
                                   f"stays within {frontier.max_accuracy_drop:g} points of the un-repaired model's.",
        "results": [row("fine-tuned (before)", points[0]), row(f"repaired at ratio {ratio:g} (after)", chosen)],
        "measured_on": (f"Measured on the probe prompts `{probe.prompts.source}` and the validation rows "
                        f"`{probe.validation}` ({probe.task}), judge `{probe.settings.judge}`; the ratio was chosen on "
                        "these rows, so report numbers measured on others."),
    })


def _save_levels(levels: dict[str, torch.Tensor], ratios: Sequence[float], path: Path) -> None:
    save_file({name: level.contiguous() for name, level in levels.items()}, str(path),
              metadata={"ratios": ",".join(map(repr, ratios))})


def frontier_to_disk(
    source: ModelSource,
    config: RealignConfig,
    frontier: FrontierConfig,
    out: str | Path,
    *,
    data: DataSpec,
    probe: ProbeSpec | None = None,
    benign: DataSpec | None = None,
    protect_data: DataSpec | None = None,
    contrast_data: PairSet | None = None,
    pick: bool = False,
    save_merged: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> FrontierReport:
    """Score once at every ratio of `frontier`; evaluate the points when `probe` is given; with `pick`, choose
    the ratio and save the model repaired at it. Every input is checked before the model is loaded."""
    if pick and probe is None:
        raise AntidoteError("--ratio auto needs --probe-prompts, --task and --validation-data to evaluate the ratios")
    if frontier.controls and probe is None:
        raise AntidoteError("--controls draw evaluated points; give --probe-prompts, --task and --validation-data")
    inputs = local_inputs(source, data.source, probe and probe.prompts.source, probe and probe.validation,
                          benign and benign.source, protect_data and protect_data.source,
                          contrast_data and contrast_data.source)
    with output_run(out, overwrite=overwrite, inputs=inputs) as run:
        config.check_inputs(has_data=True, has_protect_data=protect_data is not None, has_aligned=False,
                            has_contrast=contrast_data is not None)
        pairs = data.load("unsafe")
        benign_rows = benign.load("all", require_response=False) if benign is not None else None
        protect_rows = protect_data.load("all", require_response=False) if protect_data is not None else None
        loaded_probe = probe.load(config.template) if probe is not None else None
        with run.timings.measure("load_s"):
            loaded = load_model(source, keep_adapter=adapter_mode(config.targets, bool(source.adapters)))
        with run.timings.measure("frontier_s"):
            if loaded_probe is None:
                selection = select_nested(loaded.model, loaded.tokenizer, config, pairs, ratios=frontier.ratios,
                                          protect_data=protect_rows, contrast_data=contrast_data, progress=progress)
                points, picked = [], None
            else:
                result = run_frontier(loaded.model, loaded.tokenizer, config, frontier, pairs, loaded_probe,
                                      benign=benign_rows, protect_data=protect_rows, contrast_data=contrast_data,
                                      pick=pick, progress=progress)
                selection, points, picked = result.selection, result.points, result.picked
        picked_ratio = selection.ratios[picked] if picked is not None else None
        with run.timings.measure("save_s"):
            _save_levels(selection.levels, selection.ratios, run.folder / LEVELS_FILE)
        outputs = {"masks": LEVELS_FILE}
        if picked is not None:
            outputs.update(save_repaired(loaded, selection.masks(picked), run.folder, save_merged, run.timings))
            outputs = save_cards(run.folder, outputs, frontier_card(selection.report(picked), source, points,
                                                                    picked_ratio, frontier, probe))
        if points:
            with run.timings.measure("save_s"):
                outputs.update(write_frontier(run.folder, points, picked_ratio))
        report = FrontierReport(
            ratios=list(selection.ratios), selections=[selection.report(i) for i in range(len(selection.ratios))],
            points=points, picked_ratio=picked_ratio, max_accuracy_drop=frontier.max_accuracy_drop if pick else None,
            probe=None if probe is None else {"prompts": probe.prompts.model_dump(), "task": probe.task,
                                              "validation": probe.validation, "settings": probe.settings.model_dump()},
            model=source.describe(), outputs=outputs, **run.report_fields(),
        )
        write_report(run.folder / REPORT_FILE, report)
    return report


__all__ = ["MASK_FILE", "FrontierReport", "ProbeSpec", "frontier_to_disk"]
