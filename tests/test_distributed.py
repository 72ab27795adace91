"""Two processes under torchrun on CPU (gloo) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdcli import distill
from kdcli.recipe import load_recipe
from kdcli.run_files import checkpoint as ckpt
from tiny import REPO, make_tiny_bert, write_sst2_sample


def _no_dropout(folder: Path) -> None:
    """Dropout draws differ between one process and two; switch it off to compare losses."""
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))


def _recipe(root: Path, name: str, batch_size: int) -> Path:
    path = root / f"{name}.json"
    path.write_text(
        json.dumps(
            {
                "teacher": {"model": "teacher"},
                "student": {"model": "student"},
                "data": {"train": "train.tsv", "max_length": 24},
                "training": {
                    "num_steps": 4,
                    "batch_size": batch_size,
                    "log_every": 1,
                    "learning_rate": 1e-3,
                    "warmup_ratio": 0.0,
                    "device": "cpu",
                },
                "distillation": {"temperature": 4, "hard_label_weight": 0.5},
            }
        )
    )
    return path


def _torchrun() -> list[str]:
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="no gloo")
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    make_tiny_bert(tmp_path / "teacher", hidden=64)
    make_tiny_bert(tmp_path / "student", hidden=32)
    _no_dropout(tmp_path / "student")
    write_sst2_sample(tmp_path, n_train=64, n_eval=8)

    single = tmp_path / "out-1"
    distill.run(load_recipe(_recipe(tmp_path, "one", 8), mode="distill"), output_dir=single, quiet=True)

    double = tmp_path / "out-2"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(
        [
            *_torchrun(),
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "kdcli",
            "distill",
            str(_recipe(tmp_path, "two", 4)),
            "--output-dir",
            str(double),
            "--json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # one document: rank 0 alone prints
    assert summary["processes"] == 2 and summary["steps"] == 4
    assert summary["epochs"] == pytest.approx(0.5)  # 4 steps x 2 processes x 4 rows of 64

    # one output: rank 0 alone wrote it, and only it
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out-")) == ["out-1", "out-2"]
    assert len((double / "metrics.jsonl").read_text().splitlines()) == 4
    assert [p.name for p in (double / "checkpoints").iterdir()] == ["step-4"]
    state = ckpt.load_checkpoint(double / "checkpoints" / "step-4")
    assert len(state.rng["ranks"]) == 2

    assert _losses(double) == pytest.approx(_losses(single), rel=1e-4)
    one, two = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
