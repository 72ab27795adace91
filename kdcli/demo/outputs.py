"""What the two quickstarts share about their outputs: the checkout's recipes/ and runs/, paths
shown relative to the checkout, what a finished run folder holds, and the figures document."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
RUNS = REPO / "runs"


def is_finished(folder: Path) -> bool:
    """A folder holds a finished run: the saved model and the run's summary are all there."""
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "summary.json"))


def rel(path: Path) -> str:
    """`path` relative to the checkout when it lies inside it (as the tables show folders)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def write_figures(path: Path, doc: dict) -> None:
    """The demo's figures as JSON (with the torch threads they were measured with), atomically."""
    import torch

    from kdcli.run_files.atomic_files import atomic_write_json

    atomic_write_json(path, {**doc, "threads": torch.get_num_threads()})
