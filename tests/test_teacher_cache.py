"""`distillation.teacher_cache`: the teachers' outputs on disk (kdcli/engine/teacher_cache.py,
cache_store.py, cache_key.py, cache_fill.py).

Tiny BERTs (teacher hidden 64, student 32, no dropout) on 32 SST-2 rows, batch 8: 4 steps an
epoch, 2 epochs; tiny llamas for the causal-lm top-k cache."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdcli import distill, registry
from kdcli.engine.cache_store import HEADER_SIZE, RowStore, read_records
from kdcli.features import FeatureCapture
from kdcli.recipe import load_recipe
from kdcli.run_files import run_log
from launch import torchrun_kdcli
from tiny import REPO, make_tiny_bert, make_tiny_lm, write_lm_rows, write_sst2_sample

KEY = "ab" * 32  # a cache key (sha256 hex) for the row store's own tests
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
    write_sst2_sample(root, n_train=32, n_eval=8)
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
    """The losses of the run without a cache (2 epochs, 8 steps)."""
    summary = run(write_recipe(world, "plain"), world / "out-plain")
    assert summary["teacher_cache_rows"] is None
    return losses(world / "out-plain")


def test_fp32_cache_gives_the_same_losses_and_epoch_2_runs_no_teacher(world, reference, forwards):
    path = write_recipe(world, "fp32", {"dtype": "fp32", "dir": "cache-fp32"})
    summary = run(path, world / "out-fp32")
    assert summary["teacher_cache_rows"] == 32
    assert len(forwards) == 4  # the 4 batches of epoch 1; none in epoch 2
    got = losses(world / "out-fp32")
    assert len(got) == 8
    torch.testing.assert_close(torch.tensor(got), torch.tensor(reference), rtol=2e-6, atol=0)

    # a later run on the same inputs reads every row from disk: no teacher forward at all
    forwards.clear()
    again = run(path, world / "out-fp32-again")
    assert forwards == [] and again["teacher_cache_rows"] == 32
    torch.testing.assert_close(
        torch.tensor(losses(world / "out-fp32-again")), torch.tensor(reference), rtol=2e-6, atol=0
    )
    # the cache lives where the recipe says, one subfolder per key
    assert [p.name for p in (world / "cache-fp32").iterdir()] == [summary_folder(world / "cache-fp32")]


def summary_folder(root: Path) -> str:
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    return folder.name


def test_fp16_storage_is_close(world, reference):
    run(write_recipe(world, "fp16", {}), world / "out-fp16")  # default dtype fp16, default dir
    assert (world / "out-fp16" / "teacher-cache").is_dir()
    got = losses(world / "out-fp16")
    assert got[:4] == pytest.approx(reference[:4], rel=1e-6)  # epoch 1: the teacher's own outputs
    assert 0 < max(abs(a - b) for a, b in zip(got, reference)) < 5e-3


def test_resume_continues_filling(world, reference, forwards, monkeypatch):
    path = write_recipe(world, "resume", {"dtype": "fp32", "dir": "cache-resume"})
    advance = run_log.Progress.advance

    def interrupt_after_3(self, done):
        advance(self, done)
        if done == 3:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(run_log.Progress, "advance", interrupt_after_3)
    with pytest.raises(distill.Interrupted):
        run(path, world / "out-resume")
    monkeypatch.setattr(run_log.Progress, "advance", advance)
    assert len(forwards) == 3
    forwards.clear()
    summary = distill.run(load_recipe(path, mode="distill"), output_dir=world / "out-resume", resume=True, quiet=True)
    assert len(forwards) == 1 and summary["teacher_cache_rows"] == 32  # the last batch of epoch 1, then disk
    torch.testing.assert_close(torch.tensor(losses(world / "out-resume")), torch.tensor(reference), rtol=2e-6, atol=0)


def test_cache_teacher_fills_ahead_and_changed_inputs_get_another_key(world, cli_runner, forwards):
    from kdcli.cli import app

    path = write_recipe(world, "ahead", {"dtype": "fp32", "dir": "cache-ahead"})
    done = cli_runner.invoke(app, ["cache-teacher", str(path), "--json"])
    assert done.exit_code == 0, done.output
    doc = json.loads(done.stdout)
    assert (doc["rows"], doc["filled"], doc["train_rows"]) == (32, 32, 32) and doc["bytes"] > 0
    forwards.clear()
    summary = run(path, world / "out-ahead")
    assert forwards == [] and summary["teacher_cache_rows"] == 32  # the run never calls the teacher

    root = world / "cache-ahead"
    first = {p.name for p in root.iterdir()}
    done = cli_runner.invoke(
        app,
        [
            "cache-teacher",
            str(write_recipe(world, "ahead-16", {"dtype": "fp32", "dir": "cache-ahead"}, data={"max_length": 16})),
        ],
    )
    assert done.exit_code == 0, done.output
    assert "left in place" in done.stderr
    second = {p.name for p in root.iterdir()}
    assert len(second) == 2 and first < second
    # another teacher weight file (same folder, same names): another key again
    make_tiny_bert(world / "teacher-b", hidden=64, seed=7)
    changed = write_recipe(world, "ahead-b", {"dtype": "fp32", "dir": "cache-ahead"}, teacher={"model": "teacher-b"})
    assert cli_runner.invoke(app, ["cache-teacher", str(changed)]).exit_code == 0
    third = {p.name for p in root.iterdir()}
    assert len(third) == 3 and second < third
    again = cli_runner.invoke(app, ["cache-teacher", str(path), "--json"])  # nothing left to compute
    assert json.loads(again.stdout)["filled"] == 0


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="no gloo")
def test_two_processes_match_one_process(world):
    """Each rank writes its own files and reads every rank's: in epoch 2 a rank meets rows the
    other one cached. (KD and hard labels only: the matches' masked means over each process's
    tokens differ from one process's mean over the same rows, cache or not.)"""
    kd_only = {"intermediate_matches": []}
    single = run(write_recipe(world, "one", distillation=kd_only), world / "out-one")
    assert single["teacher_cache_rows"] is None
    path = write_recipe(
        world, "two", {"dtype": "fp32", "dir": "cache-two"}, training={"batch_size": 4}, distillation=kd_only
    )
    done = torchrun_kdcli(["distill", str(path), "--output-dir", str(world / "out-two"), "--json", "--quiet"], world)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["teacher_cache_rows"] == 32
    (folder,) = [p for p in (world / "cache-two").iterdir()]
    assert sorted(p.name for p in folder.glob("rank*.index")) == ["rank0.index", "rank1.index"]
    assert losses(world / "out-two") == pytest.approx(losses(world / "out-one"), rel=1e-4)


# -- the row store: half-written rows are never read ----------------------------------------


def _row(i: int) -> bytes:
    return bytes([i % 251]) * (100 + i)


def test_half_written_rows_are_never_read(tmp_path):
    store = RowStore(tmp_path, 0, key=KEY, sync=False)
    store.put_many([(i, _row(i), i, 0) for i in range(3)])
    store.close()
    with open(tmp_path / "rank0.data", "ab") as f:  # a writer killed mid-row: data without index,
        f.write(b"x" * 77)
    with open(tmp_path / "rank0.index", "ab") as f:  # and a torn index record
        f.write(b"KDC1" + b"\0" * 11)
    reader = RowStore(tmp_path, 1, key=KEY)
    assert sorted(reader.entries) == [0, 1, 2]
    assert [bytes(reader.get(i)[0]) for i in range(3)] == [_row(i) for i in range(3)]
    writer = RowStore(tmp_path, 0, key=KEY, sync=False)  # the next writer cuts the leftovers, then appends
    writer.put_many([(3, _row(3), 3, 0)])
    assert (tmp_path / "rank0.data").stat().st_size == HEADER_SIZE + sum(len(_row(i)) for i in range(4))
    assert len(read_records((tmp_path / "rank0.index").read_bytes()[HEADER_SIZE:])) == 4
    reader.refresh()
    assert bytes(reader.get(3)[0]) == _row(3)


def test_a_damaged_row_falls_back_to_another_ranks_copy_then_to_a_rewrite(tmp_path):
    first = RowStore(tmp_path, 0, key=KEY, sync=False)
    first.put_many([(i, _row(i), i, 0) for i in range(3)])
    second = RowStore(tmp_path, 1, key=KEY, sync=False)  # its own copy of row 1 (as two ranks racing)
    second.entries.pop(1)
    second.put_many([(1, _row(1), 1, 0)])
    with open(tmp_path / "rank0.data", "r+b") as f:
        f.seek(HEADER_SIZE + len(_row(0)))  # row 1's bytes in rank 0's file
        f.write(b"\xff")
    first.close()
    second.close()
    reader = RowStore(tmp_path, 2, key=KEY)
    assert reader.entries[1].rank == 0 and bytes(reader.get(1)[0]) == _row(1)  # rank 1's copy
    assert reader.entries[1].rank == 1 and not reader.damaged
    with open(tmp_path / "rank1.data", "r+b") as f:
        f.seek(HEADER_SIZE)
        f.write(b"\xff")
    fresh = RowStore(tmp_path, 0, key=KEY, sync=False)
    assert fresh.get(1) is None and 1 not in fresh and fresh.damaged == {1: tmp_path / "rank0.data"}
    assert fresh.claim() is None and 1 not in fresh  # opening its files to write keeps the bad copy out
    assert fresh.put_many([(1, _row(1), 1, 0)]) == 1  # written again: the later record wins
    assert bytes(RowStore(tmp_path, 3, key=KEY).get(1)[0]) == _row(1)
    assert RowStore(tmp_path, 3, key="cd" * 32).entries == {}  # another key's reader sees nothing


def test_files_it_cannot_write_leave_a_store_that_reads(tmp_path, monkeypatch):
    import os

    from kdcli.engine import cache_store

    first = RowStore(tmp_path, 0, key=KEY, sync=False)
    first.put_many([(0, _row(0), 0, 0)])
    first.close()
    real = os.open

    def refuse_locks(path, *args, **kwargs):  # (a read-only folder: tests run as root, chmod would not do)
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cache_store.os, "open", refuse_locks)
    store = RowStore(tmp_path, 0, key=KEY, sync=False)
    assert "cannot be written (PermissionError: Permission denied)" in store.claim()
    assert store.put_many([(1, _row(1), 1, 0)]) == 0 and bytes(store.get(0)[0]) == _row(0)


def test_a_killed_writer_leaves_only_complete_rows(tmp_path):
    script = (
        "from kdcli.engine.cache_store import RowStore\n"
        "def _row(i): return bytes([i % 251]) * (100 + i)\n"
        f"s = RowStore({str(tmp_path)!r}, 0, key={KEY!r}, sync=False)\n"
        "print('ready', flush=True)\n"
        "i = 0\n"
        "while True:\n"
        "    s.put_many([(i, _row(i) * 50, i, 0)]); i += 1\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    reader = RowStore(tmp_path, 1, key=KEY)
    assert len(reader) > 10
    for i in reader.entries:
        assert bytes(reader.get(i)[0]) == _row(i) * 50


# -- causal-lm: the top-k cache -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["renormalise", "tail"])
@pytest.mark.parametrize("kd", ["forward_kl", "jsd"])
def test_cached_top_k_loss_equals_the_top_k_divergence(mode, kd):
    from kdcli.losses.chunked import chunked_kd_loss
    from kdcli.losses.divergences import CachedTopK
    from kdcli.tasks.lm_cache_rows import top_k_rows

    g = torch.Generator().manual_seed(0)
    n, d, vocab, k, temperature = 40, 16, 300, 12, 2.0
    hidden_S, head_S = torch.randn(n, d, generator=g), torch.randn(vocab, d, generator=g) * 0.5
    hidden_T, head_T = torch.randn(n, d, generator=g), torch.randn(vocab, d, generator=g)
    options = {"top_k": k, "top_k_mode": mode}

    def loss(**teacher):
        h = hidden_S.clone().requires_grad_(True)
        value = chunked_kd_loss(
            h,
            head_S,
            divergence=registry.get_loss(kd).token_fn(),
            divergence_options=options,
            chunk_size=7,
            temperature=temperature,
            **teacher,
        )
        value.backward()
        return value.detach(), h.grad

    want, want_grad = loss(hidden_T=hidden_T, head_T=head_T)
    ids, values, tail = top_k_rows([(hidden_T, head_T, None)], k, temperature, chunk_size=9)
    got, got_grad = loss(hidden_T=[], head_T=[], cached_T=CachedTopK(ids, values, tail))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-7)
    half = CachedTopK(ids, values.half().float(), tail)  # fp16 storage
    torch.testing.assert_close(loss(hidden_T=[], head_T=[], cached_T=half)[0], want, rtol=2e-2, atol=1e-4)
    with pytest.raises(ValueError, match="top_k"):
        chunked_kd_loss(
            hidden_S,
            head_S,
            [],
            [],
            divergence=registry.get_loss(kd).token_fn(),
            divergence_options={"top_k": k + 1},
            cached_T=CachedTopK(ids, values, tail),
        )


def test_causal_lm_run_reads_the_top_k_cache(tmp_path, forwards):
    make_tiny_lm(tmp_path / "llama", "llama", layers=2, hidden=32)
    write_lm_rows(tmp_path / "train.jsonl", "text", 8, seed=1)
    recipe = {
        "task": "causal-lm",
        "teacher": {"model": "llama"},
        "student": {"config": "llama", "overrides": {"num_hidden_layers": 1}, "init_from_teacher": [2]},
        "data": {"train": "train.jsonl", "row_format": "text", "max_length": 32},
        "training": {
            "num_epochs": 2,
            "batch_size": 4,
            "learning_rate": 2e-3,
            "warmup_ratio": 0.0,
            "log_every": 1,
            "device": "cpu",
            "precision": "fp32",
        },
        "distillation": {
            "kd_loss_type": "forward_kl",
            "kd_loss_options": {"top_k": 8, "top_k_mode": "tail"},
            "temperature": 2,
            "hard_label_weight": 0.5,
            "chunk_size": 16,
        },
    }
    (tmp_path / "plain.json").write_text(json.dumps(recipe))
    recipe["distillation"]["teacher_cache"] = {"dtype": "fp32", "top_k": 8}
    (tmp_path / "cached.json").write_text(json.dumps(recipe))
    run(tmp_path / "plain.json", tmp_path / "out-plain")
    forwards.clear()
    summary = run(tmp_path / "cached.json", tmp_path / "out-cached")
    assert len(forwards) == 2 and summary["teacher_cache_rows"] == 8  # epoch 1's 2 batches only
    torch.testing.assert_close(
        torch.tensor(losses(tmp_path / "out-cached")), torch.tensor(losses(tmp_path / "out-plain")), rtol=1e-5, atol=0
    )


# -- check-recipe ---------------------------------------------------------------------------


def test_check_recipe_gives_the_size_and_refuses_top_k_missing_or_mismatched(world, tmp_path):
    from kdcli.recipe.check import check_file

    report, _ = check_file(write_recipe(world, "check", {"dtype": "fp16"}))
    assert report.valid
    (note,) = [n for n in report.notes if n.startswith("distillation.teacher_cache")]
    # 32 rows x (2 logits + 24 tokens x 64 hidden) x 2 bytes + 2 heads x 24^2 scores x 2 bytes
    assert f"32 rows x {2 * 2 + 24 * 64 * 2 + 2 * 24 * 24 * 2} B" in note

    report, _ = check_file(
        write_recipe(world, "both", {}, distillation={"is_caching_logits": True, "intermediate_matches": []})
    )
    assert any(p.path == "distillation.is_caching_logits" and "teacher_cache" in p.message for p in report.errors)

    make_tiny_lm(tmp_path / "llama", "llama", layers=2, hidden=32)
    write_lm_rows(tmp_path / "train.jsonl", "text", 8, seed=1)
    for options, where, words in (
        ({}, "distillation.kd_loss_options", "1024 B per target token"),
        ({"top_k": 16}, "distillation.kd_loss_options.top_k", "top_k is 16"),
    ):
        recipe = {
            "task": "causal-lm",
            "teacher": {"model": "llama"},
            "student": {"config": "llama", "overrides": {"num_hidden_layers": 1}},
            "data": {"train": "train.jsonl", "row_format": "text", "max_length": 32},
            "distillation": {"kd_loss_type": "forward_kl", "kd_loss_options": options, "teacher_cache": {"top_k": 8}},
        }
        (tmp_path / "lm.json").write_text(json.dumps(recipe))
        report, _ = check_file(tmp_path / "lm.json")
        (error,) = [p for p in report.errors if p.path == where]
        assert words in error.message and error.fix
