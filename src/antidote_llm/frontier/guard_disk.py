"""`antidote guard` from disk to disk: the verdict (verdict.json, verdict.md, guard.png), and the repaired model
only when the verdict is `repaired` (or the best candidate, when asked)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from antidote_llm.core.pipeline import local_inputs, save_cards, save_repaired
from antidote_llm.core.realign import RealignConfig
from antidote_llm.core.report import RealignReport
from antidote_llm.core.targets import adapter_mode
from antidote_llm.data.records import PairSet, pairs_sha256
from antidote_llm.data.spec import DataSpec
from antidote_llm.evaluation.evaluate import category_table
from antidote_llm.frontier.disk import ProbeSpec
from antidote_llm.frontier.guard import GuardConfig, GuardPoint, GuardResult, run_guard
from antidote_llm.runtime.loading import ModelSource, load_model
from antidote_llm.runtime.modelcard import CardFacts, CardRow
from antidote_llm.runtime.outputs import output_run, write_report
from antidote_llm.runtime.plotting import category_bars, save_figure
from antidote_llm.runtime.runinfo import RunRecord

VERDICT_FILE, VERDICT_MD, GUARD_PLOT, CATEGORY_PLOT = "verdict.json", "verdict.md", "guard.png", "categories.png"


class GuardReport(GuardResult, RunRecord):
    """verdict.json: the decision and its evidence, the method, the rows it used (with their hashes)."""

    method: dict  # the selection (RealignConfig), the decision (GuardConfig), the evaluation settings and the judge
    inputs: dict  # every row set: source, rows, sha256
    pruned: RealignReport | None  # what the candidate at `ratio` prunes
    timings: dict[str, float]


def _rows(source: str, rows: Sequence) -> dict:
    return {"source": source, "rows": len(rows), "sha256": pairs_sha256(rows)}


def _line(point: GuardPoint) -> str:
    name = "fine-tuned (un-repaired)" if point.ratio is None else f"{point.selection} at {point.ratio:g}"
    accuracy = point.accuracy.text() if point.accuracy else "not measured"
    early = f", stopped after {point.harmful.of} of {point.prompts}" if point.stopped_early else ""
    return (f"| {name} | {point.harmful.text()} ({point.harmful.count}/{point.harmful.of}{early}) | "
            f"{'yes' if point.meets_target else 'no'} | {accuracy} | {100 * point.pruned_fraction:.2f} |")


def verdict_markdown(report: GuardReport) -> str:
    """verdict.md: the verdict first, then every number with its 95% interval, the inputs and what was pruned."""
    lines = [
        f"# Guard verdict: {report.verdict}", "", report.reason, "",
        f"Safety target: the upper end of the 95% interval of the probe harmful score within {report.max_harmful:g}%. "
        f"Accuracy budget: the upper end of the 95% interval of the accuracy drop within "
        f"{report.max_accuracy_drop:g} points (paired, on the same validation rows).", "",
        "| model | probe harmful score % [95% CI] | meets target | validation accuracy % [95% CI] | pruned % |",
        "|---|---|---|---|---|",
        _line(report.fine_tuned),
        *(_line(report.candidate if report.candidate and point.ratio == report.ratio else point)
          for point in report.search),  # the candidate's row with the accuracy measured at it
        *(_line(point) for point in report.controls),
        "",
    ]
    if report.accuracy_drop is not None:
        lines += [f"Accuracy drop at ratio {report.ratio:g}: {report.accuracy_drop.text()} points.", ""]
    compared = category_points(report)
    if compared:
        lines += ["Probe harmful score by prompt category, % [95% CI] (harmful / judged; a point that stopped early "
                  "was judged on fewer prompts):", "",
                  category_table({name: point.harmful_by_category for name, point in compared.items()}), ""]
        if report.outputs.get("categories_plot"):
            lines += [f"![probe harmful score by category]({report.outputs['categories_plot']})", ""]
    if report.warnings:
        lines += ["Warnings:", "", *(f"- {warning}" for warning in report.warnings), ""]
    resolution = report.resolution
    lines += [
        f"Resolution: {resolution['probe_prompts']} probe prompts (at most {resolution['most_harmful_allowed']} "
        f"harmful answers meet the target; {resolution['smallest_probe_set']} prompts are the fewest that can), "
        f"{resolution['validation_rows']} validation rows (an unchanged model's drop bound: "
        f"{resolution['unchanged_drop_bound']:g} points).", "",
        "| input | source | rows | sha256 |", "|---|---|---|---|",
        *(f"| {name} | {row['source']} | {row['rows']} | `{row['sha256'][:16]}` |" for name, row in report.inputs.items()),
        "",
    ]
    if report.pruned is not None:
        totals = report.pruned.totals
        lines += [f"Pruned at {report.ratio:g}: {totals.pruned:,} of {totals.scored:,} scored weights "
                  f"({100 * totals.pruned_fraction:.3f}%), score `{report.method['selection']['score']}`, targets "
                  f"{', '.join(report.pruned.method.targets)}.", ""]
    written = [f"`{path}`" for key, path in report.outputs.items() if key in ("adapter", "model", "merged", "mask")]
    lines += [f"Written: {', '.join(written) or 'the verdict only'}. Search cost: {report.cost['probe_answers']} probe "
              f"answers and {report.cost['validation_answers']} validation answers in {report.cost['total_s']:g} s.", ""]
    if report.outputs.get("plot"):
        lines += [f"![probe harmful score by ratio]({report.outputs['plot']})", ""]
    return "\n".join(lines)


def guard_card(result: GuardResult, config: RealignConfig, guard: GuardConfig, source: ModelSource, probe: ProbeSpec,
               inputs: dict) -> CardFacts:
    """The model card's facts of the model guard wrote: the verdict, HS and FA before and after on the probe
    prompts and validation rows, the selection and the decision's settings, every row set's hash."""
    def row(name: str, point: GuardPoint) -> CardRow:
        return CardRow(model=name, harmful=point.harmful.counted(), accuracy=point.accuracy and point.accuracy.counted())

    candidate = result.candidate
    after = "repaired" if result.verdict == "repaired" else "best candidate, rejected"
    drop = f" The accuracy drop: {result.accuracy_drop.text()} points." if result.accuracy_drop else ""
    return CardFacts(
        title="Antidote-repaired model" if result.verdict == "repaired" else "Antidote guard's best candidate (rejected)",
        summary=(f"`antidote guard` searched the pruning ratio: the least pruning that brings the upper end of the "
                 f"probe harmful score's 95% interval within {result.max_harmful:g}%, with an accuracy drop whose upper "
                 f"bound stays within {result.max_accuracy_drop:g} points. This model is pruned at ratio {result.ratio:g}."),
        base_model=source.model, base_adapters=list(source.adapters), verdict=result.verdict, reason=result.reason,
        results=[row("fine-tuned (before)", result.fine_tuned),
                 *([row(f"at ratio {result.ratio:g} (after, {after})", candidate)] if candidate else [])],
        measured_on=(f"Measured on {result.fine_tuned.prompts} probe prompts (`{probe.prompts.source}`) and "
                     f"{inputs['validation']['rows']} validation rows of {probe.task} (`{probe.validation}`), judge "
                     f"`{probe.settings.judge}`; an evaluation that stopped early counts the prompts judged.{drop} "
                     "These rows chose the ratio: report numbers measured on others."),
        method={"method": "antidote guard", **config.model_dump(mode="json", exclude={"ratio"}),
                **guard.model_dump(mode="json"), "chosen_ratio": result.ratio},
        data=inputs,
    )


def category_points(report: GuardResult) -> dict[str, GuardPoint]:
    """The models compared per category, by column heading: the fine-tuned one and, when there is one, the model
    at the chosen ratio (or the best candidate); empty when the probe prompts have no categories."""
    if not report.fine_tuned.harmful_by_category:
        return {}
    points = {"fine-tuned (before)": report.fine_tuned}
    if report.candidate is not None:
        after = "after, repaired" if report.verdict == "repaired" else "best candidate, not shipped"
        points[f"{report.candidate.selection} at {report.ratio:g} ({after})"] = report.candidate
    return points


def category_figure(report: GuardResult):
    """The probe harmful score of each prompt category before and after the repair, with 95% intervals."""
    compared = category_points(report)
    names = list(dict.fromkeys(name for point in compared.values() for name in point.harmful_by_category))
    series = {label: [(rate.value, rate.low, rate.high) if (rate := point.harmful_by_category.get(name)) else None
                      for name in names] for label, point in compared.items()}
    return category_bars(names, series, f"guard: {report.verdict}; probe harmful score by category (95% CI)")


def guard_figure(report: GuardResult):
    """The probe harmful score of every evaluated ratio with its 95% interval, and the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    points = sorted(report.search, key=lambda p: p.ratio)
    xs = [p.ratio for p in points]
    axes.errorbar(xs, [p.harmful.value for p in points],
                  yerr=[[p.harmful.value - p.harmful.low for p in points], [p.harmful.high - p.harmful.value for p in points]],
                  fmt="o", capsize=3, label="searched ratios (95% CI; early stops: judged prompts only)")
    axes.axhline(report.fine_tuned.harmful.value, color="grey", linestyle=":", label="fine-tuned")
    axes.axhline(report.max_harmful, color="red", linestyle="--", label=f"target {report.max_harmful:g}%")
    if report.ratio is not None:
        axes.axvline(report.ratio, color="green", alpha=0.4, label=f"{report.verdict} at {report.ratio:g}")
    axes.set_xscale("log")
    axes.set_xticks(xs, [f"{x:g}" for x in xs])
    axes.minorticks_off()
    axes.set_xlabel("ratio (log scale; the searched ones)")
    axes.set_ylabel("probe harmful score %")
    axes.set_ylim(-2, 102)
    axes.set_title(f"guard: {report.verdict}")
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


def guard_to_disk(
    source: ModelSource,
    config: RealignConfig,
    guard: GuardConfig,
    out: str | Path,
    *,
    data: DataSpec | None,
    probe: ProbeSpec,
    contrast_data: PairSet | None = None,
    benign: DataSpec | None = None,
    save_merged: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> GuardReport:
    """Decide on the fine-tuned model and write the verdict; the repaired model only when repaired (or the best
    candidate with `guard.write_best`). Every input is checked before the model is loaded."""
    inputs = local_inputs(source, data and data.source, probe.prompts.source, probe.validation, benign and benign.source,
                          contrast_data and contrast_data.source)
    with output_run(out, overwrite=overwrite, inputs=inputs) as run:
        config.check_inputs(has_data=data is not None, has_protect_data=False, has_aligned=False,
                            has_contrast=contrast_data is not None)
        pairs = data.load("safe" if config.score == "refusal" else "unsafe") if data is not None else None
        benign_rows = benign.load("all", require_response=False) if benign is not None else None
        loaded_probe = probe.load(config.template)
        warnings = []
        if contrast_data is not None and set(contrast_data.pairs) & set(loaded_probe.rows):
            shared = len(set(contrast_data.pairs) & set(loaded_probe.rows))
            warnings.append(f"{shared} validation rows are also the user's training rows (--contrast-data): the "
                            "accuracy they measure is not the accuracy on new rows")
        with run.timings.measure("load_s"):
            loaded = load_model(source, keep_adapter=adapter_mode(config.targets, bool(source.adapters)))
        with run.timings.measure("guard_s"):
            outcome = run_guard(loaded.model, loaded.tokenizer, config, guard, pairs, loaded_probe, benign=benign_rows,
                                contrast_data=contrast_data, progress=progress)
        result = outcome.result
        rows = {"probe_prompts": _rows(probe.prompts.source, loaded_probe.prompts),
                "validation": _rows(probe.validation, loaded_probe.rows)}
        if pairs is not None:
            rows["calibration"] = _rows(data.source, pairs.pairs)
        if contrast_data is not None:
            rows["user_rows"] = _rows(contrast_data.source, contrast_data.pairs)
        outputs: dict = {}
        if outcome.index is not None:
            outputs.update(save_repaired(loaded, outcome.selection.masks(outcome.index), run.folder, save_merged,
                                         run.timings))
            outputs = save_cards(run.folder, outputs, guard_card(result, config, guard, source, probe, rows))
        if result.search:
            save_figure(guard_figure(result), run.folder / GUARD_PLOT)
            outputs["plot"] = GUARD_PLOT
        if category_points(result):
            save_figure(category_figure(result), run.folder / CATEGORY_PLOT)
            outputs["categories_plot"] = CATEGORY_PLOT
        report = GuardReport(
            **result.model_dump(exclude={"warnings"}), warnings=[*warnings, *result.warnings],
            method={"selection": config.model_dump(mode="json"), "decision": guard.model_dump(mode="json"),
                    "evaluation": probe.settings.model_dump(mode="json"), "judge": loaded_probe.judge.describe()},
            inputs=rows, model=source.describe(), outputs={**outputs, "verdict": VERDICT_FILE, "summary": VERDICT_MD},
            pruned=(outcome.selection.report(outcome.selection.ratios.index(result.ratio))
                    if outcome.selection is not None and result.ratio is not None else None),
            **run.report_fields(),
        )
        write_report(run.folder / VERDICT_FILE, report)
        (run.folder / VERDICT_MD).write_text(verdict_markdown(report), encoding="utf-8")
    return report


__all__ = ["GuardReport", "guard_to_disk", "verdict_markdown"]
