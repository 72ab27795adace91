"""The objective a checkpoint was trained for, and `--resume` refusing another one.

Each checkpoint's `meta.json` records the recipe values that define what the loss terms
measure (`objective_values`): the KD divergence, its options, the temperature and its
schedule, whether probabilities are shifted, and each intermediate match but its weight.
Resuming with any of them changed would log two different quantities under one `loss/kd`
(or one match's name), so `check_resume` refuses it, naming each recipe path with the old and
new value. Weights (`kd_loss_weight`, `hard_label_weight`, a match's `weight`) and the learning
rate only scale terms, and may change on resume (a new rate is followed, with a warning).
Checkpoints written before this record existed are resumed unchecked. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdcli.errors import UsageError
from kdcli.run_files.checkpoint_layout import META_FILE

#: the `distillation` fields that define what the loss terms measure
OBJECTIVE_FIELDS = ("kd_loss_type", "kd_loss_options", "temperature", "temperature_scheduler", "probability_shift")
#: the key of the record in a checkpoint's meta.json
META_KEY = "objective"


def objective_values(recipe) -> dict[str, Any]:
    """Dotted recipe path -> JSON value of each field that defines the objective ({} for train)."""
    dist = recipe.distillation
    if dist is None:
        return {}
    values = {f"distillation.{name}": _plain(getattr(dist, name)) for name in OBJECTIVE_FIELDS}
    for i, match in enumerate(dist.intermediate_matches):
        values[f"distillation.intermediate_matches[{i}]"] = match.model_dump(mode="json", exclude={"weight"})
    return values


def _plain(value: Any) -> Any:
    """A recipe value as JSON would hold it (tuples as lists; pydantic models dumped)."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    return json.loads(json.dumps(value, default=str))


def saved_objective(checkpoint: Path) -> dict[str, Any] | None:
    """The objective recorded in a checkpoint's meta.json; None when it has none (older runs)."""
    try:
        meta = json.loads((Path(checkpoint) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    record = meta.get(META_KEY) if isinstance(meta, dict) else None
    return record if isinstance(record, dict) else None


def check_resume(checkpoint: Path | None, recipe) -> None:
    """UsageError naming every objective value that differs from the checkpoint's run."""
    saved = saved_objective(checkpoint) if checkpoint is not None else None
    if saved is None:
        return
    now = objective_values(recipe)
    changed = [
        f"{path} {_shown(saved.get(path))} -> {_shown(now.get(path))}"
        for path in sorted(set(saved) | set(now))
        if saved.get(path) != now.get(path)
    ]
    if changed:
        raise UsageError(
            f"--resume: the checkpoint {checkpoint} was trained for another objective than this "
            f"recipe's ({'; '.join(changed)}). Fix: resume with the checkpoint's values, or train "
            "the new objective in a new training.output_dir (--output-dir) or with --overwrite"
        )


def _shown(value: Any) -> str:
    return "(none)" if value is None else json.dumps(value, sort_keys=True)
