"""The lab's plots print no text over other text: coinciding points share a label, labels are placed apart."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from antidote_llm.lab.results import metrics_figure, plot, tradeoff_figure  # noqa: E402
from antidote_llm.runtime.plotting import group_points  # noqa: E402


def row(defense, hs, fa, stage="fine-tuned", method=None, ratio=None):
    method = method or defense.rsplit("-", 1)[0]
    return {"stage": stage, "defense": defense, "method": method, "ratio": ratio, "harmful_score": hs, "finetune_accuracy": fa}


CROWDED = [
    row("base", 10.0, 50.0, stage="base", method="none"), row("aligned", 5.0, 52.0, stage="aligned", method="none"),
    row("none", 60.0, 90.0), row("random-0.2", 60.0, 90.0),  # the same point: one label
    row("antidote-0.05", 58.0, 89.5), row("antidote-0.1", 59.0, 90.5),  # nearby
    row("antidote-benign-calibrated-0.2", 61.0, 91.0), row("magnitude-0.2", 100.0, 100.0),  # a corner
    row("wanda-0.2", 0.0, 0.0), row("sparsegpt-0.2", 0.5, 0.5),  # the opposite corner
]


def boxes(texts, renderer):
    """Display boxes of drawn, non-empty texts (an annotation's text alone, not its leader line)."""
    return [(t.get_text(), Text.get_window_extent(t, renderer)) for t in texts if t.get_visible() and t.get_text()]


def overlapping(named_boxes):
    return [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(named_boxes, 2) if box_a.overlaps(box_b)]


def drawn_texts(fig):
    """Every text a reader sees: titles, axis labels, tick labels in view, annotations, legend entries."""
    fig.canvas.draw()
    texts = []
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            lo, hi = min(lo, hi), max(lo, hi)
            texts += [t.label1 for t in axis.get_major_ticks() if lo <= t.get_loc() <= hi and t.label1.get_visible()]
        if ax.get_legend():
            texts += ax.get_legend().get_texts()
    return boxes(texts, fig.canvas.get_renderer())


def test_coinciding_points_share_one_label():
    points = [(90.0, 60.0, "none"), (90.0, 60.0, "random-0.2"), (90.004, 60.0, "none"), (50.0, 10.0, "base")]
    assert group_points(points) == [(90.0, 60.0, "none, random-0.2"), (50.0, 10.0, "base")]


def test_tradeoff_labels_do_not_overlap_each_other_or_leave_the_axes():
    fig = tradeoff_figure(CROWDED)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.texts]
    assert "none, random-0.2" in labels and len(labels) == len(CROWDED) - 1  # one label per distinct point
    named = drawn_texts(fig)
    assert not overlapping(named)
    frame = ax.get_window_extent(fig.canvas.get_renderer())
    for text, box in boxes(ax.texts, fig.canvas.get_renderer()):
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, text
    positions = [t.xyann for t in ax.texts]
    plt.close(fig)
    again = tradeoff_figure(CROWDED)
    assert [t.xyann for t in again.axes[0].texts] == positions  # deterministic
    plt.close(again)


def test_metrics_bars_with_many_long_names_do_not_overlap():
    rows = [row(f"antidote-benign-calibrated-{i / 100:.2f}", 50.0 + i, 80.0 - i, method="antidote-benign") for i in range(14)]
    fig = metrics_figure(rows, sweep=[])
    named = drawn_texts(fig)
    assert {f"antidote-benign-calibrated-{i / 100:.2f}" for i in range(14)} <= {name for name, _ in named}
    assert not overlapping(named)
    plt.close(fig)


def test_metrics_lines_against_the_ratio_name_each_method_once():
    rows = [row("none", 60.0, 90.0, method="none")] + [
        row(f"{m}-{r}", 50.0 - 100 * r, 85.0, method=m, ratio=r) for m in ("antidote", "random") for r in (0.05, 0.1, 0.2)
    ]
    rows.append(row("none-again", 61.0, 89.0, method="none"))  # a second undefended value: still one legend entry
    fig = metrics_figure(rows, sweep=[])
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["none", "antidote", "random"]
    assert not overlapping(drawn_texts(fig))
    plt.close(fig)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("rows", [CROWDED, [row("none", 60.0, None)], [row("base", 1.0, 2.0, stage="base")], []])
def test_plot_writes_both_pictures(tmp_path, rows):
    paths = plot(rows, [], tmp_path)
    assert [p.name for p in paths] == ["metrics.png", "tradeoff.png"] and all(p.stat().st_size > 0 for p in paths)


def test_one_at_a_time_sweep_gives_the_papers_tables_and_a_plot_per_setting(tmp_path):
    from antidote_llm.lab.config import expand_sweep, parse_experiment
    from antidote_llm.lab.results import sweep_tables, write_results

    lr, ep = "finetune.training.overrides.learning_rate", "finetune.training.overrides.epochs"
    raw = {"model": {"model": "m"}, "realign_data": {"source": "r.json"},
           "finetune": {"task": "sst2", "harmful": {"source": "h.json"}, "harmful_fraction": 0.1, "samples": 10,
                        "training": {"overrides": {"learning_rate": 1e-3, "epochs": 1}}},
           "defenses": {"none": {"method": "none"}}, "evaluation": {"harmful_prompts": {"source": "p.json"}},
           "sweep": {lr: [1e-4, 1e-3, 1e-2], ep: [1, 2, 4]}, "sweep_mode": "each"}
    experiment = parse_experiment(raw, tmp_path)
    combos = [values for values, _ in expand_sweep(experiment)]
    assert len(combos) == 5  # 3 + 3 with the file's own point (1e-3, 1) once
    assert all(c[lr] == 1e-3 or c[ep] == 1 for c in combos)

    rows = [{**c, **row(d, hs=100 * c[lr] + c[ep] + (d == "x"), fa=50.0)} for c in combos for d in ("none", "x")]
    text = sweep_tables(rows, experiment.model_dump(mode="json"))
    assert "| defense | learning_rate=0.0001 | learning_rate=0.001 | learning_rate=0.01 | average |" in text
    assert "| none | 1.0 | 1.1 | 2.0 | 1.4 |" in text and "| x | 2.0 | 2.1 | 3.0 | 2.4 |" in text  # 100 lr + epochs (+1)
    assert "| none | 1.1 | 2.1 | 4.1 | 2.4 |" in text  # the epoch table keeps lr at the file's 1e-3
    files = write_results(rows, tmp_path, list(experiment.sweep), experiment.model_dump(mode="json"))
    assert files["sweep-learning_rate"].stat().st_size > 0 and files["sweep-epochs"].stat().st_size > 0
    assert "### harmful score (%) against epochs" in files["markdown"].read_text()
