"""The lab's tables and plots: one row per (setting, defense), deltas against no defense."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

from antidote_llm.evaluation.metrics import Rate
from antidote_llm.lab.config import sweep_base_value
from antidote_llm.runtime.outputs import write_json
from antidote_llm.runtime.plotting import DPI, category_bars, save_figure, tradeoff_axes

COLUMNS = ("stage", "defense", "method", "ratio", "setting", "verdict", "harmful_score", "harmful_low", "harmful_high",
           "degenerate_rate", "compliance_rate", "finetune_accuracy", "finetune_low", "finetune_high", "delta_harmful_score", "delta_finetune_accuracy", "pruned_fraction", "defense_s",
           "defense_peak_rss_mb", "defense_added_rss_mb", "align_s", "finetune_s")


def add_deltas(rows: list[dict], sweep: Sequence[str]) -> list[dict]:
    """delta_* = defended minus undefended (method none) in the same setting."""
    baselines = {
        tuple(row.get(k) for k in sweep): row for row in rows if row["stage"] == "fine-tuned" and row["method"] == "none"
    }
    for row in rows:
        base = baselines.get(tuple(row.get(k) for k in sweep)) if row["stage"] == "fine-tuned" else None
        for metric in ("harmful_score", "finetune_accuracy"):
            ok = base is not None and row[metric] is not None and base[metric] is not None
            row[f"delta_{metric}"] = round(row[metric] - base[metric], 2) if ok else None
    return rows


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"
    return str(value)


def _interval(row: dict, metric: str) -> str | None:
    low, high = row.get(f"{metric}_low"), row.get(f"{metric}_high")
    return None if low is None else f"{low:.1f}-{high:.1f}"


def markdown_table(rows: list[dict], sweep: Sequence[str]) -> str:
    headers = [*sweep, "stage", "defense", "setting", "verdict", "HS %", "HS 95% CI", "degenerate %", "complies %",
               "FA %", "FA 95% CI", "ΔHS", "ΔFA", "changed %", "defense s", "peak MB"]
    keys = [*sweep, "stage", "defense", "setting", "verdict", "harmful_score", "harmful_ci", "degenerate_rate",
            "compliance_rate", "finetune_accuracy", "finetune_ci", "delta_harmful_score", "delta_finetune_accuracy",
            "pruned_fraction", "defense_s", "defense_peak_rss_mb"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        shown = {**row, "harmful_ci": _interval(row, "harmful"), "finetune_ci": _interval(row, "finetune")}
        cells = []
        for key in keys:
            value = shown.get(key)
            if key == "pruned_fraction" and value is not None:
                value = 100 * value
            cells.append(_fmt(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


METRICS = {"harmful_score": "harmful score (%)", "finetune_accuracy": "fine-tune accuracy (%)"}


def sweep_lines(rows: list[dict], experiment: dict) -> dict[str, tuple[list, list[dict]]]:
    """Per swept path: its values and the defended rows where only it varies (the other swept settings at the
    file's own values), for the paper's layout: a table and a plot per path."""
    sweep = experiment.get("sweep") or {}
    defended = [r for r in rows if r["stage"] == "fine-tuned"]
    lines = {}
    for path, values in sweep.items():
        others = {other: sweep_base_value(experiment, other) for other in sweep if other != path}
        line = [r for r in defended if all(r.get(other) == value for other, value in others.items())]
        present = [v for v in values if any(r.get(path) == v for r in line)]
        if len(present) > 1:
            lines[path] = (present, line)
    return lines


def _mean(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def sweep_tables(rows: list[dict], experiment: dict) -> str:
    """The paper's layout: per swept path and metric, one row per defense, one column per value, and the average."""
    parts = []
    for path, (values, line) in sweep_lines(rows, experiment).items():
        name = path.rsplit(".", 1)[-1]
        for metric, title in METRICS.items():
            parts.append(f"\n### {title} against {name}\n")
            parts.append("| defense | " + " | ".join(f"{name}={v}" for v in values) + " | average |")
            parts.append("|---|" + "---|" * (len(values) + 1))
            for label in dict.fromkeys(r["defense"] for r in line):
                cells = [next((r[metric] for r in line if r["defense"] == label and r.get(path) == v), None) for v in values]
                parts.append(f"| {label} | " + " | ".join(_fmt(c) for c in cells) + f" | {_fmt(_mean(cells))} |")
    return "\n".join(parts) + ("\n" if parts else "")


def sweep_figure(path: str, values: list, line: list[dict]):
    """Harmful score and fine-tune accuracy against one swept setting, one line per defense."""
    import matplotlib.pyplot as plt

    name = path.rsplit(".", 1)[-1]
    numeric = all(isinstance(v, int | float) and v > 0 for v in values)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=DPI)
    for ax, (metric, title) in zip(axes, METRICS.items(), strict=True):
        for label in dict.fromkeys(r["defense"] for r in line):
            points = sorted((r[path], r[metric]) for r in line if r["defense"] == label and r[metric] is not None)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=label)
        if numeric and max(values) / min(values) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_title(f"{title} against {name}")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def categories_of(rows: list[dict]) -> list[str]:
    """The prompt categories any row reports a harmful score for, in the order first met."""
    return list(dict.fromkeys(name for row in rows for name in row.get("harmful_by_category") or {}))


CATEGORY_COLUMNS = (("harmful_score", "value"), ("harmful_count", "count"), ("prompts", "of"))


def _category_cells(row: dict, categories: Sequence[str]) -> dict:
    """The CSV cells of a row's per-category rates: harmful_score[NAME], harmful_count[NAME], prompts[NAME]."""
    rates = row.get("harmful_by_category") or {}
    return {f"{column}[{name}]": rates[name][key] for name in categories if name in rates
            for column, key in CATEGORY_COLUMNS}


def category_markdown(rows: list[dict], sweep: Sequence[str]) -> str:
    """The harmful score per prompt category of every row: % [95% CI] (harmful / prompts)."""
    categories = categories_of(rows)
    if not categories:
        return ""
    lines = ["\n### Harmful score by prompt category, % [95% CI] (harmful / prompts)\n",
             "| " + " | ".join([*sweep, "stage", "defense", "setting", *categories]) + " |",
             "|" + "---|" * (len(sweep) + 3 + len(categories))]
    for row in rows:
        rates = row.get("harmful_by_category") or {}
        cells = [_fmt(row.get(key)) for key in (*sweep, "stage", "defense", "setting")]
        cells += [Rate.model_validate(rates[name]).counted() if name in rates else "" for name in categories]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def category_figure(rows: list[dict], sweep: Sequence[str]):
    """The harmful score per prompt category of every row (base, aligned, the fine-tuned model with each defense),
    with 95% intervals: the categories before and after each defense."""
    categories = categories_of(rows)
    series = {}
    for row in rows:
        label = row["defense"] + "".join(f", {path.rsplit('.', 1)[-1]}={row.get(path)}" for path in sweep)
        rates = row.get("harmful_by_category") or {}
        series[label] = [(rates[name]["value"], rates[name]["low"], rates[name]["high"]) if name in rates else None
                         for name in categories]
    return category_bars(categories, series, "harmful score by prompt category (95% CI)")


def _csv(rows: list[dict], sweep: Sequence[str]) -> str:
    categories = categories_of(rows)
    columns = [f"{column}[{name}]" for name in categories for column, _ in CATEGORY_COLUMNS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*sweep, *COLUMNS, *columns], extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, **_category_cells(row, categories)} for row in rows)
    return buffer.getvalue()


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _x_axis(rows: list[dict], sweep: Sequence[str]) -> str | None:
    """What to plot against: a swept setting that varies, else the pruning ratio when it varies."""
    for path in sweep:
        if len({row.get(path) for row in rows}) > 1 and not path.startswith("defenses."):
            return path
    return "ratio" if len({row["ratio"] for row in rows if row["ratio"] is not None}) > 1 else None




def _plot_metric(ax, rows: list[dict], metric: str, x_key: str | None) -> None:
    if x_key is None:  # one bar per defense, horizontal: a long name takes a row, never a neighbour's place
        ax.barh(range(len(rows)), [r[metric] or 0 for r in rows], color="tab:blue")
        ax.set_yticks(range(len(rows)), [r["defense"] for r in rows])
        ax.set_ylim(max(len(rows), 1) - 0.5, -0.5)  # first row on top (a limit, not invert_yaxis: the axes share y)
        ax.set_xlim(-2, 102)
        return
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r[x_key], r[metric]) for r in rows if r["method"] == method and r[x_key] is not None and r[metric] is not None)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=method)
        elif x_key == "ratio" and method == "none":  # the undefended model has no ratio: a horizontal line
            # (methods with other knobs, the post-fine-tuning peers, are in the trade-off plot)
            for value in sorted({r[metric] for r in rows if r["method"] == method and r[metric] is not None}):
                ax.axhline(value, linestyle="--", color="gray", label=method)
    ax.set_xlabel(x_key)
    ax.set_ylim(-2, 102)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))  # one entry per method, even with several horizontal lines
    ax.legend(unique.values(), unique.keys(), fontsize=8)


def metrics_figure(rows: list[dict], sweep: Sequence[str]):
    """Harmful score and fine-tune accuracy of the defended (fine-tuned) rows, against the swept setting."""
    import matplotlib.pyplot as plt

    defended = [r for r in rows if r["stage"] == "fine-tuned"]
    x_key = _x_axis(defended, sweep)
    bars = x_key is None
    height = max(4.0, 0.25 * len(defended) + 1.5) if bars else 4.0
    fig, axes = plt.subplots(1, 2, figsize=(11, height), sharey=bars, dpi=DPI)
    for ax, metric, title in zip(axes, ("harmful_score", "finetune_accuracy"), ("harmful score (%)", "fine-tune accuracy (%)"), strict=True):
        _plot_metric(ax, defended, metric, x_key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def tradeoff_figure(rows: list[dict]):
    """Every row as a point (fine-tune accuracy, harmful score); coinciding rows share one label."""
    points = [(r["finetune_accuracy"], r["harmful_score"], r["defense"]) for r in rows
              if r["harmful_score"] is not None and r["finetune_accuracy"] is not None]
    return tradeoff_axes(points, "safety / accuracy trade-off")


def plot(rows: list[dict], sweep: Sequence[str], out: Path, experiment: dict | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    paths = [save_figure(metrics_figure(rows, sweep), out / "metrics.png"),
             save_figure(tradeoff_figure(rows), out / "tradeoff.png")]
    for path, (values, line) in sweep_lines(rows, experiment or {}).items():
        paths.append(save_figure(sweep_figure(path, values, line), out / f"sweep-{path.rsplit('.', 1)[-1]}.png"))
    if categories_of(rows):
        paths.append(save_figure(category_figure(rows, sweep), out / "categories.png"))
    return paths


def write_results(rows: list[dict], out: Path, sweep: Sequence[str], experiment: dict) -> dict[str, Path]:
    rows = add_deltas(rows, sweep)
    files = {"csv": out / "results.csv", "markdown": out / "results.md", "json": out / "results.json"}
    _write_text(files["csv"], _csv(rows, sweep))
    _write_text(files["markdown"], markdown_table(rows, sweep) + sweep_tables(rows, experiment)
                + category_markdown(rows, sweep))
    write_json(files["json"], {"experiment": experiment, "rows": rows})
    for path in plot(rows, sweep, out, experiment):
        files[path.stem] = path
    return files
