"""The teacher cache cannot lie (issue 17, items 1-4): edited rows, another cache's files,
damaged files and a cache another process writes (kdcli/engine/cache_store.py,
teacher_cache.py, cache_fill.py).

Tiny BERTs (teacher hidden 64, student 32, no dropout) on 16 SST-2 rows, batch 8, one epoch
(2 steps); a tiny llama for the causal-lm top-k cache. Every run goes through the CLI with
--json: exactly one JSON document on stdout, also when the cache is damaged."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdcli.cli import app
from kdcli.engine import cache_store
from kdcli.features import FeatureCapture, Features
from tiny import REPO, make_tiny_bert, make_tiny_lm, write_lm_rows, write_sst2_sample

#: where the first row's bytes begin in a data file (after its header)
FIRST_ROW = getattr(cache_store, "HEADER_SIZE", 0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_cache_safety")
    make_tiny_bert(root / "teacher", hidden=64)
    make_tiny_bert(root / "teacher-b", hidden=64, seed=7)
    make_tiny_bert(root / "student", hidden=32)
    config = json.loads((root / "student" / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (root / "student" / "config.json").write_text(json.dumps(config))
    write_sst2_sample(root, n_train=16, n_eval=4)
    return root


def write_recipe(world: Path, name: str, teacher: str = "teacher", cache: dict | None = None) -> Path:
    match = {"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1}
    recipe = {
        "teacher": {"model": teacher},
        "student": {"model": "student"},
        "data": {"train": "train.tsv", "max_length": 24},
        "training": {"num_epochs": 1, "batch_size": 8, "log_every": 1, "device": "cpu", "precision": "fp32"},
        "distillation": {
            "temperature": 4,
            "hard_label_weight": 0.5,
            "intermediate_matches": [{**match, "proj": ["linear", 32, 64]}],
            "teacher_cache": cache if cache is not None else {"dtype": "fp32", "dir": f"cache-{name}"},
        },
    }
    path = world / f"{name}.json"
    path.write_text(json.dumps(recipe))
    return path


def losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in x]


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """The losses of the run on teacher A without a cache."""
    path = write_recipe(world, "plain")
    recipe = json.loads(path.read_text())
    del recipe["distillation"]["teacher_cache"]
    path.write_text(json.dumps(recipe))
    from typer.testing import CliRunner

    done = CliRunner().invoke(app, ["distill", str(path), "-o", str(world / "out-plain"), "--json", "--quiet"])
    assert done.exit_code == 0, done.output
    return losses(world / "out-plain")


@pytest.fixture
def forwards(monkeypatch):
    """The batch sizes of the teacher forwards."""
    calls = []
    real = FeatureCapture.run_teacher
    monkeypatch.setattr(
        FeatureCapture, "run_teacher", lambda self, batch: calls.append(len(batch["input_ids"])) or real(self, batch)
    )
    return calls


def command(cli_runner, *args: str, code: int = 0) -> dict:
    """Run kdcli with --json: its exit code, and exactly one JSON document on stdout."""
    done = cli_runner.invoke(app, [*args, "--json"])
    assert done.exit_code == code, (done.stdout, done.stderr, done.exception)
    assert "Traceback" not in done.stderr
    return json.loads(done.stdout)


def fill(cli_runner, path: Path) -> Path:
    return Path(command(cli_runner, "cache-teacher", str(path))["cache"])


def distill(cli_runner, path: Path, out: Path) -> dict:
    return command(cli_runner, "distill", str(path), "-o", str(out), "--overwrite", "--quiet")


def cache_warnings(doc: dict) -> list[str]:
    return [w for w in doc["warnings"] if "teacher cache" in w]


# -- 1. a row's bytes are checked when read -------------------------------------------------


def test_an_edited_row_is_computed_again_and_replaced(world, reference, cli_runner, forwards):
    path = write_recipe(world, "edited")
    folder = fill(cli_runner, path)
    with open(folder / "rank0.data", "r+b") as f:  # the first row's first values, edited
        f.seek(FIRST_ROW)
        f.write(struct.pack("<4f", 1e4, -1e4, 1e4, -1e4))
    forwards.clear()
    doc = distill(cli_runner, path, world / "out-edited")
    assert losses(world / "out-edited") == pytest.approx(reference, rel=1e-4)
    assert forwards == [8]  # the batch that holds the edited row
    (warning,) = cache_warnings(doc)
    assert "1 cached row(s)" in warning and str(folder / "rank0.data") in warning and "replaced" in warning
    forwards.clear()  # the row was written again: the next run reads every row
    again = distill(cli_runner, path, world / "out-edited")
    assert forwards == [] and cache_warnings(again) == []


def test_without_a_teacher_a_damaged_row_is_an_error_naming_its_file(tmp_path):
    from kdcli.engine.teacher_cache import TeacherDiskCache
    from kdcli.errors import RunError

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": mask}
    cache = TeacherDiskCache(tmp_path, 0, key="cd" * 32, dtype="fp32")
    cache.store([0, 1], [Features(logits=torch.randn(2, 3), mask=mask)], batch)
    cache.close()
    with open(tmp_path / "rank0.data", "r+b") as f:
        f.seek(FIRST_ROW)
        f.write(b"\xff\xff")
    reader = TeacherDiskCache(tmp_path, 0, key="cd" * 32, dtype="fp32", recompute=False)
    with pytest.raises(RunError, match="rank0.data"):
        reader.lookup([0, 1], batch, "cpu")


# -- 2. the files carry their cache's key ---------------------------------------------------


def test_another_caches_files_are_not_read_and_the_folder_is_refilled(world, reference, cli_runner, forwards):
    mine = write_recipe(world, "a", cache={"dtype": "fp32", "dir": "cache-ab"})
    theirs = write_recipe(world, "b", teacher="teacher-b", cache={"dtype": "fp32", "dir": "cache-ab"})
    folder, other = fill(cli_runner, mine), fill(cli_runner, theirs)
    assert folder != other
    for name in ("rank0.index", "rank0.data"):
        shutil.copy(other / name, folder / name)
    forwards.clear()
    doc = distill(cli_runner, mine, world / "out-a")
    assert losses(world / "out-a") == pytest.approx(reference, rel=1e-4)  # teacher A's outputs, not B's
    assert forwards == [8, 8]
    assert any("do not carry this cache's key" in w for w in cache_warnings(doc))
    forwards.clear()  # the run wrote the rank's files again, under A's key
    again = distill(cli_runner, mine, world / "out-a")
    assert forwards == [] and cache_warnings(again) == []


# -- 3. damaged files: a recovery, one JSON document, never a traceback ---------------------


@pytest.mark.parametrize("meta", ["{not json", "[1, 2]", '{"layout": 5}', '{"layout": [["logits.0", "float32", [7]]]}'])
def test_an_unreadable_meta_json_is_written_again(world, reference, cli_runner, forwards, meta):
    path = write_recipe(world, "meta")
    folder = fill(cli_runner, path)
    (folder / "meta.json").write_text(meta)
    forwards.clear()
    doc = distill(cli_runner, path, world / "out-meta")
    assert losses(world / "out-meta") == pytest.approx(reference, rel=1e-4)
    assert len(forwards) <= 1  # the first batch gives the layout again; the rows are kept
    assert json.loads((folder / "meta.json").read_text())["layout"]
    assert doc["teacher_cache_rows"] == 16


def test_a_data_file_cut_short_under_its_index_is_refilled(world, reference, cli_runner, forwards):
    path = write_recipe(world, "cut")
    folder = fill(cli_runner, path)
    data = folder / "rank0.data"
    os.truncate(data, data.stat().st_size // 2)
    forwards.clear()
    doc = distill(cli_runner, path, world / "out-cut")
    assert losses(world / "out-cut") == pytest.approx(reference, rel=1e-4)
    assert forwards  # the rows past the cut were computed again
    (warning,) = cache_warnings(doc)
    assert "cached row(s)" in warning and "rank0.data" in warning
    forwards.clear()
    again = distill(cli_runner, path, world / "out-cut")
    assert forwards == [] and again["teacher_cache_rows"] == 16


@pytest.fixture(scope="module")
def lm_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_cache_lm")
    make_tiny_lm(root / "llama", "llama", layers=2, hidden=32)
    write_lm_rows(root / "train.jsonl", "text", 8, seed=1)
    recipe = {
        "task": "causal-lm",
        "teacher": {"model": "llama"},
        "student": {"config": "llama", "overrides": {"num_hidden_layers": 1}},
        "data": {"train": "train.jsonl", "row_format": "text", "max_length": 32},
        "training": {"num_epochs": 1, "batch_size": 4, "device": "cpu", "precision": "fp32"},
        "distillation": {
            "kd_loss_type": "forward_kl",
            "kd_loss_options": {"top_k": 8},
            "chunk_size": 16,
            "teacher_cache": {"dtype": "fp32", "top_k": 8},
        },
    }
    (root / "lm.json").write_text(json.dumps(recipe))
    return root


@pytest.mark.parametrize("forged", [False, True], ids=["edited", "edited-with-valid-checksums"])
def test_stored_token_ids_out_of_range_are_computed_again(lm_world, cli_runner, forwards, forged):
    path, out = lm_world / "lm.json", lm_world / f"out-{forged}"
    shutil.rmtree(out / "teacher-cache", ignore_errors=True)
    command(cli_runner, "cache-teacher", str(path), "-o", str(out))
    (folder,) = (out / "teacher-cache").iterdir()
    with open(folder / "rank0.data", "r+b") as f:  # the first row's first top-k id (topk.ids come first)
        f.seek(FIRST_ROW)
        f.write(struct.pack("<i", 1_000_000))
    if forged:  # the row's and the record's checksums made to match: only the range check is left
        _rechecksum(folder)
    forwards.clear()
    doc = command(cli_runner, "distill", str(path), "-o", str(out), "--quiet")
    assert forwards == [4] and doc["teacher_cache_rows"] == 8
    (warning,) = cache_warnings(doc)
    assert "1 cached row(s)" in warning


def _rechecksum(folder: Path) -> None:
    """Rewrite the first index record with the CRC-32 of its row's (edited) bytes."""
    import zlib

    index = folder / "rank0.index"
    raw, size = index.read_bytes(), cache_store._RECORD.size
    (row, offset, length, tokens, targets, _), *_ = cache_store.read_records(raw[FIRST_ROW:])
    assert offset == FIRST_ROW  # the first record is the first row's
    data = (folder / "rank0.data").read_bytes()[offset : offset + length]
    record = cache_store.pack_record(row, offset, length, tokens, targets, zlib.crc32(data))
    index.write_bytes(raw[:FIRST_ROW] + record + raw[FIRST_ROW + size :])


# -- 4. cache-teacher and a cache another process writes; its counts -------------------------


def test_cache_teacher_refuses_a_cache_another_process_writes(world, reference, cli_runner):
    path = write_recipe(world, "locked")
    folder = fill(cli_runner, path)
    os.truncate(folder / "rank0.index", FIRST_ROW + 4 * cache_store._RECORD.size)  # rows left to compute
    key = json.loads((folder / "meta.json").read_text())["key"]
    script = (
        "import sys, time\n"
        "from kdcli.engine.cache_store import RowStore\n"
        f"store = RowStore({str(folder)!r}, 0, key={key!r})\n"
        "assert store.claim() is None\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        doc = command(cli_runner, "cache-teacher", str(path), code=2)
        run = distill(cli_runner, path, world / "out-locked")  # a run reads, computes the rest, keeps none
    finally:
        holder.kill()
        holder.wait()
    assert doc["ok"] is False and f"PID {holder.pid}" in doc["error"]["message"]
    assert losses(world / "out-locked") == pytest.approx(reference, rel=1e-4)
    (warning,) = cache_warnings(run)
    assert f"PID {holder.pid}" in warning and "keeps none of its rows" in warning
    assert command(cli_runner, "cache-teacher", str(path))["filled"] == 12  # once it is gone


def test_cache_teacher_counts_only_the_rows_it_computed(world, cli_runner):
    path = write_recipe(world, "count")
    folder = fill(cli_runner, path)
    os.truncate(folder / "rank0.index", FIRST_ROW + 4 * cache_store._RECORD.size)  # 4 of the first 8 rows kept
    doc = command(cli_runner, "cache-teacher", str(path))
    assert (doc["already_cached"], doc["filled"], doc["rows"], doc["train_rows"]) == (4, 12, 16, 16)
