"""`kdcli list-losses`: the registry's facts as one JSON-ready document, and as rich tables
(torch-free; `cli.py` parses and calls these)."""

from __future__ import annotations

import os

from rich.console import Console


def feature_choices() -> list[str]:
    from typing import get_args

    from kdcli.registry import Feature

    return list(get_args(Feature))


def losses_document(feature: str | None) -> dict:
    """The registry's facts as one JSON-ready document (losses filtered by feature)."""
    from kdcli import registry

    return {
        "losses": [s.to_dict() for s in registry.LOSSES if feature is None or s.feature == feature],
        "projections": [p.to_dict() for p in registry.PROJECTIONS],
        "schedulers": [s.to_dict() for s in registry.SCHEDULERS],
        "min_temperature": registry.MIN_TEMPERATURE,
    }


#: Width of the list-losses tables when stdout is not a terminal (a file or pipe has no width).
_TABLE_WIDTH = 160


def render_losses(doc: dict, out: Console) -> None:
    """`kdcli list-losses`' tables on `out` (stdout)."""
    from rich.table import Table

    # A terminal sets its own width; a file or pipe gets wide tables unless COLUMNS says otherwise.
    console = out if out.is_terminal or os.environ.get("COLUMNS") else Console(width=_TABLE_WIDTH)

    def table(title: str, *columns: str) -> Table:
        t = Table(title=title, title_justify="left", show_lines=True)
        for i, name in enumerate(columns):
            t.add_column(name, style="bold" if i == 0 else None, no_wrap=i == 0, overflow="fold")
        return t

    losses = table(
        "Losses",
        "name",
        "aliases",
        "feature",
        "layers per side",
        "input shapes",
        "needs proj when sizes differ",
        "formula",
    )
    for loss in doc["losses"]:
        proj = {"hidden": "yes: hidden sizes must agree", "heads": "no; head counts must agree"}
        losses.add_row(
            loss["name"],
            ", ".join(loss["aliases"]) or "-",
            loss["feature"],
            str(loss["layers_per_side"]),
            loss["shapes"],
            proj.get(loss["same_size"], "no"),
            loss["formula"],
        )
    console.print(losses)

    projections = table("Projections (student size -> teacher size)", "name", "formula")
    for proj in doc["projections"]:
        projections.add_row(proj["name"], proj["formula"])
    console.print(projections)

    schedulers = table("Schedulers", "name", "kind", "params", "formula")
    for sched in doc["schedulers"]:
        schedulers.add_row(sched["name"], sched["kind"], ", ".join(sched["params"]) or "-", sched["formula"])
    console.print(schedulers)
    console.print(f"Scheduled temperatures are clamped to at least {doc['min_temperature']}.")
