"""Causal-lm recipes: the KD loss options from the registry, what a causal-lm objective refuses,
`init_from_teacher` chosen by measurement (recipe, run summary, `kdcli rank-blocks`), and the
chunked loss's multi-teacher / weighted / parts forms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdcli.recipe import check_file
from tiny import make_tiny_lm, write_lm_rows


@pytest.fixture(scope="module")
def lm_ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm")
    make_tiny_lm(root / "teacher", "llama", layers=4, hidden=32)
    write_lm_rows(root / "train.jsonl", "prompt-completion", 24)
    write_lm_rows(root / "eval.jsonl", "prompt-completion", 8, seed=1)
    return root


def recipe(**distillation) -> dict:
    return {
        "task": "causal-lm",
        "teacher": {"model": "./teacher"},
        "student": {"config": "./teacher", "overrides": {"num_hidden_layers": 2}, "init_from_teacher": [2, 4]},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl", "row_format": "prompt-completion", "max_length": 48},
        "training": {"num_steps": 2, "batch_size": 4, "device": "cpu", "precision": "fp32", "output_dir": "out"},
        "distillation": {"kd_loss_type": "jsd", "temperature": 1.0, **distillation},
    }


def errors(root: Path, doc: dict, name: str = "r.json") -> dict[str, str]:
    path = root / name
    path.write_text(json.dumps(doc, indent=1))
    report, _ = check_file(path)
    return {p.path: p.message + " | " + p.fix for p in report.problems if p.severity == "error"}


def test_a_causal_lm_recipe_with_options_is_clean(lm_ws):
    assert errors(lm_ws, recipe(kd_loss_options={"beta": 0.3, "top_k": 8, "top_k_mode": "tail"})) == {}


@pytest.mark.parametrize(
    ("loss", "options", "path", "words"),
    [
        ("jsd", {"beta": 1.5}, "distillation.kd_loss_options.beta", "must be a number in [0, 1], got 1.5"),
        ("jsd", {"alpha": 0.1}, "distillation.kd_loss_options.alpha", "not an option of jsd | jsd takes: beta"),
        ("skew_kl", {"alpha": -1}, "distillation.kd_loss_options.alpha", "in [0, 1]"),
        ("forward_kl", {"top_k": 0}, "distillation.kd_loss_options.top_k", "an integer >= 1"),
        ("tvd", {"top_k_mode": "head"}, "distillation.kd_loss_options.top_k_mode", "renormalise, tail"),
        ("ce", {"t_squared": True}, "distillation.kd_loss_options.t_squared", "ce has none"),
    ],
)
def test_kd_loss_options_are_checked_against_the_registry(lm_ws, loss, options, path, words):
    found = errors(lm_ws, recipe(kd_loss_type=loss, kd_loss_options=options), name=f"o-{loss}.json")
    assert list(found) == [path] and words in found[path], found


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"temperature_scheduler": ["cwsm", 1.0]}, "distillation.temperature_scheduler"),
        ({"probability_shift": True}, "distillation.probability_shift"),
        ({"is_caching_logits": True}, "distillation.is_caching_logits"),
    ],
)
def test_what_causal_lm_refuses(lm_ws, change, path):
    assert path in errors(lm_ws, recipe(kd_loss_type="ce", **change))


def test_temperature_schedulers_stay_with_ce_and_mse_on_encoders(lm_ws):
    from kdcli.recipe.rules import distillation_findings
    from kdcli.recipe.schema import DistillationConfig

    config = DistillationConfig(kd_loss_type="forward_kl", temperature_scheduler=["cwsm", 1.0])
    assert [f.path for f in distillation_findings(config, 1)] == [("distillation", "temperature_scheduler")]
    ce = DistillationConfig(kd_loss_type="ce", temperature_scheduler=["cwsm", 1.0])
    assert distillation_findings(ce, 1) == []


def test_measured_init_sets_the_layer_count_and_checks_keep(lm_ws):
    doc = recipe()
    doc["student"] = {"init_from_teacher": {"keep": 3, "by": "block_influence"}}
    assert errors(lm_ws, doc) == {}
    from kdcli.recipe import load_recipe

    loaded = load_recipe(lm_ws / "r.json")
    assert loaded.student.overrides["num_hidden_layers"] == 3 and loaded.student.init_blocks is None
    doc["student"]["init_from_teacher"]["keep"] = 9
    assert "teacher has 4" in errors(lm_ws, doc)["student.init_from_teacher.keep"]
    doc["student"] = {"overrides": {"num_hidden_layers": 2}, "init_from_teacher": {"keep": 3}}
    assert "overrides.num_hidden_layers is 2" in " ".join(errors(lm_ws, doc).values())
    doc["student"] = {"init_from_teacher": {"keep": 2, "by": "random"}}
    assert "student.init_from_teacher.by" in " ".join(errors(lm_ws, doc))


def test_a_run_measures_its_blocks_and_records_why(lm_ws, capfd):
    from kdcli.compress.block_ranking import rank_blocks
    from kdcli.distill import run
    from kdcli.recipe import load_recipe

    doc = recipe()
    doc["student"] = {"init_from_teacher": {"keep": 2, "by": "block_influence", "rows": 8}}
    (lm_ws / "m.json").write_text(json.dumps(doc))
    summary = run(load_recipe(lm_ws / "m.json"), output_dir=lm_ws / "out-m", overwrite=True, max_steps=1)
    blocks = summary["student_blocks"]
    assert blocks["by"] == "block_influence" and len(blocks["kept"]) == 2 and blocks["tokens"] > 0
    assert "student.init_from_teacher: keeping teacher blocks" in capfd.readouterr().err
    # the same choice as rank_blocks on the first 8 training rows
    from transformers import AutoModelForCausalLM

    from kdcli import data as kdata
    from kdcli.models import load_tokenizer

    tokenizer = load_tokenizer(str(lm_ws / "teacher"))
    task_data = kdata.prepare_from_recipe(load_recipe(lm_ws / "m.json"), tokenizer)
    collate = kdata.Collator.for_tokenizer(tokenizer)
    teacher = AutoModelForCausalLM.from_pretrained(lm_ws / "teacher")
    direct = rank_blocks(teacher, [collate.batch(task_data.train, range(8))], 2, by="block_influence")
    assert list(direct.kept) == blocks["kept"]
    assert direct.scores == pytest.approx({k: float(v) for k, v in blocks["scores"].items()}, rel=1e-6)


def test_rank_blocks_command_json(lm_ws, cli_runner):
    from kdcli.cli import app

    (lm_ws / "rank.json").write_text(json.dumps(recipe()))
    result = cli_runner.invoke(app, ["rank-blocks", str(lm_ws / "rank.json"), "--keep", "3", "--rows", "8", "--json"])
    doc = json.loads(result.stdout)
    assert doc["ok"] and doc["num_blocks"] == 4 and doc["keep"] == 3
    assert set(doc["rankings"]) == {"angular_distance", "block_influence", "evenly_spaced"}
    assert doc["rankings"]["evenly_spaced"]["kept"] == [1, 3, 4]  # round(k * 4 / 3), halves up
    assert all(len(r["kept"]) == 3 for r in doc["rankings"].values())
    bad = cli_runner.invoke(app, ["rank-blocks", str(lm_ws / "rank.json"), "--keep", "7", "--json"])
    assert bad.exit_code != 0 and json.loads(bad.stdout)["error"]["message"].startswith("--keep 7")
    for rows in ("-5", "0"):  # -5 was a ValueError traceback, 0 silently "all rows"
        bad = cli_runner.invoke(app, ["rank-blocks", str(lm_ws / "rank.json"), "--keep", "3", "--rows", rows, "--json"])
        assert bad.exit_code == 2, bad.output
        error = json.loads(bad.stdout)["error"]
        assert error["message"].startswith(f"--rows {rows} ") and "Fix: " in error["message"]


# -- the chunked loss's forms the objective uses ------------------------------------------------


def _heads(seed: int, n=37, d=6, v=29):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(v, d, generator=g, dtype=torch.float64)


def test_chunked_several_teachers_average_their_logits_and_report_parts():
    from kdcli.losses.chunked import chunked_kd_loss
    from kdcli.losses.divergences import forward_kl

    h_S, w_S = _heads(0)
    h_S.requires_grad_(True)
    (h1, w1), (h2, w2) = _heads(1), _heads(2)
    labels = torch.randint(0, 29, (37,), generator=torch.Generator().manual_seed(3))
    labels[::5] = -100
    total, parts = chunked_kd_loss(
        h_S,
        w_S,
        [h1, h2],
        [w1, w2],
        labels=labels,
        chunk_size=8,
        kd_weight=0.7,
        hard_label_weight=0.4,
        normaliser=50.0,
        return_parts=True,
    )
    z_S, z_T = h_S @ w_S.T, ((h1 @ w1.T) + (h2 @ w2.T)) / 2
    keep = labels != -100
    kd = forward_kl(z_S[keep], z_T[keep]).sum() / 50.0
    ce = F.cross_entropy(z_S[keep], labels[keep], reduction="sum") / 50.0
    total_value = float(total.detach())
    assert float(parts["kd"]) == pytest.approx(float(kd.detach()), rel=1e-10)
    assert float(parts["hard_label"]) == pytest.approx(float(ce.detach()), rel=1e-10)
    assert total_value == pytest.approx(float((0.7 * kd + 0.4 * ce).detach()), rel=1e-10)
    (grad,) = torch.autograd.grad(total, h_S)
    (want,) = torch.autograd.grad(0.7 * kd + 0.4 * ce, h_S)
    torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-12)


def test_chunked_without_teachers_is_the_hard_label_term():
    from kdcli.losses.chunked import chunked_kd_loss

    h_S, w_S = _heads(0)
    labels = torch.arange(37) % 29
    total = chunked_kd_loss(h_S, w_S, [], [], labels=labels, kd_weight=0.0, hard_label_weight=1.0)
    assert float(total) == pytest.approx(float(F.cross_entropy(h_S @ w_S.T, labels)), rel=1e-10)
    with pytest.raises(ValueError, match="one head_T"):
        chunked_kd_loss(h_S, w_S, [], [], labels=labels, kd_weight=1.0)
