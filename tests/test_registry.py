"""kdcli.registry: the one source of names; consistent with kdcli.losses / kdcli.schedules
both ways, with the issue's facts per loss, torch-free, and (optionally) with TextBrewer."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

from kdcli import registry

#: TextBrewer 0.2.1's MATCH_LOSS_MAP names (presets.py)
REFERENCE_MATCH_NAMES = [
    "attention_mse_sum",
    "attention_mse",
    "attention_ce_mean",
    "attention_ce",
    "hidden_mse",
    "cos",
    "pkd",
    "gram",
    "fsp",
    "mmd",
    "nst",
]

#: name -> (feature, layers per side, same_size) as the issue states them
FACTS = {
    "ce": ("logits", 1, None),
    "mse": ("logits", 1, None),
    "attention_mse": ("attention", 1, "heads"),
    "attention_ce": ("attention", 1, "heads"),
    "attention_mse_sum": ("attention", 1, None),
    "attention_ce_mean": ("attention", 1, None),
    "hidden_mse": ("hidden", 1, "hidden"),
    "cos": ("hidden", 1, "hidden"),
    "pkd": ("hidden", 1, "hidden"),
    "fsp": ("hidden", 2, "hidden"),
    "mmd": ("hidden", 2, None),
}


def test_every_loss_spec_resolves_to_its_function():
    from kdcli import losses

    for spec in registry.LOSSES:
        fn = spec.fn()
        assert fn is getattr(losses, spec.function)
        assert fn.__name__ == spec.function and fn.__module__ == "kdcli.losses"


def test_every_public_loss_function_is_registered():
    from kdcli import losses

    public = {
        name
        for name, obj in vars(losses).items()
        if inspect.isfunction(obj) and obj.__module__ == "kdcli.losses" and name.endswith("_loss")
    }
    registered = {spec.function for spec in registry.LOSSES}
    assert public == registered
    assert set(losses.__all__) == registered


def test_every_scheduler_resolves_and_every_public_scheduler_is_registered():
    from kdcli import schedules

    for spec in registry.SCHEDULERS:
        assert schedules.scheduler_function(spec.name) is getattr(schedules, spec.function)
    public = {
        name
        for name, obj in vars(schedules).items()
        if inspect.isfunction(obj)
        and obj.__module__ == "kdcli.schedules"
        and (name.endswith("_temperature") or name.endswith("_weight"))
    }
    assert public == {spec.function for spec in registry.SCHEDULERS}


def test_the_reference_names_are_registered():
    """TextBrewer 0.2.1's names are a subset of the registry's: kdcli may add losses, projections
    and schedulers, never drop or rename one of the reference's."""
    assert {"ce", "mse"} <= set(registry.loss_names("kd"))
    assert set(REFERENCE_MATCH_NAMES) <= set(registry.loss_names("match"))
    assert registry.get_loss("gram") is registry.get_loss("fsp")
    assert registry.get_loss("nst") is registry.get_loss("mmd")
    assert "gram" not in registry.loss_names(aliases=False)
    assert {"linear", "relu", "tanh"} <= set(registry.projection_names())
    assert {"constant", "flsw", "cwsm"} <= set(registry.scheduler_names("temperature"))
    assert {"linear_decay", "linear_growth"} <= set(registry.scheduler_names("weight"))
    with pytest.raises(KeyError):
        registry.get_loss("attention")


@pytest.mark.parametrize("name", sorted(FACTS))
def test_loss_facts(name):
    spec = registry.get_loss(name)
    feature, layers, same_size = FACTS[name]
    assert (spec.feature, spec.layers_per_side, spec.same_size) == (feature, layers, same_size)
    assert spec.needs_proj_when_sizes_differ is (same_size == "hidden")
    assert spec.kind == ("kd" if feature == "logits" else "match")
    assert spec.formula and spec.shapes and spec.mask and spec.paper


def test_scheduler_facts():
    assert registry.get_scheduler("flsw").params == ("beta", "gamma")
    assert registry.get_scheduler("cwsm").params == ("beta",)
    assert registry.get_scheduler("constant").params == ()
    assert 0 < registry.MIN_TEMPERATURE < 1
    assert str(registry.MIN_TEMPERATURE) in registry.get_scheduler("flsw").formula
    assert [p.activation for p in registry.PROJECTIONS] == [None, "ReLU", "Tanh"]


def test_to_dict_is_json_ready():
    for spec in (*registry.LOSSES, *registry.PROJECTIONS, *registry.SCHEDULERS):
        doc = spec.to_dict()
        assert json.loads(json.dumps(doc)) == doc
        assert doc["name"] == spec.name


def test_signatures_are_the_references():
    from kdcli import losses

    expected = {
        "kd_ce_loss": "(logits_S, logits_T, temperature=1)",
        "kd_mse_loss": "(logits_S, logits_T, temperature=1)",
        **{
            f: "(attention_S, attention_T, mask=None)"
            for f in ("att_mse_loss", "att_mse_sum_loss", "att_ce_loss", "att_ce_mean_loss")
        },
        **{
            f: "(state_S, state_T, mask=None)" for f in ("hid_mse_loss", "cos_loss", "pkd_loss", "fsp_loss", "mmd_loss")
        },
    }
    for name, sig in expected.items():
        params = inspect.signature(getattr(losses, name)).parameters.values()
        shown = "(" + ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default}" for p in params) + ")"
        assert shown == sig, name


def test_registry_is_torch_free(repo_root):
    code = "import sys, kdcli.registry; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


DIVERGENCE_NAMES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")


def test_every_kd_loss_has_a_per_token_form_for_causal_lm():
    """The chunked causal-LM path computes each registered KD loss per token; its mean over rows
    is the registered function (one definition per loss, two reductions)."""
    import torch

    from kdcli import losses

    assert all(registry.get_loss(name).per_token for name in registry.loss_names("kd"))
    assert not any(registry.get_loss(name).per_token for name in registry.loss_names("match"))
    g = torch.Generator().manual_seed(0)
    S, T = torch.randn(5, 11, generator=g, dtype=torch.float64), torch.randn(5, 11, generator=g, dtype=torch.float64)
    for name in registry.loss_names("kd"):
        mean = registry.get_loss(name).fn()(S, T, 2.0)
        assert torch.allclose(mean, registry.get_loss(name).token_fn()(S, T, temperature=2.0).mean(), rtol=1e-12), name
    assert losses.jsd_loss is registry.get_loss("jsd").fn()


def test_option_specs_check_values():
    jsd = registry.get_loss("jsd")
    assert jsd.option_defaults() == {
        "beta": 0.5,
        "normalise": True,
        "t_squared": False,
        "top_k": None,
        "top_k_mode": "renormalise",
    }
    assert jsd.option("beta").check(0.0) is None and jsd.option("beta").check(1) is None
    assert jsd.option("beta").check(1.5) == "a number in [0, 1]"
    assert jsd.option("beta").check(True) is not None
    assert jsd.option("top_k").check(None) is None and jsd.option("top_k").check(0) is not None
    assert jsd.option("top_k_mode").check("tail") is None and jsd.option("top_k_mode").check("x") is not None
    assert registry.get_loss("ce").options == () and registry.get_loss("ce").option("beta") is None


def test_agrees_with_textbrewer_presets():
    presets = pytest.importorskip("textbrewer.presets")
    from kdcli import losses

    assert sorted(presets.MATCH_LOSS_MAP) == sorted(registry.loss_names("match"))
    # every reference KD loss is here; the divergences beyond it are the ones with options
    assert sorted(presets.KD_LOSS_MAP) == sorted(
        n for n in registry.loss_names("kd") if not registry.get_loss(n).options
    )
    assert sorted(n for n in registry.loss_names("kd") if registry.get_loss(n).options) == sorted(DIVERGENCE_NAMES)
    for name, fn in {**presets.MATCH_LOSS_MAP, **presets.KD_LOSS_MAP}.items():
        assert registry.get_loss(name).function == fn.__name__
        ours = inspect.signature(getattr(losses, fn.__name__)).parameters
        theirs = inspect.signature(fn).parameters
        assert list(ours) == list(theirs)
        assert [p.default for p in ours.values()] == [p.default for p in theirs.values()]
    assert sorted(presets.PROJ_MAP) == sorted(registry.projection_names())
    assert sorted(presets.WEIGHT_SCHEDULER) == sorted(registry.scheduler_names("weight"))
    assert sorted(presets.TEMPERATURE_SCHEDULER.store) == sorted(registry.scheduler_names("temperature"))


def test_names_in_messages_come_from_the_registry():
    """The loss names check-recipe's messages spell are derived from the registry's facts."""
    assert registry.feature_names("match") == ["hidden", "attention"]
    assert registry.loss_names_where(layers_per_side=2) == ["fsp", "gram", "mmd", "nst"]
    assert registry.loss_names_where(feature="hidden", same_size=None) == ["mmd", "nst"]
    assert registry.heads_free_variant("attention_mse") == "attention_mse_sum"
    assert registry.heads_free_variant("attention_ce") == "attention_ce_mean"
    assert registry.heads_free_variant("hidden_mse") is None
    assert registry.spelled(["fsp", "gram", "mmd"]) == "fsp, gram and mmd" and registry.spelled(["cos"]) == "cos"
