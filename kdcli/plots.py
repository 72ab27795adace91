"""Curves drawn with matplotlib, which is optional (the `plot` extra): panels of (step, value)
lines, one colour a series across every panel, saved as PNG.

matplotlib's object API only (a `Figure` and the Agg canvas): no pyplot, no global backend, so
drawing works without a display and leaves the caller's matplotlib state alone. Without
matplotlib, `PlotsUnavailable` says how to get it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kdcli.errors import KdcliError
from kdcli.run_files.atomic_files import atomic_write

INSTALL = "pip install 'kdcli[plot]'"
#: panels a row of the figure holds
COLUMNS = 3
#: matplotlib's default colour cycle (tab10)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


class PlotsUnavailable(KdcliError):
    """matplotlib is not installed (or does not import)."""


@dataclass
class Panel:
    """One axes: a title, series by label, and dashed reference levels by label."""

    title: str
    series: dict[str, list[tuple[float, float]]]
    levels: dict[str, float] = field(default_factory=dict)
    xlabel: str = "step"
    markers: bool = False  # draw each point (few points: evaluations)


def figure_class():
    """matplotlib's Figure, or PlotsUnavailable naming the extra that brings it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotsUnavailable(
            f"drawing curves needs matplotlib, which does not import here ({exc}). Fix: {INSTALL} "
            "(or pip install matplotlib)"
        ) from None
    return Figure


def colors_for(labels: Sequence[str]) -> dict[str, str]:
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}


def draw(
    panels: Sequence[Panel],
    *,
    title: str = "",
    colors: dict[str, str] | None = None,
    names: dict[str, str] | None = None,
    level_name: str = "",
    columns: int = COLUMNS,
):
    """A Figure of `panels` in rows of `columns`, with one legend on top: a series keeps its
    colour in every panel (`colors`, else the palette in order of first appearance) and is
    named `names[label]` (default: the label); `level_name` names the dashed levels."""
    figure = figure_class()
    labels = list(dict.fromkeys(label for p in panels for label in (*p.series, *p.levels)))
    colors = {**colors_for(labels), **(colors or {})}
    names = names or {}
    columns = max(1, min(columns, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    fig = figure(figsize=(4.4 * columns, 3.1 * rows + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        _draw_panel(ax, panel, colors)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if not panels:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "nothing logged yet", ha="center", va="center", transform=axes[0].transAxes)
    handles = _legend(fig, panels, labels, colors, names, level_name)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def _draw_panel(ax, panel: Panel, colors: dict[str, str]) -> None:
    for label, points in panel.series.items():
        if not points:
            continue
        xs, ys = zip(*points)
        marker = "o" if panel.markers or len(points) < 3 else None
        ax.plot(xs, ys, color=colors[label], marker=marker, markersize=3.5, linewidth=1.6)
    for label, level in panel.levels.items():
        if math.isfinite(level):
            ax.axhline(level, color=colors[label], linestyle="--", linewidth=1.1, alpha=0.8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(panel.xlabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)


def _legend(fig, panels, labels, colors, names, level_name) -> list:
    from matplotlib.lines import Line2D

    shown = [label for label in labels if any(p.series.get(label) for p in panels)]
    handles = [Line2D([], [], color=colors[label], linewidth=2, label=names.get(label, label)) for label in shown]
    if level_name and any(p.levels for p in panels):
        handles.append(Line2D([], [], color="#555555", linestyle="--", label=level_name))
    return handles


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def save_png(fig, path: Path) -> Path:
    """The figure written to `path` atomically (a crash leaves the old file or the new one)."""
    data = png_bytes(fig)
    return atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))
