"""kdcli.engine.non_finite: a NaN teacher (from its weights or from the teacher cache) is
reported as the teacher's or the cache's fault, not with learning-rate advice."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kdcli import distill
from kdcli.engine.non_finite import non_finite_part, teacher_blame
from kdcli.errors import NonFiniteLossError
from kdcli.features import Features
from kdcli.recipe import load_recipe
from tiny import make_tiny_bert, make_tiny_lm, write_lm_rows, write_sst2_sample


def _poisoned(source: Path, folder: Path, *, causal: bool) -> Path:
    """A copy of a tiny model with one NaN in a weight of its blocks."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    model = (AutoModelForCausalLM if causal else AutoModelForSequenceClassification).from_pretrained(source)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "layers.0." in n or "layer.0." in n)[0] = float("nan")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def _write(folder: Path, recipe: dict) -> Path:
    path = folder / "recipe.json"
    path.write_text(json.dumps(recipe))
    return path


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "causal-lm"])
def test_a_nan_teacher_is_named_instead_of_the_learning_rate(tmp_path: Path, causal: bool) -> None:
    if causal:
        make_tiny_lm(tmp_path / "good", layers=2)
        make_tiny_lm(tmp_path / "student", layers=1)
        write_lm_rows(tmp_path / "train.jsonl", "text", 8)
        data = {"train": "train.jsonl", "text_column": "text", "max_length": 32}
        extra = {"task": "causal-lm", "distillation": {"kd_loss_type": "forward_kl"}}
    else:
        make_tiny_bert(tmp_path / "good", hidden=32)
        make_tiny_bert(tmp_path / "student", hidden=32, layers=1)
        write_sst2_sample(tmp_path, n_train=8, n_eval=4)
        data = {"train": "train.tsv", "max_length": 24}
        extra = {"distillation": {"temperature": 2}}
    _poisoned(tmp_path / "good", tmp_path / "nan-teacher", causal=causal)
    recipe = {
        "teacher": {"model": "nan-teacher"},
        "student": {"model": "student"},
        "data": data,
        "training": {"num_steps": 1, "batch_size": 4, "device": "cpu", "output_dir": "out"},
        **extra,
    }
    with pytest.raises(NonFiniteLossError) as info:
        distill.run(load_recipe(_write(tmp_path, recipe), mode="distill"), quiet=True)
    message = str(info.value)
    assert "the teacher" in message and "nan-teacher" in message and "(teacher.model)" in message
    assert "non-finite outputs" in message and "teacher's weights" in message
    assert "lower training.learning_rate" not in message


class _Capture:
    def __init__(self, feats: Features) -> None:
        self.feats = feats

    def run_teacher(self, batch) -> Features:
        return self.feats


def _run(cache_folder: Path | None, fresh: Features, *, sharded: bool = False):
    recipe = SimpleNamespace(teacher=SimpleNamespace(), teachers=[SimpleNamespace(model="/m/t")])
    cache = SimpleNamespace(folder=cache_folder) if cache_folder is not None else None
    return SimpleNamespace(
        recipe=recipe,
        cache=cache,
        sharded=sharded,
        captures_T=[_Capture(fresh)],
        device=torch.device("cpu"),
        autocast_precision="fp32",
    )


def test_a_non_finite_cache_is_named_when_the_teacher_computes_finite_outputs(tmp_path: Path) -> None:
    good = Features(logits=torch.zeros(2, 3))
    bad = Features(logits=torch.tensor([[0.0, float("inf"), 0.0], [0.0, 0.0, 0.0]]))
    assert non_finite_part(good) is None and non_finite_part(bad) == "logits"
    assert teacher_blame(_run(tmp_path / "cache", good), [good], {}) is None
    blame = teacher_blame(_run(tmp_path / "cache", good), [bad], {})
    assert "distillation.teacher_cache.dir" in blame and str(tmp_path / "cache") in blame and "delete" in blame
    blame = teacher_blame(_run(tmp_path / "cache", bad), [bad], {})  # the teacher itself: the teacher
    assert blame.startswith("the teacher '/m/t' (teacher.model) produces non-finite outputs")
    blame = teacher_blame(_run(tmp_path / "cache", good, sharded=True), [bad], {})  # no lone forward
    assert "(or distillation.teacher_cache.dir" in blame


def test_padding_and_cached_log_probs_of_minus_inf_are_not_blamed() -> None:
    logits = torch.zeros(1, 2, 3)
    logits[0, 1] = float("nan")  # a padding position
    assert non_finite_part(Features(logits=logits, mask=torch.tensor([[1, 0]]))) is None
    from kdcli.losses.divergences import CachedTopK

    top = CachedTopK(torch.zeros(2, 2, dtype=torch.int32), torch.tensor([[0.0, -float("inf")]] * 2), torch.zeros(2))
    assert non_finite_part(Features(logits=None, top_k=top)) is None
    nan = CachedTopK(top.ids, top.log_p, torch.tensor([0.0, float("nan")]))
    assert non_finite_part(Features(logits=None, top_k=nan)) == "cached top-k log-probabilities"
