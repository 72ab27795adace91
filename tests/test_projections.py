"""kdcli.projections: the reference's modules (structure, state-dict keys, init), forward maths
and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdcli import registry
from kdcli.projections import INIT_STD, build_projection


@pytest.mark.parametrize("kind", ["linear", "relu", "tanh"])
def test_shape_structure_and_forward(kind):
    proj = build_projection(kind, 4, 6)
    x = torch.randn(2, 3, 4)
    y = proj(x)
    assert y.shape == (2, 3, 6)
    linear = proj if kind == "linear" else proj[0]
    assert isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features) == (4, 6)
    pre = x @ linear.weight.T + linear.bias
    expected = {"linear": pre, "relu": torch.relu(pre), "tanh": torch.tanh(pre)}[kind]
    assert torch.allclose(y, expected, atol=1e-6)
    keys = {"linear": ["weight", "bias"]}.get(kind, ["0.weight", "0.bias"])
    assert list(proj.state_dict()) == keys


@pytest.mark.parametrize("kind", registry.projection_names())
def test_init_is_normal_002_with_zero_bias(kind):
    torch.manual_seed(0)
    proj = build_projection(kind, 384, 768)
    linear = proj if isinstance(proj, nn.Linear) else proj[0]
    w = linear.weight.detach()
    assert torch.count_nonzero(linear.bias) == 0
    assert abs(w.mean().item()) < 1e-3
    assert w.std().item() == pytest.approx(INIT_STD, rel=0.02)  # 295k samples: std within 2%
    # not PyTorch's default (uniform in +-1/sqrt(384) = +-0.051, std 0.029)
    assert w.abs().max().item() > 0.07


def test_same_modules_as_textbrewer():
    presets = pytest.importorskip("textbrewer.presets")
    for kind in registry.projection_names():
        ours, theirs = build_projection(kind, 5, 7), presets.PROJ_MAP[kind](5, 7)
        assert type(ours) is type(theirs)
        assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
            (k, v.shape) for k, v in theirs.state_dict().items()
        ]
        assert [type(m) for m in ours.modules()] == [type(m) for m in theirs.modules()]


@pytest.mark.parametrize(
    "args,fragment",
    [
        (("gelu", 4, 6), "unknown projection 'gelu'; choose one of linear, relu, tanh"),
        (("linear", 0, 6), "dim_S must be a positive integer"),
        (("relu", 4, 6.0), "dim_T must be a positive integer"),
        (("tanh", True, 6), "dim_S must be a positive integer"),
    ],
)
def test_bad_projection(args, fragment):
    with pytest.raises(ValueError) as info:
        build_projection(*args)
    assert fragment in str(info.value)
