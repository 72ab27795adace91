"""The one registry of loss, projection and scheduler names.

Every name a recipe may use lives here, with the facts the rest of kdcli needs about it:
`list-losses` renders it, the recipe schema validates against it, `check-recipe` applies its
size rules, the feature capture reads which feature each loss consumes, and the objective
resolves the function from it. Nothing else in kdcli spells a loss name.

This module is deliberately torch-free (plain dataclasses), so that `check-recipe` and
`--help` start fast: the loss functions themselves live in `kdcli.losses` and are bound by
name on first use (`LossSpec.fn()`); `tests/test_registry.py` checks that every entry
resolves to a function and every public loss function is registered.

Names and semantics follow TextBrewer 0.2.1 (`presets.py`): KD_LOSS_MAP, MATCH_LOSS_MAP,
PROJ_MAP, TEMPERATURE_SCHEDULER, WEIGHT_SCHEDULER.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from kdcli.loss_options import DIVERGENCE_OPTIONS, OptionSpec

Feature = Literal["logits", "hidden", "attention"]

#: Lower bound applied to every scheduled temperature (flsw / cwsm). The reference lets
#: `T + (mean(w) - w) * beta` reach zero or go negative, which divides logits by zero or
#: flips them; kdcli clamps the per-example temperature to at least this value.
MIN_TEMPERATURE = 1e-2


@dataclass(frozen=True)
class LossSpec:
    """Facts about one loss. `kind` is "kd" (logits) or "match" (intermediate features)."""

    name: str
    kind: Literal["kd", "match"]
    feature: Feature
    function: str  # attribute of kdcli.losses
    formula: str
    shapes: str  # accepted input shapes, per side
    mask: str  # how the mask is used
    paper: str = ""
    aliases: tuple[str, ...] = ()
    layers_per_side: int = 1  # 2 for fsp/gram and mmd/nst
    #: what must agree between student and teacher: "hidden" (hidden sizes; else a `proj` is
    #: required), "heads" (attention head counts), or None (nothing).
    same_size: Literal["hidden", "heads"] | None = None
    #: the options `distillation.kd_loss_options` may set for this loss
    options: tuple[OptionSpec, ...] = ()
    #: kd losses: its per-token form (N, V) -> (N,), an attribute of kdcli.losses.divergences
    #: (what a causal-lm run computes chunk by chunk)
    per_token: str | None = None

    def option(self, name: str) -> OptionSpec | None:
        return next((o for o in self.options if o.name == name), None)

    def option_defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.options}

    @property
    def needs_proj_when_sizes_differ(self) -> bool:
        return self.same_size == "hidden"

    def fn(self) -> Callable:
        """The loss function, imported from kdcli.losses on first use (imports torch)."""
        return getattr(importlib.import_module("kdcli.losses"), self.function)

    def token_fn(self) -> Callable:
        """The per-token form of a kd loss (imports torch); `ValueError` for a match loss."""
        if self.per_token is None:
            raise ValueError(f"{self.name} is a {self.kind} loss: it has no per-token form")
        return getattr(importlib.import_module("kdcli.losses.divergences"), self.per_token)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "kind": self.kind,
            "feature": self.feature,
            "layers_per_side": self.layers_per_side,
            "shapes": self.shapes,
            "same_size": self.same_size,
            "needs_proj_when_sizes_differ": self.needs_proj_when_sizes_differ,
            "mask": self.mask,
            "formula": self.formula,
            "paper": self.paper,
            "function": f"kdcli.losses.{self.function}",
            "options": [o.to_dict() for o in self.options],
        }


@dataclass(frozen=True)
class ProjectionSpec:
    """A projection mapping student features (dim_S) to the teacher's size (dim_T)."""

    name: str
    activation: str | None  # name of a torch.nn activation module, or None
    formula: str

    def to_dict(self) -> dict:
        return {"name": self.name, "activation": self.activation, "formula": self.formula}


@dataclass(frozen=True)
class SchedulerSpec:
    """A temperature scheduler (per-example temperature from logits) or weight scheduler."""

    name: str
    kind: Literal["temperature", "weight"]
    params: tuple[str, ...]  # required positional parameters after the name, e.g. ("beta", "gamma")
    #: attribute of kdcli.schedules (`schedules.scheduler_function`): for "temperature", a builder called with the parameters
    #: that returns f(logits_S, logits_T, base_temperature); for "weight", f(step_fraction)
    function: str
    formula: str
    paper: str = ""
    #: optional positional parameters after `params`, with their defaults (flsw's eps)
    defaults: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "params": list(self.params),
            "defaults": dict(self.defaults),
            "formula": self.formula,
            "paper": self.paper,
        }


_ATT_SHAPES = "(B, H, L, L) raw attention scores, equal H ((B, L, L) is one head)"
_ATT_SHAPES_3D = "(B, H, L, L) raw attention scores (H may differ) or (B, L, L)"
_HID_SHAPES = "(B, L, D)"
_NO_MASK_ATT = "mask (B, L) zeroes padded rows and columns; without a mask, scores <= -1e-3 count as padding"
_HID_MASK = "mask (B, L) drops padded positions"
_PAPER_TINYBERT = "Jiao et al. 2020, TinyBERT, arXiv:1909.10351"
_PAPER_MINILM = "Wang et al. 2020, MiniLM, arXiv:2002.10957"
_PAPER_FSP = "Yim et al. 2017, A Gift from Knowledge Distillation (FSP), CVPR 2017"
_PAPER_NST = "Huang & Wang 2017, Neuron Selectivity Transfer, arXiv:1707.01219"
_PAPER_HINTON = "Hinton et al. 2015, Distilling the Knowledge in a Neural Network, arXiv:1503.02531"
_PAPER_DISTILLM = "Ko et al. 2024, DistiLLM, arXiv:2402.03898"
_TOKEN_SHAPES = (
    "(N, V) next-token logits of the target tokens (causal-lm: from hidden states and heads, chunked), or (B, C)"
)
_TOKEN_MASK = "causal-lm: target tokens only; mean over the target tokens of the whole optimizer step"

LOSSES: tuple[LossSpec, ...] = (
    LossSpec(
        name="ce",
        kind="kd",
        feature="logits",
        function="kd_ce_loss",
        formula="-mean_i sum_c softmax(z_T/T)_c * log_softmax(z_S/T)_c   (no T^2 factor)",
        shapes="(B, C) or (B, L, C); T a float or a tensor (B,) / (B, L)",
        mask="none (token-level logits are selected by the caller)",
        paper=_PAPER_HINTON,
        per_token="ce_per_token",
    ),
    LossSpec(
        name="mse",
        kind="kd",
        feature="logits",
        function="kd_mse_loss",
        formula="mean((z_S/T - z_T/T)^2)",
        shapes="(B, C) or (B, L, C); T a float or a tensor (B,) / (B, L)",
        mask="none (token-level logits are selected by the caller)",
        paper="Ba & Caruana 2014, Do Deep Nets Really Need to be Deep?, arXiv:1312.6184",
        per_token="mse_per_token",
    ),
    *(
        LossSpec(
            name=name,
            kind="kd",
            feature="logits",
            function=f"{name}_loss",
            formula=formula,
            shapes=_TOKEN_SHAPES,
            mask=_TOKEN_MASK,
            paper=paper,
            options=extra + DIVERGENCE_OPTIONS,
            per_token=name,
        )
        for name, formula, paper, extra in (
            ("forward_kl", "sum_v p (log p - log q); p = softmax(z_T/T), q = softmax(z_S/T)", _PAPER_HINTON, ()),
            ("reverse_kl", "sum_v q (log q - log p)", "Gu et al. 2024, MiniLLM, arXiv:2306.08543", ()),
            (
                "jsd",
                "m = beta p + (1-beta) q; beta KL(p||m) + (1-beta) KL(q||m), divided by beta (1-beta) when normalise "
                "(continuous on [0, 1]: forward KL at beta = 0, reverse KL at beta = 1)",
                "Agarwal et al. 2024, GKD, arXiv:2306.13649",
                (
                    OptionSpec("beta", "unit", 0.5, "the mixture weight of the teacher"),
                    OptionSpec(
                        "normalise",
                        "bool",
                        True,
                        "divide by beta (1 - beta): continuous at the ends; false gives TRL's generalized_jsd_loss values",
                    ),
                ),
            ),
            (
                "skew_kl",
                "KL(p || alpha p + (1-alpha) q)",
                _PAPER_DISTILLM,
                (OptionSpec("alpha", "unit", 0.1, "the skew: 0 is forward KL, 1 gives 0"),),
            ),
            (
                "skew_reverse_kl",
                "KL(q || (1-alpha) p + alpha q)",
                _PAPER_DISTILLM,
                (OptionSpec("alpha", "unit", 0.1, "the skew: 0 is reverse KL, 1 gives 0"),),
            ),
            (
                "tvd",
                "1/2 sum_v |p - q|",
                "Wen et al. 2023, f-Divergence Minimization for Sequence-Level KD, arXiv:2307.15190",
                (),
            ),
        )
    ),
    LossSpec(
        name="attention_mse",
        kind="match",
        feature="attention",
        function="att_mse_loss",
        formula="sum_{b,h,i,j} m_bi m_bj (A_S - A_T)^2 / sum_{b,h} (sum_i m_bi)^2",
        shapes=_ATT_SHAPES,
        mask=_NO_MASK_ATT,
        paper=_PAPER_TINYBERT,
        same_size="heads",
    ),
    LossSpec(
        name="attention_mse_sum",
        kind="match",
        feature="attention",
        function="att_mse_sum_loss",
        formula="MSE over (B, L, L) of sum_h A_S vs sum_h A_T, masked as attention_mse",
        shapes=_ATT_SHAPES_3D,
        mask=_NO_MASK_ATT,
        paper=_PAPER_TINYBERT,
    ),
    LossSpec(
        name="attention_ce",
        kind="match",
        feature="attention",
        function="att_ce_loss",
        formula="-sum m_i m_j softmax(A_T)_ij log_softmax(A_S)_ij / sum_{b,h,i} m_i",
        shapes=_ATT_SHAPES,
        mask=_NO_MASK_ATT,
        paper=_PAPER_MINILM,
        same_size="heads",
    ),
    LossSpec(
        name="attention_ce_mean",
        kind="match",
        feature="attention",
        function="att_ce_mean_loss",
        formula="attention_ce on mean_h A_S vs mean_h A_T",
        shapes=_ATT_SHAPES_3D,
        mask=_NO_MASK_ATT,
        paper=_PAPER_MINILM,
    ),
    LossSpec(
        name="hidden_mse",
        kind="match",
        feature="hidden",
        function="hid_mse_loss",
        formula="sum_{b,i} m_bi ||H_S - H_T||^2 / (D * sum m)",
        shapes=_HID_SHAPES,
        mask=_HID_MASK,
        paper=_PAPER_TINYBERT,
        same_size="hidden",
    ),
    LossSpec(
        name="cos",
        kind="match",
        feature="hidden",
        function="cos_loss",
        formula="mean over unmasked positions of 1 - cos(H_S, H_T)",
        shapes=_HID_SHAPES,
        mask=_HID_MASK,
        paper="Sanh et al. 2019, DistilBERT, arXiv:1910.01108",
        same_size="hidden",
    ),
    LossSpec(
        name="pkd",
        kind="match",
        feature="hidden",
        function="pkd_loss",
        formula="mean_b || h_S/||h_S|| - h_T/||h_T|| ||^2 at position 0 (a zero vector stays 0)",
        shapes="(B, L, D) (position 0 is used) or (B, D)",
        mask="not used",
        paper="Sun et al. 2019, Patient Knowledge Distillation, arXiv:1908.09355",
        same_size="hidden",
    ),
    LossSpec(
        name="fsp",
        kind="match",
        feature="hidden",
        function="fsp_loss",
        formula="MSE(S_1^T S_2 / n, T_1^T T_2 / n), Gram matrices (B, D, D); n = length or mask sum",
        shapes="two tensors (B, L, D) per side",
        mask="masked positions are zeroed and n is each example's unmasked length",
        paper=_PAPER_FSP,
        aliases=("gram",),
        layers_per_side=2,
        same_size="hidden",
    ),
    LossSpec(
        name="mmd",
        kind="match",
        feature="hidden",
        function="mmd_loss",
        formula="MSE(S_1 S_2^T / d, T_1 T_2^T / d), Gram matrices (B, L, L); d = D unmasked, L masked",
        shapes="two tensors (B, L, D_S) and (B, L, D_T); D_S may differ from D_T",
        mask="mask (B, L) drops padded rows and columns; the masked path divides by L, not D",
        paper=_PAPER_NST,
        aliases=("nst",),
        layers_per_side=2,
    ),
)

PROJECTIONS: tuple[ProjectionSpec, ...] = (
    ProjectionSpec("linear", None, "W h + b, W ~ N(0, 0.02), b = 0; maps dim_S to dim_T"),
    ProjectionSpec("relu", "ReLU", "relu(W h + b), W ~ N(0, 0.02), b = 0"),
    ProjectionSpec("tanh", "Tanh", "tanh(W h + b), W ~ N(0, 0.02), b = 0"),
)

_PAPER_LESSONS = "Wen et al. 2019, Preparing Lessons: Improve KD with Better Supervision, arXiv:1911.07471"

SCHEDULERS: tuple[SchedulerSpec, ...] = (
    SchedulerSpec("constant", "temperature", (), "constant_temperature", "T_i = T"),
    SchedulerSpec(
        "flsw",
        "temperature",
        ("beta", "gamma"),
        "flsw_temperature",
        f"w_i = (1 - cos(z_S,i, z_T,i))^gamma; T_i = max(T + (mean(w) - w_i) * beta, {MIN_TEMPERATURE})",
        _PAPER_LESSONS,
        defaults={"eps": 1e-4},
    ),
    SchedulerSpec(
        "cwsm",
        "temperature",
        ("beta",),
        "cwsm_temperature",
        f"w_i = 1 / (max softmax(z_S,i) + 1e-3); T_i = max(T + (mean(w) - w_i) * beta, {MIN_TEMPERATURE})",
        _PAPER_LESSONS,
    ),
    SchedulerSpec("linear_decay", "weight", (), "linear_decay_weight", "w = 1 - step / total_steps"),
    SchedulerSpec("linear_growth", "weight", (), "linear_growth_weight", "w = step / total_steps"),
)


def _index(specs) -> dict:
    table = {}
    for spec in specs:
        for name in (spec.name, *getattr(spec, "aliases", ())):
            if name in table:
                raise RuntimeError(f"duplicate registry name {name!r}")
            table[name] = spec
    return table


_LOSS_BY_NAME: dict[str, LossSpec] = _index(LOSSES)
_PROJ_BY_NAME: dict[str, ProjectionSpec] = _index(PROJECTIONS)
_SCHED_BY_NAME: dict[str, SchedulerSpec] = _index(SCHEDULERS)


def loss_names(kind: str | None = None, *, aliases: bool = True) -> list[str]:
    """All loss names (and aliases), optionally only of one kind ("kd" or "match")."""
    return [
        name
        for name, spec in _LOSS_BY_NAME.items()
        if (kind is None or spec.kind == kind) and (aliases or name == spec.name)
    ]


def get_loss(name: str) -> LossSpec:
    """The spec for a loss name or alias; KeyError when unknown."""
    return _LOSS_BY_NAME[name]


def feature_names(kind: str | None = None) -> list[str]:
    """The features (in `Feature`'s order) that losses of `kind` ("kd", "match"; None: any) compare."""
    return [f for f in get_args(Feature) if any(s.feature == f and kind in (None, s.kind) for s in LOSSES)]


def loss_names_where(kind: str | None = "match", **facts) -> list[str]:
    """Loss names and aliases whose spec has every given fact, e.g. `layers_per_side=2`."""
    return [n for n in loss_names(kind) if all(getattr(get_loss(n), k) == v for k, v in facts.items())]


def heads_free_variant(name: str) -> str | None:
    """For an attention loss that compares head by head (`same_size="heads"`), the loss of the same
    family that sums or averages over heads (attention_mse -> attention_mse_sum); else None."""
    spec = get_loss(name)
    if spec.same_size != "heads":
        return None
    family = [n for n in loss_names_where(feature=spec.feature, same_size=None) if n.startswith(spec.name + "_")]
    return family[0] if family else None


def spelled(names: list[str], last: str = "and") -> str:
    """Names for a message: "fsp, gram, mmd and nst"."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {last} {names[-1]}"


def projection_names() -> list[str]:
    return list(_PROJ_BY_NAME)


def get_projection(name: str) -> ProjectionSpec:
    return _PROJ_BY_NAME[name]


def scheduler_names(kind: str) -> list[str]:
    return [n for n, s in _SCHED_BY_NAME.items() if s.kind == kind]


def get_scheduler(name: str) -> SchedulerSpec:
    return _SCHED_BY_NAME[name]
