"""The encoder tasks' metrics (kdcli/tasks/classification_metrics.py)."""

import pytest

from kdcli.tasks.classification_metrics import classification_metrics


def test_classification_metrics_accuracy_ignores_minus_100():
    m = classification_metrics([1, 0, 1, 1], [1, 1, -100, 1])
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["examples"] == 3
    assert "f1" not in m


def test_classification_metrics_micro_f1_over_non_o_tags():
    # O = 0. labels: B-PER(1) O B-LOC(2) O ; predictions: B-PER O O B-LOC
    m = classification_metrics([1, 0, 0, 2], [1, 0, 2, 0], outside_id=0)
    assert m["precision"] == pytest.approx(1 / 2)  # 2 predicted non-O, 1 right
    assert m["recall"] == pytest.approx(1 / 2)  # 2 actual non-O, 1 found
    assert m["f1"] == pytest.approx(1 / 2)
    assert m["accuracy"] == pytest.approx(2 / 4)
