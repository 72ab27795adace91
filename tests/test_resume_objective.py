"""kdcli.engine.resume_objective: what a checkpoint's meta.json records of the objective, and
--resume refusing another one (the run itself: tests/test_distill.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdcli.engine.resume_objective import META_KEY, check_resume, objective_values
from kdcli.errors import UsageError
from kdcli.recipe import Recipe


def _recipe(**distillation) -> Recipe:
    return Recipe.model_validate(
        {
            "teacher": {"model": "t"},
            "student": {"model": "s"},
            "task": "causal-lm",
            "data": {"train": "train.jsonl", "text_column": "text"},
            "distillation": {"kd_loss_type": "forward_kl", **distillation},
        }
    )


def _checkpoint(folder: Path, recipe: Recipe | None) -> Path:
    folder.mkdir()
    meta = {"step": 3} | ({META_KEY: objective_values(recipe)} if recipe is not None else {})
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_a_changed_top_k_names_its_path_and_both_values(tmp_path: Path) -> None:
    saved = _checkpoint(tmp_path / "step-3", _recipe(kd_loss_options={"top_k": 8}))
    check_resume(saved, _recipe(kd_loss_options={"top_k": 8}, kd_loss_weight=0.5))  # a weight may change
    with pytest.raises(UsageError) as info:
        check_resume(saved, _recipe(kd_loss_type="jsd", kd_loss_options={"top_k": 16}))
    message = str(info.value)
    assert 'distillation.kd_loss_type "forward_kl" -> "jsd"' in message
    assert 'distillation.kd_loss_options {"top_k": 8} -> {"top_k": 16}' in message
    assert "Fix: " in message and "--overwrite" in message


def test_matches_count_without_their_weight(tmp_path: Path) -> None:
    match = {"layer_T": 1, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1}
    saved = _checkpoint(tmp_path / "step-3", _recipe(intermediate_matches=[match]))
    check_resume(saved, _recipe(intermediate_matches=[{**match, "weight": 0.1}]))
    with pytest.raises(UsageError, match=r"intermediate_matches\[0\]"):
        check_resume(saved, _recipe(intermediate_matches=[{**match, "loss": "cos"}]))


def test_older_checkpoints_and_fresh_runs_are_not_checked(tmp_path: Path) -> None:
    check_resume(None, _recipe())
    check_resume(_checkpoint(tmp_path / "old", None), _recipe(kd_loss_type="tvd"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text("not json")
    check_resume(tmp_path / "bad", _recipe(kd_loss_type="tvd"))
