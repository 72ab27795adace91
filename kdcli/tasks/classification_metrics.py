"""The encoder tasks' evaluation metrics: accuracy, and for token classification micro
precision/recall/F1 over the non-O tags (positions labelled IGNORE_INDEX are not scored)."""

from __future__ import annotations

from collections.abc import Sequence

from kdcli.tasks import IGNORE_INDEX


def classification_metrics(
    predictions: Sequence[int], labels: Sequence[int], *, outside_id: int | None = None
) -> dict[str, float]:
    """Accuracy over positions whose label is not -100; with `outside_id` (the "O" tag of a
    token-classification task) also micro precision/recall/F1 over the non-O tags:
    a prediction counts as a true positive when it equals a non-O label.

    predictions, labels: flat sequences of the same length.
    """
    pairs = [(int(p), int(y)) for p, y in zip(predictions, labels) if int(y) != IGNORE_INDEX]
    n = len(pairs)
    out: dict[str, float] = {"accuracy": (sum(p == y for p, y in pairs) / n) if n else 0.0, "examples": n}
    if outside_id is not None:
        tp = sum(1 for p, y in pairs if p == y and y != outside_id)
        predicted = sum(1 for p, _ in pairs if p != outside_id)
        actual = sum(1 for _, y in pairs if y != outside_id)
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        out["precision"] = precision
        out["recall"] = recall
        out["f1"] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return out
