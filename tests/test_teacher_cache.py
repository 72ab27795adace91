"""`distillation.teacher_cache`: the teachers' outputs on disk (kdcli/engine/teacher_cache.py,
cache_store.py, cache_key.py, cache_fill.py).

Tiny BERTs (teacher hidden 64, student 32) on 48 SST-2 rows, batch 8: 6 steps an epoch; tiny
llamas for the causal-lm top-k cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdcli import distill
from kdcli.engine.cache_store import RowStore, read_records
from kdcli.features import FeatureCapture
from kdcli.recipe import load_recipe
from tiny import REPO, make_tiny_bert, make_tiny_lm, write_lm_rows, write_sst2_sample

MATCHES = [
    {"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1, "proj": ["linear", 32, 64]},
    {"layer_T": 1, "layer_S": 1, "feature": "attention", "loss": "attention_ce", "weight": 1},
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_cache")
    make_tiny_bert(root / "teacher", hidden=64)
    make_tiny_bert(root / "student", hidden=32)
    config = json.loads((root / "student" / "config.json").read_text())  # one process = two (no dropout draws)
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (root / "student" / "config.json").write_text(json.dumps(config))
    write_sst2_sample(root, n_train=48, n_eval=8)
    return root


def write_recipe(folder: Path, name: str, cache: dict | None = None, **sections) -> Path:
    recipe = {
        "teacher": {"model": "teacher"},
        "student": {"model": "student"},
        "data": {"train": "train.tsv", "max_length": 24},
        "training": {
            "num_epochs": 2,
            "batch_size": 8,
            "log_every": 1,
            "learning_rate": 1e-3,
            "warmup_ratio": 0.0,
            "device": "cpu",
            "precision": "fp32",
        },
        "distillation": {"temperature": 4, "hard_label_weight": 0.5, "intermediate_matches": MATCHES},
    }
    if cache is not None:
        recipe["distillation"]["teacher_cache"] = cache
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if isinstance(recipe.get(key), dict) else value
    path = folder / f"{name}.json"
    path.write_text(json.dumps(recipe, indent=1))
    return path


def losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in x]


@pytest.fixture
def forwards(monkeypatch):
    """The teacher forwards of each run, counted."""
    calls = []
    real = FeatureCapture.run_teacher

    def counted(self, batch):
        calls.append(batch["input_ids"].size(0))
        return real(self, batch)

    monkeypatch.setattr(FeatureCapture, "run_teacher", counted)
    return calls


def run(path: Path, out: Path, **kwargs) -> dict:
    return distill.run(load_recipe(path, mode="distill"), output_dir=out, overwrite=True, quiet=True, **kwargs)


@pytest.fixture(scope="module")
def reference(world):
    """The losses of the run without a cache (2 epochs, 12 steps)."""
    summary = run(write_recipe(world, "plain"), world / "out-plain")
    assert summary["teacher_cache_rows"] is None
    return losses(world / "out-plain")


def test_fp32_cache_gives_the_same_losses_and_epoch_2_runs_no_teacher(world, reference, forwards):
    path = write_recipe(world, "fp32", {"dtype": "fp32", "dir": "cache-fp32"})
    summary = run(path, world / "out-fp32")
    assert summary["teacher_cache_rows"] == 48
    assert len(forwards) == 6  # the 6 batches of epoch 1; none in epoch 2
    got = losses(world / "out-fp32")
    assert len(got) == 12
    torch.testing.assert_close(torch.tensor(got), torch.tensor(reference), rtol=2e-6, atol=0)

    # a later run on the same inputs reads every row from disk: no teacher forward at all
    forwards.clear()
    again = run(path, world / "out-fp32-again")
    assert forwards == [] and again["teacher_cache_rows"] == 48
    torch.testing.assert_close(torch.tensor(losses(world / "out-fp32-again")), torch.tensor(reference), rtol=2e-6, atol=0)
    # the cache lives where the recipe says, one subfolder per key
    assert [p.name for p in (world / "cache-fp32").iterdir()] == [summary_folder(world / "cache-fp32")]


def summary_folder(root: Path) -> str:
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    return folder.name


def test_fp16_storage_is_close(world, reference):
    run(write_recipe(world, "fp16", {}), world / "out-fp16")  # default dtype fp16, default dir
    assert (world / "out-fp16" / "teacher-cache").is_dir()
    got = losses(world / "out-fp16")
    assert got[:6] == pytest.approx(reference[:6], rel=1e-6)  # epoch 1: the teacher's own outputs
    assert max(abs(a - b) for a, b in zip(got, reference)) < 5e-3
    # --overwrite keeps the cache (it is kdcli's own, keyed by its inputs)
    run(write_recipe(world, "fp16", {}), world / "out-fp16")
    assert len(list((world / "out-fp16" / "teacher-cache").iterdir())) == 1
