"""Plot helpers shared by the lab and the frontier: labelled points that never overlap, one save path."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

DPI = 120  # figures are laid out at the resolution they are saved with


def group_points(points: Sequence[tuple[float, float, str]], digits: int = 2) -> list[tuple[float, float, str]]:
    """Points that coincide (equal to `digits` decimals) as one labelled point: ("none, random-0.2").

    Order is first appearance; a name repeated at one point (the same defense in two settings) is given once.
    """
    groups: dict[tuple[float, float], list[str]] = {}
    for x, y, name in points:
        names = groups.setdefault((round(x, digits), round(y, digits)), [])
        if name not in names:
            names.append(name)
    return [(x, y, ", ".join(names)) for (x, y), names in groups.items()]


# Where a label may sit relative to its point, in points: nearest first, the usual up-right place first.
_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1), (0, -1), (1, 0), (-1, 0))
_OFFSETS = tuple((dx * r, dy * r) for r in (5, 12, 22, 34, 48) for dx, dy in _DIRECTIONS)


def place_labels(ax, groups: Sequence[tuple[float, float, str]], colors: Sequence | None = None, fontsize: float = 8) -> list:
    """Annotate each (x, y, label) at the first offset where it overlaps no other label and no point and
    stays inside the axes; if none does, where it overlaps least. A label set away from its point gets a
    thin leader line, in the point's color. Deterministic: same input, same places.

    Needs the figure laid out already (its final size and axes positions): placement is in display units.
    """
    from matplotlib.text import Text

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    frame = (frame.x0, frame.y0, frame.x1, frame.y1)
    marker = 3.5 * fig.dpi / 72  # half the size of a marker (s=40 is about 6.3 points across), in pixels
    obstacles = []
    for x, y, _ in groups:
        px, py = ax.transData.transform((x, y))
        obstacles.append((px - marker, py - marker, px + marker, py + marker))
    placed = []
    for index, (x, y, label) in enumerate(groups):
        best = None  # (cost, offset, box)
        for dx, dy in _OFFSETS:
            note = _annotate(ax, label, (x, y), (dx, dy), fontsize)
            note.update_positions(renderer)
            text_box = Text.get_window_extent(note, renderer)  # the text alone, without a leader line
            note.remove()
            box = (text_box.x0 - 1, text_box.y0 - 1, text_box.x1 + 1, text_box.y1 + 1)
            cost = _area(box) - _overlap(box, frame) + sum(_overlap(box, other) for other in obstacles)
            if best is None or cost < best[0]:
                best = (cost, (dx, dy), box)
            if cost == 0:
                break
        _, offset, box = best
        color = colors[index] if colors is not None else "black"
        leader = {"arrowstyle": "-", "lw": 0.6, "color": color, "shrinkA": 0, "shrinkB": 4} if max(map(abs, offset)) > 5 else None
        placed.append(_annotate(ax, label, (x, y), offset, fontsize, color=color, arrowprops=leader))
        obstacles.append(box)
    return placed


def _annotate(ax, label: str, xy, offset: tuple[float, float], fontsize: float, **kwargs):
    dx, dy = offset
    ha = "left" if dx > 0 else "right" if dx < 0 else "center"
    va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
    return ax.annotate(label, xy, xytext=offset, textcoords="offset points", ha=ha, va=va, fontsize=fontsize, **kwargs)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _area(box: tuple[float, ...]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def tradeoff_axes(points: Sequence[tuple[float, float, str]], title: str,
                  lines: dict[str, Sequence[tuple[float, float]]] | None = None):
    """Harmful score against fine-tune accuracy: each (accuracy, harmful score, label) a point; coinciding
    points share one label; labels placed so they overlap neither each other nor the points. `lines` are
    unlabelled curves named in a legend (e.g. controls)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5), dpi=DPI)
    for name, curve in (lines or {}).items():
        if curve:
            ax.plot(*zip(*curve, strict=True), marker=".", linestyle="--", alpha=0.7, label=name)
    if lines:
        ax.legend(fontsize=8, loc="lower left")
    groups = group_points(points)
    colors = [ax.scatter(x, y, s=40).get_facecolor()[0] for x, y, _ in groups]
    ax.set_xlabel("fine-tune accuracy (%), higher is better")
    ax.set_ylabel("harmful score (%), lower is safer")
    ax.set_title(title)
    ax.set_xlim(-5, 105)
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    fig.tight_layout()  # before the labels: they are placed in the final layout and kept inside the axes
    place_labels(ax, groups, colors)
    return fig


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=fig.dpi)
    plt.close(fig)
    return path


def category_bars(categories: Sequence[str], series: dict[str, Sequence[tuple[float, float, float] | None]],
                  title: str, xlabel: str = "harmful score (%), lower is safer"):
    """Per category (a row, first on top), one horizontal bar per series (e.g. before and after a repair) with its
    interval: `series[name][i]` is (value, low, high) for `categories[i]`, or None where it was not measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = max(len(series), 1)
    height = 0.8 / count
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.3 * len(categories) * count + 1.5)), dpi=DPI)
    for index, (name, values) in enumerate(series.items()):
        rows = [(row, value) for row, value in enumerate(values) if value is not None]
        if not rows:
            continue
        ys = [row + (index - (count - 1) / 2) * height for row, _ in rows]
        xs = [value[0] for _, value in rows]
        errors = [[value[0] - value[1] for _, value in rows], [value[2] - value[0] for _, value in rows]]
        ax.barh(ys, xs, height=height, xerr=errors, capsize=2, label=name, error_kw={"lw": 0.8})
    ax.set_yticks(range(len(categories)), list(categories), fontsize=8)
    ax.set_ylim(len(categories) - 0.5, -0.5)
    ax.set_xlim(0, 102)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig
