"""Curves with matplotlib (kdcli/plots.py): the optional `plot` extra, what kdcli says without
it, and a figure drawn to PNG without pyplot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kdcli.plots import INSTALL, Panel, PlotsUnavailable, draw, png_bytes, save_png

PANELS = [
    Panel("loss", {"a": [(1, 2.0), (2, 1.5), (3, 1.2)], "b": [(1, 2.2), (3, 1.9)]}),
    Panel("eval", {"a": [(3, 0.8)], "b": []}, levels={"a": 0.9}, markers=True),
]


def test_matplotlib_is_the_plot_extra_that_make_setup_installs(repo_root: Path) -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["plot"] == ["matplotlib>=3.7"]
    assert not any(d.startswith("matplotlib") for d in project["dependencies"])
    assert "install -e '.[dev,plot]'" in (repo_root / "Makefile").read_text()
    assert INSTALL == "pip install 'kdcli[plot]'"


def test_a_figure_of_panels_to_png(tmp_path: Path) -> None:
    fig = draw(PANELS, title="t", names={"a": "run a"}, level_name="teacher")
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["loss", "eval"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["run a", "b", "teacher"]
    loss = fig.axes[0]
    assert [line.get_color() for line in loss.get_lines()] == ["#1f77b4", "#ff7f0e"]  # a run keeps its colour
    assert png_bytes(fig)[:8] == b"\x89PNG\r\n\x1a\n"
    path = save_png(fig, tmp_path / "sub" / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in path.parent.iterdir()] == ["f.png"]


def test_no_panels_says_nothing_was_logged() -> None:
    fig = draw([])
    assert [t.get_text() for t in fig.axes[0].texts] == ["nothing logged yet"]


def test_without_matplotlib_one_error_naming_the_extra(monkeypatch) -> None:
    for name in [m for m in sys.modules if m.startswith("matplotlib")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(PlotsUnavailable) as caught:
        draw(PANELS)
    assert "pip install 'kdcli[plot]'" in str(caught.value) and caught.value.exit_code == 1
