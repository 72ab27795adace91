"""The options a KD loss takes in a recipe (`distillation.kd_loss_options`): type, range,
default. Torch-free; `kdcli.registry` attaches them to its losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class OptionSpec:
    """One option of a KD loss (`distillation.kd_loss_options`): its type, range and default.

    kind: "unit" (a number in [0, 1]), "count" (an integer >= 1, or null for off), "bool",
    or "choice" (one of `choices`)."""

    name: str
    kind: Literal["unit", "count", "bool", "choice"]
    default: Any
    doc: str
    choices: tuple[str, ...] = ()

    def check(self, value: Any) -> str | None:
        """What is wrong with `value` for this option (None when it is fine)."""
        if self.kind == "unit":
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            return None if number and 0 <= value <= 1 else "a number in [0, 1]"
        if self.kind == "count":
            whole = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
            return None if whole else "an integer >= 1 (or null: off)"
        if self.kind == "bool":
            return None if isinstance(value, bool) else "true or false"
        return None if value in self.choices else "one of " + ", ".join(self.choices)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "default": self.default,
            "doc": self.doc,
            "choices": list(self.choices),
        }


#: Options every divergence on next-token distributions takes (`kdcli.losses.divergences`).
DIVERGENCE_OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("t_squared", "bool", False, "multiply the loss by T^2 (Hinton et al. 2015)"),
    OptionSpec("top_k", "count", None, "use only the teacher's k most likely tokens (null: the whole vocabulary)"),
    OptionSpec(
        "top_k_mode",
        "choice",
        "renormalise",
        "renormalise: both distributions renormalised over the k ids; tail: the k ids plus one bucket holding the rest of each distribution's mass",
        ("renormalise", "tail"),
    ),
)
