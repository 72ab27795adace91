"""The distillation objective: KD on logits + intermediate matches + hard-label CE.

    total = w_kd * KD(z_S, z_T, T) + sum_i w_i * match_i(f_S, f_T, mask_S) + w_hl * CE(z_S, y)

as TextBrewer 0.2.1's `GeneralDistiller.compute_loss` (distiller_general.py) and
`MultiTeacherDistiller` (distiller_multiteacher.py) define it:

- KD: `registry.get_loss(kd_loss_type).fn()(z_S, z_T, T)`; the temperature comes from the
  temperature scheduler `sched(z_S, z_T, T)` when one is configured (a float or a per-example
  tensor), else the configured temperature.
- Weight schedulers: a scheduled weight *replaces* the configured `kd_loss_weight` /
  `hard_label_weight` with `scheduler(step_fraction)`, `step_fraction = optimizer steps done /
  total steps`. (The reference updates the weight only after the first optimizer step, so its
  very first batch uses the unscheduled weight; kdcli applies the schedule from step 0.)
- `probability_shift`: the teacher's largest logit and the label's logit swap places, so the
  label is the teacher's argmax. Unlike the reference (`probability_shift_`, in place) this
  never writes into the teacher's tensor (which may be a cached logit), and for token
  classification the labels are selected with the same mask as the logits (the reference
  passed unselected (B, L) labels against selected (N, C) logits).
- Multi-teacher: the teachers' logits are averaged (after selection) before KD, as the
  reference's MultiTeacherDistiller. Intermediate matches use the **first** teacher's features
  (the reference's multi-teacher distiller has no intermediate matches at all).
- Token classification: logits (B, L, C) are reduced to the labelled tokens (labels != -100),
  shape (N, C), before KD, as the reference's `select_logits_with_mask`.
- Every intermediate loss gets the **student's** attention mask (B, L), as the reference
  (`inputs_mask_S`). Student features pass through the match's projection when it has one
  (the teacher's never do).
- The hard-label term is `F.cross_entropy(z_S, y, ignore_index=-100)` (mean over labelled
  examples / tokens), what Hugging Face models return as `loss` when given labels.

Logits are upcast to float32; the loss functions reduce bf16/fp16 features in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from torch import Tensor, nn

from kdcli import registry
from kdcli.errors import RunError
from kdcli.recipe.messages import dotted
from kdcli.recipe.model_rules import proj_size_findings
from kdcli.tasks.base import KDTerm
from kdcli.tasks.logits_kd import LogitsKD


@dataclass(frozen=True)
class MatchPlan:
    """One intermediate match, resolved: which features, which loss, its weight, its name."""

    index: int  # position in `intermediate_matches`
    name: str  # stable term name, e.g. "hidden_mse[4->1]" or "nst[8,8->2,2]"
    feature: str  # "hidden" or "attention"
    layers_T: tuple[int, ...]
    layers_S: tuple[int, ...]
    is_pair: bool  # True when the recipe wrote lists (fsp/mmd): the loss takes lists
    weight: float
    loss_fn: Callable[..., Tensor]
    has_proj: bool


def term_name(loss: str, layer_T: int | Sequence[int], layer_S: int | Sequence[int]) -> str:
    """The stable name of a match term: `loss[T->S]`, lists joined by commas.

    >>> term_name("nst", [8, 8], [2, 2])
    'nst[8,8->2,2]'
    """

    def spell(layer: int | Sequence[int]) -> str:
        return ",".join(map(str, layer)) if isinstance(layer, (list, tuple)) else str(layer)

    return f"{loss}[{spell(layer_T)}->{spell(layer_S)}]"


def _as_tuple(layer: int | Sequence[int]) -> tuple[int, ...]:
    return tuple(layer) if isinstance(layer, (list, tuple)) else (int(cast(int, layer)),)


class Objective(nn.Module):
    """The total loss of one step, every term reported by name; owns the projections.

    Built from the recipe's `distillation` section (`None` for `kdcli train`: hard-label CE
    only, weight 1). `hidden_S` / `hidden_T`, the models' hidden sizes, when given, are checked
    against every `proj` and every loss that needs equal sizes (a `RunError` names the match). Call it as `objective(step_fraction, feats_S, feats_T, labels)` with
    `feats_*` carrying `.logits`, `.hidden` {layer: (B, L, D)}, `.scores` {block: (B, H, L, L)}
    and `.mask` (B, L); `feats_T` is one `Features` per teacher (an empty list in train mode).
    Returns `(total, terms)`: `total` a scalar tensor with gradient, `terms` the unweighted
    value of each term by name (`kd`, `hidden_mse[4->1]`, ..., `hard_label`).
    `weights(step_fraction)` gives the weight each term has at that point of training.
    """

    def __init__(
        self, distillation=None, *, hidden_S: int | None = None, hidden_T: int | None = None, kd_term=None
    ) -> None:
        super().__init__()
        self.config = distillation
        #: the task's KD and hard-label terms (`Task.kd_term`, built once at setup); default the
        #: logits KD of the encoder tasks, selecting token-level logits by their shape
        self.kd_term: KDTerm = kd_term if kd_term is not None else LogitsKD(distillation)
        self.projections = nn.ModuleDict()
        self.matches: list[MatchPlan] = []
        self.kd_weight_scheduler = None
        self.hl_weight_scheduler = None
        if distillation is None:
            return

        from kdcli.schedules import build_weight_scheduler

        self.kd_weight_scheduler = build_weight_scheduler(distillation.kd_loss_weight_scheduler)
        self.hl_weight_scheduler = build_weight_scheduler(distillation.hard_label_weight_scheduler)

        seen: dict[str, int] = {}
        for i, match in enumerate(distillation.intermediate_matches):
            name = term_name(match.loss, match.layer_T, match.layer_S)
            if name in seen:  # the same loss on the same layers twice: keep both, distinctly
                seen[name] += 1
                name = f"{name}#{seen[name]}"
            else:
                seen[name] = 0
            proj = getattr(match, "proj", None)
            _check_sizes(i, match, hidden_S, hidden_T)
            if proj is not None:
                from kdcli.projections import build_projection

                self.projections[str(i)] = build_projection(proj.kind, proj.dim_S, proj.dim_T)
            self.matches.append(
                MatchPlan(
                    index=i,
                    name=name,
                    feature=match.feature,
                    layers_T=_as_tuple(match.layer_T),
                    layers_S=_as_tuple(match.layer_S),
                    is_pair=isinstance(match.layer_S, (list, tuple)),
                    weight=float(match.weight),
                    loss_fn=registry.get_loss(match.loss).fn(),
                    has_proj=proj is not None,
                )
            )

    # -- what the loop needs to know ---------------------------------------------------------

    def hidden_layers(self, side: str) -> list[int]:
        """The hidden-state indices the matches read on one side ("S" or "T")."""
        return self._layers(side, "hidden")

    def attention_layers(self, side: str) -> list[int]:
        """The attention blocks whose scores the matches read on one side ("S" or "T")."""
        return self._layers(side, "attention")

    def _layers(self, side: str, feature: str) -> list[int]:
        found: set[int] = set()
        for m in self.matches:
            if m.feature == feature:
                found.update(m.layers_S if side == "S" else m.layers_T)
        return sorted(found)

    def projection_param_groups(self) -> list[dict]:
        """One optimizer parameter group per projection, with the options from `proj[3]`
        (e.g. {"lr": 1e-3}); options not given follow the optimizer's defaults."""
        groups = []
        for m in self.matches:
            if m.has_proj:
                match = self.config.intermediate_matches[m.index]
                options = dict(match.proj.options or {})
                groups.append({"params": list(self.projections[str(m.index)].parameters()), **options})
        return groups

    def weights(self, step_fraction: float) -> dict[str, float]:
        """The weight of every term at `step_fraction` (optimizer steps done / total)."""
        if self.config is None:
            return {"hard_label": 1.0}
        out = {"kd": self._kd_weight(step_fraction)}
        for m in self.matches:
            out[m.name] = m.weight
        out["hard_label"] = self._hl_weight(step_fraction)
        return out

    def _kd_weight(self, step_fraction: float) -> float:
        if self.kd_weight_scheduler is not None:
            return float(self.kd_weight_scheduler(step_fraction))
        return float(self.config.kd_loss_weight)

    def _hl_weight(self, step_fraction: float) -> float:
        if self.hl_weight_scheduler is not None:
            return float(self.hl_weight_scheduler(step_fraction))
        return float(self.config.hard_label_weight)

    # -- the loss ----------------------------------------------------------------------------

    def forward(
        self,
        step_fraction: float,
        feats_S,
        feats_T: Sequence,
        labels: Tensor | None,
        *,
        micro_batches: int = 1,
        normaliser: float | None = None,
        generated: Tensor | None = None,
    ):
        """This micro-batch's share of the step's loss: `(total, terms)` such that summing over
        the step's `micro_batches` gives the step's value. The task's KD term gives the KD and
        hard-label terms (encoders: batch means divided by `micro_batches`; causal LMs: sums over
        the batch's target tokens divided by `normaliser`, the step's target tokens per process);
        the intermediate matches are batch means divided by `micro_batches`. `generated` (B,)
        bool, causal LMs: rows whose completion was generated (on_policy); the hard-label term
        leaves their tokens out (a CE on a model's own samples teaches nothing)."""
        weights = (self._kd_weight(step_fraction), self._hl_weight(step_fraction)) if self.config else (0.0, 1.0)
        share = {"micro_batches": micro_batches, "normaliser": normaliser, "generated": generated}
        weighted, out = self.kd_term(feats_S, feats_T, labels, weights, **share)
        total: Tensor | None = weighted.get("kd")
        terms = {"kd": out["kd"]} if "kd" in out else {}
        for m in self.matches:
            value = self._match_value(m, feats_S, feats_T[0])
            value = value if micro_batches == 1 else value / micro_batches
            terms[m.name] = value
            total = m.weight * value if total is None else total + m.weight * value
        if "hard_label" in out:
            terms["hard_label"] = out["hard_label"]
        if "hard_label" in weighted:
            total = weighted["hard_label"] if total is None else total + weighted["hard_label"]
        assert total is not None  # every KD term gives the KD or the hard-label term
        return total, terms

    def _match_value(self, m: MatchPlan, feats_S, first) -> Tensor:
        inter_S = [_feature(feats_S, m.feature, layer, "student") for layer in m.layers_S]
        inter_T = [_feature(first, m.feature, layer, "teacher") for layer in m.layers_T]
        if m.has_proj:
            proj = self.projections[str(m.index)]
            inter_S = [proj(s) for s in inter_S]
        if m.is_pair:
            return m.loss_fn(inter_S, inter_T, mask=feats_S.mask)
        return m.loss_fn(inter_S[0], inter_T[0], mask=feats_S.mask)


def _check_sizes(i: int, match, hidden_S: int | None, hidden_T: int | None) -> None:
    """The models' hidden sizes against the match's proj: check-recipe's rule, refused as it words it."""
    if hidden_S is None or hidden_T is None:
        return
    at = ("distillation", "intermediate_matches", i)
    for f in proj_size_findings(at, match, hidden_S, hidden_T):
        raise RunError(f"{dotted(f.path)}: {f.message}. Fix: {f.fix}")


def _feature(feats, feature: str, layer: int, side: str) -> Tensor:
    table = feats.hidden if feature == "hidden" else feats.scores
    try:
        value = table[layer]
    except KeyError:
        raise RunError(
            f"the {side}'s {feature} layer {layer} was not captured (captured: {sorted(table)}); "
            "this is a bug in kdcli's feature capture"
        ) from None
    return value
