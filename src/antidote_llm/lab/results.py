"""The lab's tables and plots: one row per (setting, defense), deltas against no defense."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

from antidote_llm.runtime.outputs import write_json

COLUMNS = ("stage", "defense", "method", "ratio", "harmful_score", "degenerate_rate", "compliance_rate", "finetune_accuracy",
           "delta_harmful_score", "delta_finetune_accuracy", "pruned_fraction", "defense_s", "align_s", "finetune_s")


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


def markdown_table(rows: list[dict], sweep: Sequence[str]) -> str:
    headers = [*sweep, "stage", "defense", "ratio", "HS %", "degenerate %", "complies %", "FA %", "ΔHS", "ΔFA", "pruned %", "defense s"]
    keys = [*sweep, "stage", "defense", "ratio", "harmful_score", "degenerate_rate", "compliance_rate", "finetune_accuracy",
            "delta_harmful_score", "delta_finetune_accuracy", "pruned_fraction", "defense_s"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = []
        for key in keys:
            value = row.get(key)
            if key == "pruned_fraction" and value is not None:
                value = 100 * value
            cells.append(_fmt(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict], sweep: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*sweep, *COLUMNS], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
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
    if x_key is None:
        labels = [r["defense"] for r in rows]
        ax.bar(range(len(rows)), [r[metric] or 0 for r in rows], color="tab:blue")
        ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right")
        return
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r[x_key], r[metric]) for r in rows if r["method"] == method and r[x_key] is not None and r[metric] is not None)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=method)
        elif x_key == "ratio":  # the undefended model has no ratio: a reference line
            for value in {r[metric] for r in rows if r["method"] == method and r[metric] is not None}:
                ax.axhline(value, linestyle="--", color="gray", label=method)
    ax.set_xlabel(x_key)
    ax.legend(fontsize=8)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(rows: list[dict], sweep: Sequence[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    defended = [r for r in rows if r["stage"] == "fine-tuned"]
    x_key = _x_axis(defended, sweep)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in zip(axes, ("harmful_score", "finetune_accuracy"), ("harmful score (%)", "fine-tune accuracy (%)"), strict=True):
        _plot_metric(ax, defended, metric, x_key)
        ax.set_title(title)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    metrics_path = _save(fig, out / "metrics.png")

    fig, ax = plt.subplots(figsize=(6, 5))
    for row in rows:
        if row["harmful_score"] is None or row["finetune_accuracy"] is None:
            continue
        ax.scatter(row["finetune_accuracy"], row["harmful_score"], s=40)
        ax.annotate(row["defense"], (row["finetune_accuracy"], row["harmful_score"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("fine-tune accuracy (%), higher is better")
    ax.set_ylabel("harmful score (%), lower is safer")
    ax.set_title("safety / accuracy trade-off")
    ax.set_xlim(-5, 105)
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    return [metrics_path, _save(fig, out / "tradeoff.png")]


def write_results(rows: list[dict], out: Path, sweep: Sequence[str], experiment: dict) -> dict[str, Path]:
    rows = add_deltas(rows, sweep)
    files = {"csv": out / "results.csv", "markdown": out / "results.md", "json": out / "results.json"}
    _write_text(files["csv"], _csv(rows, sweep))
    _write_text(files["markdown"], markdown_table(rows, sweep))
    write_json(files["json"], {"experiment": experiment, "rows": rows})
    for path in plot(rows, sweep, out):
        files[path.stem] = path
    return files
