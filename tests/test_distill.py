"""End-to-end runs of the loop on tiny models (kdcli/distill.py).

Teachers have hidden size 64, students 32 (2 layers, 2 heads), on the first rows of the real
SST-2 files (or a tiny NER file): every run is a few optimizer steps.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kdcli
from kdcli import data as kdata
from kdcli import distill
from kdcli import models as kmodels
from kdcli.engine import devices, optim, teachers
from kdcli.errors import Interrupted, NonFiniteLossError, RunError, UsageError
from kdcli.recipe import load_recipe
from kdcli.run_files import checkpoint as ckpt
from kdcli.run_files import outdir
from tiny import (
    REPO,
    deny_writes,
    hold_output_lock,
    interrupt_at,
    make_tiny_bert,
    make_tiny_config,
    write_sst2_sample,
    write_tiny_ner,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny teachers (hidden 64), a student folder (hidden 32) and SST-2 / NER data files."""
    root = tmp_path_factory.mktemp("distill")
    make_tiny_bert(root / "teacher", hidden=64)
    make_tiny_bert(root / "teacher2", hidden=64, seed=1)
    make_tiny_bert(root / "student", hidden=32)
    make_tiny_bert(root / "ner_teacher", hidden=32, num_labels=4, task="token-classification")
    make_tiny_config(root / "student_config", hidden=64, layers=1)
    write_sst2_sample(root, n_train=48, n_eval=24)
    write_tiny_ner(root / "ner.jsonl", n=16)
    return root


def write_recipe(folder: Path, name: str, **sections) -> Path:
    recipe = {
        "teacher": {"model": "teacher"},
        "student": {"model": "student"},
        "data": {"train": "train.tsv", "eval": "dev.tsv", "max_length": 24},
        "training": {"num_steps": 4, "batch_size": 8, "log_every": 1, "learning_rate": 1e-3, "warmup_ratio": 0.0},
        "distillation": {"temperature": 4},
    }
    for key, value in sections.items():
        if value is None:
            recipe.pop(key, None)
        elif key in ("data", "training", "distillation") and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    path = folder / f"{name}.json"
    path.write_text(json.dumps(recipe, indent=1))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


HIDDEN_AND_ATTENTION = [
    {
        "layer_T": 2,
        "layer_S": 2,
        "feature": "hidden",
        "loss": "hidden_mse",
        "weight": 1,
        "proj": ["linear", 32, 64, {"lr": 1e-2}],
    },
    {"layer_T": 0, "layer_S": 0, "feature": "hidden", "loss": "cos", "weight": 1, "proj": ["relu", 32, 64]},
    {"layer_T": 1, "layer_S": 1, "feature": "hidden", "loss": "pkd", "weight": 1, "proj": ["tanh", 32, 64]},
    {
        "layer_T": [1, 2],
        "layer_S": [1, 2],
        "feature": "hidden",
        "loss": "fsp",
        "weight": 0.1,
        "proj": ["linear", 32, 64],
    },
    {"layer_T": [0, 2], "layer_S": [0, 2], "feature": "hidden", "loss": "nst", "weight": 1},
    {"layer_T": 1, "layer_S": 1, "feature": "attention", "loss": "attention_mse", "weight": 1},
    {"layer_T": 2, "layer_S": 2, "feature": "attention", "loss": "attention_ce", "weight": 1},
    {"layer_T": 2, "layer_S": 1, "feature": "attention", "loss": "attention_mse_sum", "weight": 0.01},
    {"layer_T": 1, "layer_S": 2, "feature": "attention", "loss": "attention_ce_mean", "weight": 1},
]


def test_full_distill_every_loss_family_with_and_without_proj(world):
    path = write_recipe(
        world,
        "all",
        distillation={
            "temperature": 4,
            "temperature_scheduler": ["flsw", 1, 1],
            "hard_label_weight": 0.5,
            "intermediate_matches": HIDDEN_AND_ATTENTION,
        },
        training={"eval_every": 2},
    )
    out = world / "out-all"
    summary = distill.run(load_recipe(path, mode="distill"), mode="distill", output_dir=out, quiet=True)

    assert summary["steps"] == 4 and summary["total_steps"] == 4
    assert set(summary["final_terms"]) == {
        "kd",
        "hidden_mse[2->2]",
        "cos[0->0]",
        "pkd[1->1]",
        "fsp[1,2->1,2]",
        "nst[0,2->0,2]",
        "attention_mse[1->1]",
        "attention_ce[2->2]",
        "attention_mse_sum[2->1]",
        "attention_ce_mean[1->2]",
        "hard_label",
    }
    assert 0 <= summary["eval"]["accuracy"] <= 1 and summary["eval"]["examples"] == 24
    assert summary["teacher_eval"]["examples"] == 24
    assert summary["peak_memory_mb"] > 0 and summary["samples_per_s"] > 0

    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "projections.safetensors",
        "metrics.jsonl",
        "summary.json",
        "recipe.json",
        "tensorboard",
        "checkpoints",
    ):
        assert (out / name).exists(), name
    assert json.loads((out / "recipe.json").read_text()) == json.loads(path.read_text())
    assert list((out / "tensorboard").iterdir())
    records = lines(out / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["loss/hidden_mse[2->2]"] > 0 and r["weight/hard_label"] == 0.5 for r in train)
    assert [r["step"] for r in records if "eval/accuracy" in r] == [2, 4]
    projections = load_file(out / "projections.safetensors")
    assert set(projections) == {f"projections.{i}.{p}" for i in (0, 3) for p in ("weight", "bias")} | {
        f"projections.{i}.0.{p}" for i in (1, 2) for p in ("weight", "bias")
    }
    assert projections["projections.0.weight"].shape == (64, 32)
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_saved_student_loads_with_plain_transformers_and_predicts(world):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = world / "out-plain"
    distill.run(
        load_recipe(write_recipe(world, "plain", training={"num_steps": 1}), mode="distill"), output_dir=out, quiet=True
    )
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["architectures"] == ["BertForSequenceClassification"]
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["a very good film", "dull and boring"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    assert model.config.id2label == {0: "0", 1: "1"}
    saved = load_file(out / "model.safetensors")
    assert torch.equal(saved["classifier.weight"], model.classifier.weight)


def test_config_student_multi_teacher_cached_logits_kd_mse(world):
    path = write_recipe(
        world,
        "multi",
        teacher=[{"model": "teacher"}, {"model": "teacher2"}],
        student={"config": "student_config", "init_from_teacher": [2]},
        training={"num_steps": None, "num_epochs": 2, "batch_size": 16},
        distillation={"kd_loss_type": "mse", "is_caching_logits": True, "probability_shift": True},
    )
    summary = distill.run(load_recipe(path, mode="distill"), mode="distill", output_dir=world / "out-multi", quiet=True)
    assert summary["steps"] == 6 and summary["epochs"] == 2  # 48 rows / 16 = 3 steps per epoch
    assert summary["teacher_cache_rows"] == 48  # every row's teachers ran once, in epoch 1
    assert set(summary["final_terms"]) == {"kd", "hard_label"}


def test_cached_logits_work_with_num_steps(world):
    """The reference refuses is_caching_logits with num_steps; kdcli's cache is keyed by row,
    so it works across epoch boundaries, and the recipe accepts the combination."""
    path = write_recipe(
        world, "cachesteps", training={"num_steps": 5, "batch_size": 16}, distillation={"is_caching_logits": True}
    )
    recipe = load_recipe(path, mode="distill")
    assert recipe.distillation.is_caching_logits
    summary = distill.run(recipe, output_dir=world / "out-cs", quiet=True)
    assert summary["steps"] == 5 and summary["epochs"] == pytest.approx(80 / 48, abs=1e-3)
    assert summary["teacher_cache_rows"] == 48


def test_cached_logits_are_switched_off_with_a_warning_when_matches_need_features(world):
    path = write_recipe(
        world,
        "cachewarn",
        training={"num_steps": 1},
        distillation={
            "intermediate_matches": [
                {"layer_T": 1, "layer_S": 1, "feature": "attention", "loss": "attention_mse", "weight": 1}
            ],
        },
    )
    recipe = load_recipe(path, mode="distill")
    recipe.distillation.is_caching_logits = True  # recipe.py rejects this; a Recipe built in code may not
    summary = distill.run(recipe, mode="distill", output_dir=world / "out-cw", quiet=True)
    assert summary["teacher_cache_rows"] is None
    assert any("is_caching_logits is off" in w for w in summary["warnings"])


def test_token_classification_distill(world):
    path = write_recipe(
        world,
        "ner",
        teacher={"model": "ner_teacher"},
        student={"config": "ner_teacher", "overrides": {"num_hidden_layers": 1}},
        task="token-classification",
        data={"train": "ner.jsonl", "eval": "ner.jsonl", "text_column": "tokens", "label_column": "ner_tags"},
        distillation={
            "hard_label_weight": 1,
            "intermediate_matches": [
                {"layer_T": 2, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1},
                {"layer_T": 2, "layer_S": 1, "feature": "attention", "loss": "attention_mse", "weight": 1},
            ],
        },
    )
    summary = distill.run(load_recipe(path, mode="distill"), mode="distill", output_dir=world / "out-ner", quiet=True)
    assert set(summary["eval"]) == {"accuracy", "examples", "precision", "recall", "f1"}
    assert set(summary["final_terms"]) == {"kd", "hidden_mse[2->1]", "attention_mse[2->1]", "hard_label"}


def test_train_mode_is_supervised_fine_tuning(world):
    path = write_recipe(world, "train", teacher=None, distillation=None, training={"num_steps": 3})
    out = world / "out-train"
    summary = distill.run(load_recipe(path, mode="train"), mode="train", output_dir=out, quiet=True)
    assert summary["mode"] == "train" and summary["teacher_eval"] is None
    assert set(summary["final_terms"]) == {"hard_label"}
    assert not (out / "projections.safetensors").exists()
    assert (out / "model.safetensors").exists()


def test_seeded_runs_are_identical_and_the_seed_matters(world):
    path = write_recipe(world, "seed", training={"num_steps": 2})
    recipe = load_recipe(path, mode="distill")
    weights = []
    for name, seed in (("a", None), ("b", None), ("c", 7)):
        distill.run(recipe, mode="distill", output_dir=world / f"out-seed-{name}", seed=seed, quiet=True)
        weights.append(load_file(world / f"out-seed-{name}" / "model.safetensors"))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(world, monkeypatch):
    """Stop at step 3 of 7 with a SIGINT (dropout on, accumulation 2, lr warm-up and decay),
    resume from the checkpoint, and compare with a run that never stopped."""
    path = write_recipe(
        world,
        "resume",
        training={
            "num_steps": 7,
            "batch_size": 4,
            "gradient_accumulation_steps": 2,
            "warmup_ratio": 0.3,
            "save_every": 5,
        },
        distillation={"intermediate_matches": [HIDDEN_AND_ATTENTION[0], HIDDEN_AND_ATTENTION[5]]},
    )
    recipe = load_recipe(path, mode="distill")
    distill.run(recipe, mode="distill", output_dir=world / "out-straight", quiet=True)

    interrupt_at(monkeypatch, 3)
    out = world / "out-resumed"
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup or in a background job
    with pytest.raises(Interrupted, match=r"interrupted at step 3 of 7.*Resume with: kdcli distill .*--resume"):
        distill.run(recipe, mode="distill", output_dir=out, quiet=True)
    assert (out / "checkpoints" / "step-3" / "state.pt").exists()
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    monkeypatch.undo()

    summary = distill.run(recipe, mode="distill", output_dir=out, resume=True, quiet=True)
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 7
    straight = load_file(world / "out-straight" / "model.safetensors")
    resumed = load_file(out / "model.safetensors")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6)
    assert (
        load_file(out / "projections.safetensors").keys()
        == load_file(world / "out-straight" / "projections.safetensors").keys()
    )
    steps = [r["step"] for r in lines(out / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7]
    straight_losses = [r["loss"] for r in lines(world / "out-straight" / "metrics.jsonl") if "loss" in r]
    resumed_losses = [r["loss"] for r in lines(out / "metrics.jsonl") if "loss" in r]
    assert resumed_losses == pytest.approx(straight_losses, rel=1e-6)


def test_non_finite_loss_stops_naming_term_step_and_batch_and_keeps_checkpoint(world, monkeypatch):
    path = write_recipe(
        world, "nan", training={"num_steps": 6, "save_every": 1}, distillation={"hard_label_weight": 0.5}
    )
    recipe = load_recipe(path, mode="distill")
    from kdcli.tasks import logits_kd as objective_module

    calls = {"n": 0}
    real = objective_module.hard_label_loss

    def poisoned(logits, labels):
        calls["n"] += 1
        value = real(logits, labels)
        return value * float("nan") if calls["n"] == 4 else value

    monkeypatch.setattr(objective_module, "hard_label_loss", poisoned)
    out = world / "out-nan"
    with pytest.raises(NonFiniteLossError, match=r"term hard_label = nan at step 4, batch 4 of epoch 1.*step-3"):
        distill.run(recipe, mode="distill", output_dir=out, quiet=True)
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-2", "step-3"]
    assert not (out / "model.safetensors").exists()


def test_output_folder_rules(world):
    path = write_recipe(world, "rules", training={"num_steps": 1})
    recipe = load_recipe(path, mode="distill")
    out = world / "out-rules"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    with pytest.raises(UsageError, match="is not empty.*kdcli did not write it.*stale.txt"):
        distill.run(recipe, output_dir=out, quiet=True)
    with pytest.raises(UsageError, match="kdcli did not write it.*stale.txt"):
        distill.run(recipe, output_dir=out, overwrite=True, quiet=True)  # not kdcli's: never deleted
    assert (out / "stale.txt").read_text() == "x"
    with pytest.raises(UsageError, match="holds no checkpoint"):
        distill.run(recipe, output_dir=out, resume=True, quiet=True)
    with pytest.raises(UsageError, match="contradict"):
        distill.run(recipe, output_dir=out, resume=True, overwrite=True, quiet=True)
    with pytest.raises(UsageError, match="would delete"):
        distill.run(recipe, output_dir=world, overwrite=True, quiet=True)  # holds the recipe and models

    (out / "stale.txt").unlink()
    distill.run(recipe, output_dir=out, quiet=True)  # kdcli's own run: marked
    (out / "stale.txt").write_text("x")
    with pytest.raises(UsageError, match="is not empty.*--resume.*--overwrite"):
        distill.run(recipe, output_dir=out, quiet=True)
    summary = distill.run(recipe, output_dir=out, overwrite=True, quiet=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert not any(name.startswith(".") for name in summary["files"])  # marker and lock are not listed
    marker = json.loads((out / outdir.MARKER).read_text())
    assert marker["kdcli"] == kdcli.__version__ and len(marker["recipe_sha256"]) == 64


def test_resume_of_a_finished_run_saves_again_without_training(world):
    path = write_recipe(world, "finished", training={"num_steps": 2})
    recipe = load_recipe(path, mode="distill")
    out = world / "out-finished"
    distill.run(recipe, output_dir=out, quiet=True)
    summary = distill.run(recipe, output_dir=out, resume=True, quiet=True)
    assert summary["steps"] == 2 and summary["resumed_from_step"] == 2 and summary["samples_per_s"] is None


def test_resume_with_another_recipe_or_a_hostile_checkpoint_is_refused(world):
    out = world / "out-hostile"
    distill.run(
        load_recipe(write_recipe(world, "hostile", training={"num_steps": 2}), mode="distill"),
        output_dir=out,
        quiet=True,
    )
    other = write_recipe(
        world, "other", training={"num_steps": 2}, distillation={"intermediate_matches": [HIDDEN_AND_ATTENTION[0]]}
    )
    with pytest.raises(UsageError, match="another objective.*intermediate_matches"):  # refused before loading
        distill.run(load_recipe(other, mode="distill"), output_dir=out, resume=True, quiet=True)

    class Hostile:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(world / "pwned"),))

    latest = ckpt.latest_checkpoint(out)
    torch.save({"position": Hostile()}, latest / "state.pt")
    recipe = load_recipe(world / "hostile.json", mode="distill")
    with pytest.raises(distill.RunError, match="cannot read the checkpoint.*weights_only|cannot read the checkpoint"):
        distill.run(recipe, output_dir=out, resume=True, quiet=True)
    assert not (world / "pwned").exists()


def test_resume_with_a_changed_objective_is_refused_naming_the_values(world):
    """forward_kl -> reverse_kl (or another top-k, temperature) on --resume continued silently,
    logging two quantities under one loss/kd; a changed weight still resumes."""
    out = world / "out-objective"
    training = {"num_steps": 2}
    first = write_recipe(world, "obj-a", training=training, distillation={"kd_loss_type": "forward_kl"})
    distill.run(load_recipe(first, mode="distill"), output_dir=out, quiet=True)
    meta = json.loads((out / "checkpoints" / "step-2" / "meta.json").read_text())
    assert meta["step"] == 2 and meta["objective"]["distillation.kd_loss_type"] == "forward_kl"
    changes = (
        ({"kd_loss_type": "reverse_kl"}, 'distillation.kd_loss_type "forward_kl" -> "reverse_kl"'),
        ({"kd_loss_type": "forward_kl", "temperature": 2}, "distillation.temperature 4.0 -> 2.0"),
    )
    for changed, named in changes:
        second = write_recipe(world, "obj-b", training=training, distillation=changed)
        with pytest.raises(UsageError) as info:
            distill.run(load_recipe(second, mode="distill"), output_dir=out, resume=True, quiet=True)
        message = str(info.value)
        assert named in message and "Fix: " in message and "new training.output_dir" in message
    reweighted = write_recipe(
        world, "obj-c", training=training, distillation={"kd_loss_type": "forward_kl", "kd_loss_weight": 0.5}
    )
    summary = distill.run(load_recipe(reweighted, mode="distill"), output_dir=out, resume=True, quiet=True)
    assert summary["resumed_from_step"] == 2


def test_device_and_precision_resolution():
    procs = devices.Processes()
    assert devices.resolve_device("cpu", procs).type == "cpu"
    if not torch.cuda.is_available():
        assert devices.resolve_device("auto", procs).type in ("cpu", "mps")
        with pytest.raises(UsageError, match="no CUDA GPU"):
            devices.resolve_device("cuda", procs)
    cpu = torch.device("cpu")
    assert devices.resolve_precision("auto", cpu) == "fp32"
    assert devices.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(UsageError, match="fp16 needs a CUDA GPU"):
        devices.resolve_precision("fp16", cpu)


def test_learning_rate_warms_up_then_decays():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = optim.make_scheduler(optimizer, 10, 2)
    lrs = []
    for _ in range(11):
        lrs.append(round(optimizer.param_groups[0]["lr"], 3))
        optimizer.step()
        scheduler.step()
    assert lrs == [0, 0.5, 1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0]


def test_no_weight_decay_on_biases_and_layernorm(world):
    from kdcli.models import load_model
    from kdcli.objective import Objective
    from kdcli.recipe import DistillationConfig

    student = load_model(str(world / "student"), "sequence-classification").model
    objective = Objective(DistillationConfig.model_validate({"intermediate_matches": [HIDDEN_AND_ATTENTION[0]]}))
    groups = optim.param_groups(student, objective, 0.01)
    names = {id(p): n for n, p in student.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    plain = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert all(n.endswith("bias") or "LayerNorm" in n for n in plain)
    assert any("LayerNorm" in n for n in plain) and not any("LayerNorm" in n or n.endswith("bias") for n in decayed)
    assert len(decayed) + len(plain) == len(names)
    assert groups[2]["lr"] == 1e-2 and len(groups) == 3


@pytest.mark.slow
def test_sigint_to_a_subprocess_leaves_a_resumable_checkpoint(world):
    path = write_recipe(world, "sigint", training={"num_steps": 100000, "batch_size": 4})
    out = world / "out-sigint"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdcli", "distill", str(path), "--output-dir", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=world,
    )
    deadline = time.time() + 120
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text()):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert f"Resume with: kdcli distill {path} --output-dir {out} --resume" in stderr
    latest = ckpt.latest_checkpoint(out)
    state = ckpt.load_checkpoint(latest)
    assert state.position.step >= 1 and latest.name == f"step-{state.position.step}"
    assert stdout == ""


def test_teacher_logit_cache_round_trips_token_logits_across_paddings():
    from kdcli.features import Features
    from kdcli.tasks import task_for

    cache = teachers.TeacherLogitCache(task_for("token-classification"))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    logits = torch.randn(2, 4, 3)  # one teacher, (B, L, C)
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": mask}
    assert cache.lookup([7, 9], batch, "cpu") is None
    cache.store([7, 9], [Features(logits=logits, mask=mask)], batch)
    # row 7 alone, in a batch padded to 5
    narrow = {"input_ids": torch.ones(1, 5, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 0, 0]])}
    (found,) = cache.lookup([7], narrow, "cpu")
    assert found.logits.shape == (1, 5, 3)
    assert torch.equal(found.logits[0, :3], logits[0, :3]) and found.logits[0, 3:].abs().sum() == 0
    assert len(cache) == 2 and cache.lookup([7, 8], narrow, "cpu") is None


# ---------------------------------------------------------------------------------------------
# The output folder's safety (issue 12)
# ---------------------------------------------------------------------------------------------


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def test_an_overwrite_that_fails_before_writing_keeps_the_previous_run(world, monkeypatch):
    path = write_recipe(world, "keep", training={"num_steps": 1})
    recipe = load_recipe(path, mode="distill")
    out = world / "out-keep"
    distill.run(recipe, output_dir=out, quiet=True)
    before = _tree(out)

    def bad_model(*args, **kwargs):
        raise RunError("cannot load the model: broken on purpose")

    def bad_data(*args, **kwargs):
        raise UsageError("cannot read the data: broken on purpose")

    for target, broken in (
        (kmodels, ("load_model", bad_model)),
        (kdata, ("prepare_from_recipe", bad_data)),
    ):
        with monkeypatch.context() as patch:
            patch.setattr(target, *broken)
            with pytest.raises((RunError, UsageError), match="broken on purpose"):
                distill.run(recipe, output_dir=out, overwrite=True, quiet=True)
        assert _tree(out) == before
        never = world / "out-never"  # a folder the failed run created is removed again
        with monkeypatch.context() as patch:
            patch.setattr(target, *broken)
            with pytest.raises((RunError, UsageError), match="broken on purpose"):
                distill.run(recipe, output_dir=never, quiet=True)
        assert not never.exists()


def _copy_project(world: Path, to: Path) -> Path:
    to.mkdir()
    for name in ("teacher", "student"):
        shutil.copytree(world / name, to / name)
    for name in ("train.tsv", "dev.tsv"):
        shutil.copy(world / name, to / name)
    return write_recipe(to, "project", training={"num_steps": 1})


def test_overwrite_through_a_symlink_to_the_recipe_folder_is_refused(world, tmp_path):
    path = _copy_project(world, tmp_path / "project")
    outdir.write_marker(tmp_path / "project", {})  # even marked, what the run reads is never deleted
    before = _tree(tmp_path / "project")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "project", target_is_directory=True)
    with pytest.raises(UsageError, match=r"--overwrite would delete .*project.*Fix:"):
        distill.run(load_recipe(path, mode="distill"), output_dir=link, overwrite=True, quiet=True)
    assert _tree(tmp_path / "project") == before


def test_a_relative_model_path_inside_the_output_folder_is_protected(world, tmp_path, monkeypatch):
    models = tmp_path / "models"  # e.g. a `kdcli train` run (marked) that made the teacher
    shutil.copytree(world / "teacher", models / "teacher")
    outdir.write_marker(models, {})
    recipe = load_recipe(write_recipe(world, "relative", training={"num_steps": 1}), mode="distill")
    monkeypatch.chdir(tmp_path)
    recipe.teachers[0].model = "models/teacher"  # a recipe built in code: relative to the working folder
    with pytest.raises(UsageError, match=r"would delete .*teacher"):
        distill.run(recipe, output_dir=models, overwrite=True, quiet=True)
    assert (models / "teacher" / "model.safetensors").exists()


def test_a_folder_another_run_holds_is_refused_naming_its_pid(world):
    path = write_recipe(world, "held", training={"num_steps": 1})
    recipe = load_recipe(path, mode="distill")
    out = world / "out-held"
    distill.run(recipe, output_dir=out, quiet=True)
    holder = hold_output_lock(out)
    try:
        for flags in ({"overwrite": True}, {"resume": True}):
            with pytest.raises(UsageError, match=rf"in use by another kdcli run \(PID {holder.pid}\)"):
                distill.run(recipe, output_dir=out, quiet=True, **flags)
        assert (out / "model.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    summary = distill.run(recipe, output_dir=out, resume=True, quiet=True)  # kill -9 released it
    assert summary["resumed_from_step"] == 1


def test_resume_removes_the_temporary_folders_of_a_killed_save(world):
    path = write_recipe(world, "killed", training={"num_steps": 2, "save_every": 1})
    recipe = load_recipe(path, mode="distill")
    out = world / "out-killed"
    distill.run(recipe, output_dir=out, quiet=True)
    stale = [
        out / "checkpoints" / ".step-3.x1y2z3w4",
        out / "checkpoints" / ".step-2.old-31337",
        out / ".save_pretrained.q9w8e7r6",
    ]
    for folder in stale:
        folder.mkdir()
        (folder / "state.pt").write_bytes(b"half a checkpoint")
    summary = distill.run(recipe, output_dir=out, resume=True, quiet=True)
    assert summary["resumed_from_step"] == 2
    assert not any(p.exists() for p in stale)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]


def test_eval_lines_are_written_once_across_resumes(world, monkeypatch):
    path = write_recipe(world, "evalonce", training={"num_steps": 4, "eval_every": 2})
    recipe = load_recipe(path, mode="distill")
    out = world / "out-evalonce"
    with monkeypatch.context() as patch:
        interrupt_at(patch, 2)
        with pytest.raises(Interrupted):
            distill.run(recipe, output_dir=out, quiet=True)
    distill.run(recipe, output_dir=out, resume=True, quiet=True)  # from step 2 (evaluated there)
    distill.run(recipe, output_dir=out, resume=True, quiet=True)  # a finished run: evaluates step 4 again
    records = lines(out / "metrics.jsonl")
    assert [r["step"] for r in records if "eval/accuracy" in r] == [2, 4]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


def _no_space_after(calls: int, target, name: str, monkeypatch) -> None:
    """Let `target.name` run `calls` times, then write a few bytes and fail with ENOSPC."""
    real = getattr(target, name)
    count = {"n": 0}

    def fake(obj, f, *args, **kwargs):
        count["n"] += 1
        if count["n"] <= calls:
            return real(obj, f, *args, **kwargs)
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(target, name, fake)


def test_disk_full_during_a_checkpoint_keeps_the_last_good_one(world, monkeypatch):
    path = write_recipe(world, "full", training={"num_steps": 4, "save_every": 1})
    recipe = load_recipe(path, mode="distill")
    out = world / "out-full"
    _no_space_after(2, ckpt.torch, "save", monkeypatch)
    with pytest.raises(RunError) as err:
        distill.run(recipe, output_dir=out, quiet=True)
    message = str(err.value)
    assert "\n" not in message
    assert "no space left" in message and "step-3" in message and str(out / "checkpoints") in message
    assert re.search(r"needs about \d+(\.\d+)? (KiB|MiB)", message) and "step-2" in message and "--resume" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]  # no temp folder
    monkeypatch.undo()
    assert distill.run(recipe, output_dir=out, resume=True, quiet=True)["steps"] == 4


def test_disk_full_during_the_final_save_is_one_message(world, monkeypatch):
    import transformers

    path = write_recipe(world, "fullsave", training={"num_steps": 1})
    recipe = load_recipe(path, mode="distill")
    out = world / "out-fullsave"

    def no_space(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", no_space)
    with pytest.raises(RunError, match=r"no space left .*student model.*needs about .*Fix: .*--resume"):
        distill.run(recipe, output_dir=out, quiet=True)
    assert not list(out.glob(".save_pretrained*")) and not (out / "model.safetensors").exists()
    assert (out / "checkpoints" / "step-1" / "state.pt").exists()


def test_unwritable_or_too_long_output_folders_are_refused_before_models_load(world, tmp_path, monkeypatch):
    recipe = load_recipe(write_recipe(world, "ro", training={"num_steps": 1}), mode="distill")

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded a model before checking the output folder")

    monkeypatch.setattr(kmodels, "load_tokenizer", must_not_load)
    monkeypatch.setattr(kmodels, "load_model", must_not_load)
    with pytest.raises(UsageError, match=r"'x{20,}.*' has 300 characters.*Fix:"):
        distill.run(recipe, output_dir=tmp_path / ("x" * 300) / "run", quiet=True)
    ro = tmp_path / "ro"
    ro.mkdir()
    with monkeypatch.context() as patch:
        deny_writes(patch, ro)
        try:
            with pytest.raises(UsageError, match=r"output folder .*ro is not writable"):
                distill.run(recipe, output_dir=ro, quiet=True)
            with pytest.raises(UsageError, match=r"cannot create the output folder .*run"):
                distill.run(recipe, output_dir=ro / "run", quiet=True)
        finally:
            os.chmod(ro, 0o755)


def test_resume_follows_a_changed_learning_rate(world, monkeypatch):
    """The non-finite-loss advice (lower training.learning_rate, then resume) must work: the
    resumed run's schedule continues at the new rate; a projection's own lr stays its own."""
    matches = [HIDDEN_AND_ATTENTION[0], {**HIDDEN_AND_ATTENTION[1], "proj": ["linear", 32, 64]}]
    training = {"num_steps": 6, "warmup_ratio": 0.0}
    first = load_recipe(
        write_recipe(
            world, "lr-a", training={**training, "learning_rate": 1e-3}, distillation={"intermediate_matches": matches}
        ),
        mode="distill",
    )
    second = load_recipe(
        write_recipe(
            world, "lr-b", training={**training, "learning_rate": 2e-4}, distillation={"intermediate_matches": matches}
        ),
        mode="distill",
    )
    out = world / "out-lr"
    with monkeypatch.context() as patch:
        interrupt_at(patch, 3)
        with pytest.raises(Interrupted):
            distill.run(first, output_dir=out, quiet=True)
    summary = distill.run(second, output_dir=out, resume=True, quiet=True)
    assert any("learning_rate 0.0002" in w and "0.001" in w for w in summary["warnings"])
    lrs = {r["step"]: r["lr"] for r in lines(out / "metrics.jsonl") if "lr" in r}
    for step in (1, 2, 3):
        assert lrs[step] == pytest.approx(1e-3 * (6 - step) / 6)
    for step in (4, 5, 6):
        assert lrs[step] == pytest.approx(2e-4 * (6 - step) / 6)
    groups = ckpt.load_checkpoint(out / "checkpoints" / "step-6").optimizer["param_groups"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([2e-4, 2e-4, 1e-2, 2e-4])
