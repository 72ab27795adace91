"""The objective against TextBrewer 0.2.1's combination rule (kdcli/objective.py).

The reference value is computed with `textbrewer.losses` and the reference's own helpers
(`probability_shift_`, `select_logits_with_mask`, its schedulers) combined as
`GeneralDistiller.compute_loss` / `MultiTeacherDistiller.train_on_batch` combine them.
"""

from __future__ import annotations

import pytest
import textbrewer.losses as tb
import torch
import torch.nn.functional as F
from textbrewer.distiller_utils import probability_shift_, select_logits_with_mask
from textbrewer.schedulers import flsw_temperature_scheduler_builder

from kdcli.errors import RunError
from kdcli.features import Features, additive_mask
from kdcli.objective import Objective, term_name
from kdcli.recipe import DistillationConfig
from kdcli.tasks.logits_kd import probability_shift, select_labelled

B, L, C, H, D_S, D_T = 3, 6, 3, 2, 32, 64


def _config(**fields) -> DistillationConfig:
    return DistillationConfig.model_validate(fields)


def _mask() -> torch.Tensor:
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return mask


def _features(dim: int, seed: int, *, grad: bool, token: bool = False) -> Features:
    g = torch.Generator().manual_seed(seed)
    mask = _mask()
    shape = (B, L, C) if token else (B, C)
    logits = torch.randn(*shape, generator=g).mul(3).requires_grad_(grad)
    hidden = {i: torch.randn(B, L, dim, generator=g).requires_grad_(grad) for i in range(3)}
    scores = {
        i: (torch.randn(B, H, L, L, generator=g) + additive_mask(mask, torch.float32)).requires_grad_(grad)
        for i in (1, 2)
    }
    return Features(logits=logits, hidden=hidden, scores=scores, mask=mask)


MATCHES = [
    {"layer_T": 2, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1, "proj": ["linear", D_S, D_T]},
    {"layer_T": 1, "layer_S": 1, "feature": "attention", "loss": "attention_mse", "weight": 0.5},
    {"layer_T": [2, 2], "layer_S": [1, 1], "feature": "hidden", "loss": "nst", "weight": 0.3},
    {
        "layer_T": 1,
        "layer_S": 1,
        "feature": "hidden",
        "loss": "cos",
        "weight": 0.2,
        "proj": ["relu", D_S, D_T, {"lr": 1e-3}],
    },
    {"layer_T": 2, "layer_S": 1, "feature": "attention", "loss": "attention_ce", "weight": 0.1},
    {
        "layer_T": [0, 2],
        "layer_S": [0, 2],
        "feature": "hidden",
        "loss": "fsp",
        "weight": 0.05,
        "proj": ["tanh", D_S, D_T],
    },
]
REFERENCE_FN = {
    "hidden_mse": tb.hid_mse_loss,
    "attention_mse": tb.att_mse_loss,
    "nst": tb.mmd_loss,
    "cos": tb.cos_loss,
    "attention_ce": tb.att_ce_loss,
    "fsp": tb.fsp_loss,
}


def _reference_match(objective: Objective, i: int, match: dict, feats_S: Features, feats_T: Features) -> torch.Tensor:
    """One intermediate term exactly as GeneralDistiller.compute_loss computes it."""
    table = "hidden" if match["feature"] == "hidden" else "scores"
    proj = objective.projections[str(i)] if "proj" in match else None
    if isinstance(match["layer_S"], list):
        inter_S = [getattr(feats_S, table)[s] for s in match["layer_S"]]
        inter_T = [getattr(feats_T, table)[t] for t in match["layer_T"]]
        if proj is not None:
            inter_S = [proj(s) for s in inter_S]
    else:
        inter_S = getattr(feats_S, table)[match["layer_S"]]
        inter_T = getattr(feats_T, table)[match["layer_T"]]
        if proj is not None:
            inter_S = proj(inter_S)
    return REFERENCE_FN[match["loss"]](inter_S, inter_T, mask=feats_S.mask)


def test_general_distiller_parity_total_terms_and_gradients():
    torch.manual_seed(0)
    config = _config(
        temperature=4,
        temperature_scheduler=["flsw", 1.0, 2.0],
        kd_loss_weight=2,
        hard_label_weight=0.5,
        intermediate_matches=MATCHES,
    )
    objective = Objective(config)
    feats_S, feats_T = _features(D_S, 1, grad=True), _features(D_T, 2, grad=False)
    labels = torch.tensor([0, 2, 1])

    total, terms = objective(0.0, feats_S, [feats_T], labels)

    # the reference: temperature scheduler on (logits_S, logits_T, T), kd * w, matches * w_i,
    # hard-label (the model's CE) * w_hl
    temperature = flsw_temperature_scheduler_builder(1.0, 2.0)(feats_S.logits, feats_T.logits, 4.0)
    ref_kd = tb.kd_ce_loss(feats_S.logits, feats_T.logits, temperature)
    ref_terms = {"kd": ref_kd}
    ref_total = 2 * ref_kd
    for i, match in enumerate(MATCHES):
        value = _reference_match(objective, i, match, feats_S, feats_T)
        ref_terms[term_name(match["loss"], match["layer_T"], match["layer_S"])] = value
        ref_total = ref_total + match["weight"] * value
    ref_hl = F.cross_entropy(feats_S.logits, labels)
    ref_terms["hard_label"] = ref_hl
    ref_total = ref_total + 0.5 * ref_hl

    assert list(terms) == list(ref_terms)
    for name in ref_terms:
        assert terms[name].item() == pytest.approx(ref_terms[name].item(), rel=1e-5, abs=1e-7), name
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-5)

    grads = torch.autograd.grad(total, [feats_S.logits, feats_S.hidden[1], objective.projections["0"].weight])
    ref_grads = torch.autograd.grad(ref_total, [feats_S.logits, feats_S.hidden[1], objective.projections["0"].weight])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        assert got.abs().sum() > 0


def test_multi_teacher_average_and_probability_shift_match_reference():
    config = _config(temperature=2, probability_shift=True, kd_loss_type="mse")
    objective = Objective(config)
    feats_S = _features(D_S, 1, grad=True)
    teachers = [_features(D_T, 2, grad=False), _features(D_T, 3, grad=False)]
    before = [t.logits.clone() for t in teachers]
    labels = torch.tensor([0, 2, 1])

    total, terms = objective(0.0, feats_S, teachers, labels)

    mean_T = (teachers[0].logits + teachers[1].logits) / 2  # MultiTeacherDistiller: sum(l_T)/len(l_T)
    shifted = probability_shift_(mean_T.clone(), labels)
    assert torch.equal(shifted.argmax(-1), labels)
    assert terms["kd"].item() == pytest.approx(tb.kd_mse_loss(feats_S.logits, shifted, 2).item(), rel=1e-6)
    assert set(terms) == {"kd", "hard_label"}
    assert total.item() == pytest.approx(terms["kd"].item(), rel=1e-6)  # hard_label_weight 0
    for t, b in zip(teachers, before):
        assert torch.equal(t.logits, b)  # never shifted in place (cached logits stay intact)


def test_probability_shift_is_the_reference_without_writing_in_place():
    logits = torch.tensor([[1.0, 5.0, 2.0], [3.0, 0.0, 1.0], [0.5, 0.1, 4.0]])
    labels = torch.tensor([2, 0, 1])
    out = probability_shift(logits, labels)
    assert torch.equal(out, probability_shift_(logits.clone(), labels))
    assert torch.equal(logits[0], torch.tensor([1.0, 5.0, 2.0]))


def test_token_classification_selects_labelled_tokens_like_the_reference():
    config = _config(temperature=3, probability_shift=True, hard_label_weight=1.0)
    objective = Objective(config)
    feats_S = _features(D_S, 1, grad=True, token=True)
    feats_T = _features(D_T, 2, grad=False, token=True)
    labels = torch.randint(0, C, (B, L))
    labels[feats_S.mask == 0] = -100
    labels[:, 0] = -100  # [CLS] and non-first sub-tokens carry -100

    total, terms = objective(0.0, feats_S, [feats_T], labels)

    keep = labels != -100
    (sel_S,) = select_logits_with_mask([feats_S.logits], [keep])
    (sel_T,) = select_logits_with_mask([feats_T.logits], [keep])
    ref_T = probability_shift_(sel_T.clone(), labels[keep])  # labels selected like the logits
    assert sel_S.shape == (int(keep.sum()), C)
    assert terms["kd"].item() == pytest.approx(tb.kd_ce_loss(sel_S, ref_T, 3).item(), rel=1e-6)
    ce = F.cross_entropy(feats_S.logits.reshape(-1, C), labels.reshape(-1), ignore_index=-100)
    assert terms["hard_label"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert total.item() == pytest.approx((terms["kd"] + ce).item(), rel=1e-6)


def test_select_labelled_leaves_sequence_logits_alone():
    logits = torch.randn(B, C)
    labels = torch.tensor([0, 1, 2])
    out, out_labels = select_labelled(logits, labels)
    assert out is logits and out_labels is labels


def test_scheduled_weights_replace_the_configured_ones():
    config = _config(
        kd_loss_weight=5,
        kd_loss_weight_scheduler="linear_decay",
        hard_label_weight=7,
        hard_label_weight_scheduler="linear_growth",
        intermediate_matches=[MATCHES[0]],
    )
    objective = Objective(config)
    assert objective.weights(0.25) == {"kd": 0.75, "hidden_mse[2->2]": 1.0, "hard_label": 0.25}
    feats_S, feats_T = _features(D_S, 1, grad=True), _features(D_T, 2, grad=False)
    labels = torch.tensor([0, 2, 1])
    total, terms = objective(0.25, feats_S, [feats_T], labels)
    expected = 0.75 * terms["kd"] + terms["hidden_mse[2->2]"] + 0.25 * terms["hard_label"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_train_mode_is_cross_entropy_only():
    objective = Objective(None)
    feats = _features(D_S, 1, grad=True)
    labels = torch.tensor([0, 2, 1])
    total, terms = objective(0.5, feats, [], labels)
    assert list(terms) == ["hard_label"]
    assert total.item() == pytest.approx(F.cross_entropy(feats.logits, labels).item(), rel=1e-7)
    assert objective.weights(0.5) == {"hard_label": 1.0}
    assert len(list(objective.parameters())) == 0


def test_layers_projections_groups_and_state():
    objective = Objective(_config(intermediate_matches=MATCHES))
    assert objective.hidden_layers("S") == [0, 1, 2]
    assert objective.hidden_layers("T") == [0, 1, 2]
    assert objective.attention_layers("S") == [1]
    assert objective.attention_layers("T") == [1, 2]
    assert sorted(objective.projections) == ["0", "3", "5"]
    groups = objective.projection_param_groups()
    assert len(groups) == 3 and groups[1]["lr"] == 1e-3 and "lr" not in groups[0]
    assert objective.projections["3"](torch.randn(2, D_S)).min() >= 0  # relu projection
    assert set(objective.state_dict()) == {f"projections.{i}.{p}" for i in ("0",) for p in ("weight", "bias")} | {
        f"projections.{i}.0.{p}" for i in ("3", "5") for p in ("weight", "bias")
    }


def test_duplicate_matches_get_distinct_names():
    match = {"layer_T": 1, "layer_S": 1, "feature": "attention", "loss": "attention_mse", "weight": 1}
    objective = Objective(_config(intermediate_matches=[match, match]))
    assert [m.name for m in objective.matches] == ["attention_mse[1->1]", "attention_mse[1->1]#1"]


def test_missing_feature_is_a_run_error():
    objective = Objective(_config(intermediate_matches=[MATCHES[1]]))
    feats_S, feats_T = _features(D_S, 1, grad=True), _features(D_T, 2, grad=False)
    feats_T.scores.clear()
    with pytest.raises(RunError, match="teacher's attention layer 1 was not captured"):
        objective(0.0, feats_S, [feats_T], torch.tensor([0, 1, 2]))


def test_sizes_are_checked_against_the_models():
    ok = Objective(_config(intermediate_matches=MATCHES), hidden_S=D_S, hidden_T=D_T)
    assert len(ok.matches) == len(MATCHES)
    with pytest.raises(
        RunError,
        match=r"intermediate_matches\[0\]\.proj\[1\]: proj dim_S is 32 but the student's hidden size is 16.*\[\"linear\", 16, 64\]",
    ):
        Objective(_config(intermediate_matches=MATCHES), hidden_S=16, hidden_T=D_T)
    no_proj = {"layer_T": 1, "layer_S": 1, "feature": "hidden", "loss": "hidden_mse", "weight": 1}
    with pytest.raises(
        RunError,
        match=r"\[0\]\.proj: hidden_mse needs equal hidden sizes, but the student's is 32 and the teacher's 64",
    ):
        Objective(_config(intermediate_matches=[no_proj]), hidden_S=D_S, hidden_T=D_T)
    nst = {"layer_T": [1, 2], "layer_S": [1, 2], "feature": "hidden", "loss": "nst", "weight": 1}
    assert Objective(_config(intermediate_matches=[nst]), hidden_S=D_S, hidden_T=D_T).matches
